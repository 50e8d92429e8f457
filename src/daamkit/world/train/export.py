"""Phase ``export``: a standard diffusers ``StableDiffusionPipeline`` folder (fp16 safetensors) from
the run's checkpoints, and a grid of samples generated through ``from_pretrained``."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

from .autoencoder import load_vae
from .common import mark, tokenizer
from .recipe import SCHEDULER_KW, Recipe, option_names
from .unet import build_unet_and_text

SAMPLE_PROMPTS = [
    "a red circle",
    "a blue square",
    "a green triangle",
    "a yellow star",
    "a purple heart",
    "an orange cross",
    "a red circle above a blue star",
    "a green square to the left of a yellow heart",
    "two purple triangles",
    "a small blue heart on a grey background",
    "a yellow circle and a red cross",
    "a large green cross on a striped background",
    "a red heart",  # held-out pair
    "a purple circle and a blue triangle",  # held-out pairs
    "there is an orange star below a green circle",  # held-out template
    "a red star, a blue circle and a yellow square",
]


def recorded_options(r: Recipe, out: Path) -> tuple[dict, list]:
    """The options the run recorded in ``args.json`` (``r``'s for a run without one), and the
    record's ``changed_on_resume`` history. Only today's options are kept: a record may also hold
    options of earlier versions, or what a caller put beside them."""
    path = out / "args.json"
    recorded = json.loads(path.read_text()) if path.exists() else r.as_dict()
    known = option_names()
    return {k: v for k, v in recorded.items() if k in known}, recorded.get("changed_on_resume", [])


def export(r: Recipe, out: Path, dest: Path, log=None, use_ema: bool = True) -> Path:
    """Write the diffusers pipeline folder (fp16 safetensors) from the checkpoints under ``out``."""
    import shutil

    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    scale = json.loads((out / "latents.done").read_text())["scaling_factor"]
    vae = load_vae(r, out)
    vae.register_to_config(scaling_factor=scale)
    unet, te = build_unet_and_text(r)
    st = torch.load(out / "ckpt_unet.pt", weights_only=False)
    unet.load_state_dict(st["ema_unet" if use_ema else "unet"])
    te.load_state_dict(st["ema_text" if use_ema else "text"])
    sched = DPMSolverMultistepScheduler(**SCHEDULER_KW, steps_offset=1)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=tokenizer(out),
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16)
    # the options the run was trained with, not those of this (possibly later) export call
    config, history = recorded_options(r, out)
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    # transformers loads a text encoder in its config's dtype when none is asked for, while diffusers
    # loads its models in float32: record float32 so a plain from_pretrained() gives one dtype (the
    # weights stay fp16 on disk and are upcast on load).
    te_cfg = tmp / "text_encoder" / "config.json"
    cfg = json.loads(te_cfg.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in cfg:
            cfg[key] = "float32"
    te_cfg.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    info = {"unet_steps": st["step"], "unet_minutes": st["elapsed"] / 60, "ema": use_ema, "config": config}
    if history:
        info["changed_on_resume"] = history
    (tmp / "daamkit_world.json").write_text(json.dumps(info, indent=1, default=str))
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    if log:
        log(phase="export", dest=str(dest), bytes=size)
    print(f"exported {dest} ({size / 1e6:.1f} MB)", file=sys.stderr)
    return dest


def sample_grid(
    model_dir: Path, path: Path, prompts: list[str], steps: int = 20, guidance: float = 5.0, seed: int = 0
):
    """Generate ``prompts`` with the pipeline in ``model_dir`` and save them as one grid image."""
    import torch
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    pipe = StableDiffusionPipeline.from_pretrained(str(model_dir), local_files_only=True, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed)
    images = pipe(
        prompts, num_inference_steps=steps, guidance_scale=guidance, generator=g, height=64, width=64
    ).images
    cols = min(8, len(images))
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (64 * cols, 64 * rows), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * 64, (i // cols) * 64))
    grid.resize((128 * cols, 128 * rows), Image.Resampling.NEAREST).save(path)
    return images


def phase_export(r: Recipe, out: Path, log) -> None:
    dest = Path(r.export_to) if r.export_to else out / "model"
    export(r, out, dest, log)
    if r.sample_steps > 0:
        t0 = time.time()
        sample_grid(dest, out / "samples.png", SAMPLE_PROMPTS, steps=r.sample_steps)
        log(phase="samples", seconds=time.time() - t0)
    mark(out, "export", {"dest": str(dest)})
