"""One traced generation job: run the pipeline inside a trace, build records, write the outputs.

Shared by ``daamkit generate``, ``daamkit demo``, the batch runner and the web app, so that every
front end writes the same files.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from daamkit.errors import InputError
from daamkit.io.record import RunRecord
from daamkit.metrics import DEFAULT_THRESHOLD
from daamkit.trace import trace


def parse_size(text: str | None) -> tuple[int | None, int | None]:
    """'512' -> (512, 512); '768x512' -> width 768, height 512. Returns (height, width)."""
    if not text:
        return None, None
    try:
        if "x" in text.lower():
            w, h = (int(v) for v in text.lower().split("x"))
        else:
            w = h = int(text)
    except ValueError:
        raise InputError(f"--size must be N or WIDTHxHEIGHT (e.g. 512 or 768x512), got {text!r}") from None
    if w <= 0 or h <= 0 or w % 8 or h % 8:
        raise InputError(f"--size must be positive multiples of 8, got {text!r}")
    return h, w


def parse_steps(text: str | None) -> range | list[int] | None:
    """'0:10' -> range(0, 10); '0,5,9' -> [0, 5, 9]."""
    if not text:
        return None
    try:
        if ":" in text:
            a, b = text.split(":")
            return range(int(a or 0), int(b))
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise InputError(f"--steps-range must be START:END or a comma list of step indices, got {text!r}") from None


@dataclass
class GenerateOptions:
    steps: int = 30
    seed: int = 0
    height: int | None = None
    width: int | None = None
    guidance_scale: float = 7.5
    negative_prompt: str | None = None
    num_images_per_prompt: int = 1
    trace: dict[str, Any] = field(default_factory=dict)  # options of daamkit.trace()
    progress: bool = True

    def settings(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("progress")
        d["trace"] = {k: list(v) if isinstance(v, (tuple, range)) else v for k, v in d["trace"].items()}
        return d


def generate(pipe: Any, prompts: str | Sequence[str], options: GenerateOptions | None = None,
             model: str | None = None) -> list[RunRecord]:
    """Generate ``prompts`` with ``pipe`` inside a trace; one :class:`RunRecord` per image."""
    opts = options or GenerateOptions()
    prompt_list = [prompts] if isinstance(prompts, str) else list(prompts)
    if not prompt_list or any(not p.strip() for p in prompt_list):
        raise ValueError("the prompt is empty: give the text to generate from")
    pipe.set_progress_bar_config(disable=not opts.progress)
    device = getattr(pipe, "device", torch.device("cpu"))
    generator = torch.Generator(device="cpu" if device.type == "mps" else device).manual_seed(opts.seed)
    kwargs: dict[str, Any] = dict(
        num_inference_steps=opts.steps,
        guidance_scale=opts.guidance_scale,
        num_images_per_prompt=opts.num_images_per_prompt,
        generator=generator,
    )
    if opts.height:
        kwargs["height"] = opts.height
    if opts.width:
        kwargs["width"] = opts.width
    if opts.negative_prompt:
        kwargs["negative_prompt"] = [opts.negative_prompt] * len(prompt_list)
    with trace(pipe, **opts.trace) as tc:
        images = pipe(prompt_list, **kwargs).images
        maps = [tc.heat_maps(i) for i in range(tc.num_images)]
    settings = opts.settings() | {"model": model, "pipeline": type(pipe).__name__}
    records = []
    for i, (image, hm) in enumerate(zip(images, maps, strict=True)):
        prompt = prompt_list[i // opts.num_images_per_prompt]
        records.append(
            RunRecord(
                prompt=prompt,
                image=image,
                heat_maps=hm,
                seed=opts.seed,
                settings=settings,
                negative_prompt=opts.negative_prompt,
                meta={"image_index": i},
            )
        )
    return records


def slug(text: str, fallback: str = "word") -> str:
    """A file-name part for ``text``: lower case, runs of anything but a-z and 0-9 as one ``_``, at most
    40 characters; ``fallback`` when nothing is left (the caller names what the text labels)."""
    s = re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")
    return s[:40] or fallback


def write_outputs(record: RunRecord, out_dir: str | Path, words: Sequence[str] | None = None,
                  threshold: float = DEFAULT_THRESHOLD) -> dict[str, Any]:
    """Write the image, each word's heat map and overlay, a grid PNG and the record into ``out_dir``."""
    from daamkit import plot

    out = Path(out_dir)
    (out / "maps").mkdir(parents=True, exist_ok=True)
    (out / "overlays").mkdir(parents=True, exist_ok=True)
    paths: dict[str, Any] = {"words": {}}
    hm = record.heat_maps
    if record.image is not None:
        record.image.save(out / "image.png")
        paths["image"] = str(out / "image.png")
    chosen = list(words) if words else hm.words
    word_maps = [(w, hm.word(w)) for w in chosen]  # raises with the prompt's words if one is unknown
    used: set[str] = set()
    for w, wm in word_maps:
        name = slug(w)
        while name in used:
            name += "_"
        used.add(name)
        entry = {"map": str(plot.save_heat_image(wm, out / "maps" / f"{name}.png"))}
        if record.image is not None:
            entry["overlay"] = str(plot.save_overlay(wm, record.image, out / "overlays" / f"{name}.png"))
        paths["words"][w] = entry
    fig = plot.plot_grid(hm, image=record.image, words=[w for w, _ in word_maps])
    paths["grid"] = str(plot.save_figure(fig, out / "grid.png"))
    st, js = record.save(out / "record")
    paths["record"] = [str(st), str(js)]
    return paths
