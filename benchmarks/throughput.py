"""Throughput of ``daamkit batch`` (prompts/s) against --batch-size and process count, with the untraced
pipeline's throughput measured in the same run as the baseline; and the disk size of one record.

    python benchmarks/throughput.py                                # tiny SD, 16 prompts, batch 1 2 4 8, 1 and 2 processes
    python benchmarks/throughput.py --model PATH --steps 20 --prompts 64 --processes 1 2 4
    python benchmarks/throughput.py --json runs/throughput.json
    python benchmarks/throughput.py --record-sizes                 # bytes per record: SD 1.5, SDXL, Flux

Model: ``--model PATH``, else the shapes-world model (``daamkit.world.default_model_path()``) if it is
shipped, else the tiny random SD pipeline of the tests (daamkit.testing.pipelines) saved to a temporary folder.

For each process count the driver starts the workers with ``accelerate launch`` (torchrun; gloo on CPU,
one process per GPU with --device cuda) and, on CPU, gives each process cores // N threads. Each worker
loads the pipeline once, warms up, then for every batch size, between barriers:

* untraced: the plain pipeline over its share of the prompts (same per-item generators, no trace, no files)
* traced:   ``daamkit.jobs.batch.run_batch`` into a fresh folder: trace, heat maps, records written, index merged

prompts/s = prompts / wall time of the slowest process (from the barrier before to the barrier after).
The JSON result is the last line of stdout.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("red", "blue", "green", "yellow", "purple", "orange")
SHAPES = ("circle", "square", "triangle", "star", "heart")


def prompts(n: int) -> list[str]:
    return [f"a {WORDS[i % 6]} {SHAPES[i % 5]} and a {WORDS[(i + 2) % 6]} {SHAPES[(i + 3) % 5]}" for i in range(n)]


# -- worker (one per process, started by accelerate launch) ---------------------------------------------
def worker(args: argparse.Namespace) -> None:
    import torch

    from daamkit.jobs.batch import (
        BatchConfig,
        _generate_batch,
        _process_device,
        _state,
        batches,
        read_prompts,
        run_batch,
        shard,
    )
    from daamkit.jobs.pipeline import load_pipeline

    state = _state(args.device)
    device = _process_device(args.device, state)
    pipe = load_pipeline(args.model, device=device, dtype=args.dtype)
    pipe.set_progress_bar_config(disable=True)
    items = read_prompts(args.prompts_file)
    mine = shard(items, state.process_index, state.num_processes)
    cfg = BatchConfig(model=args.model, steps=args.steps, dtype=args.dtype, device=args.device, progress=False)

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    def untraced(group) -> None:
        gens = [torch.Generator(device=pipe.device).manual_seed(it.seed) for it in group]
        pipe([it.prompt for it in group], num_inference_steps=args.steps, guidance_scale=cfg.guidance_scale,
             generator=gens)

    # warm-up: one untraced and one traced call of every batch size
    for bs in args.batch_sizes:
        untraced(mine[:bs])
        _generate_batch(pipe, mine[:bs], cfg)
    sync()
    results = []
    for bs in args.batch_sizes:
        state.wait_for_everyone()
        t0 = time.perf_counter()
        for group in batches(mine, bs):
            untraced(group)
        sync()
        state.wait_for_everyone()
        t_untraced = time.perf_counter() - t0
        cfg.batch_size = bs
        out = Path(args.work) / f"p{state.num_processes}_b{bs}"
        state.wait_for_everyone()
        t0 = time.perf_counter()
        summary = run_batch(items, out, cfg, pipe=pipe, log=lambda m: None)
        t_traced = time.perf_counter() - t0
        assert summary["generated"] == len(items), summary
        results.append({"processes": state.num_processes, "batch_size": bs, "prompts": len(items),
                        "untraced_s": t_untraced, "traced_s": t_traced,
                        "untraced_prompts_per_s": len(items) / t_untraced,
                        "traced_prompts_per_s": len(items) / t_traced,
                        "traced_over_untraced_time": t_traced / t_untraced})
    if state.is_main_process:
        Path(args.result).write_text(json.dumps(results))


# -- driver ---------------------------------------------------------------------------------------------
def default_model(tmp: Path) -> tuple[str, str]:
    try:
        from daamkit.world import default_model_path

        path = default_model_path()
        if path and Path(path).exists():
            return str(path), "shapes-world model"
    except (ImportError, FileNotFoundError, OSError):
        pass
    from daamkit.testing.pipelines import tiny_sd
    from daamkit.testing.tokenizers import clip_tokenizer

    clip_tokenizer(tmp / "tokenizer")
    tiny_sd(str(tmp / "tokenizer")).save_pretrained(tmp / "tiny_sd")
    return str(tmp / "tiny_sd"), "tiny random SD pipeline (daamkit.testing.pipelines: 2-block UNet, 64 px images)"


def run(args: argparse.Namespace) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix="daamkit-throughput-"))
    model, description = (args.model, args.model) if args.model else default_model(tmp)
    pfile = tmp / "prompts.txt"
    pfile.write_text("\n".join(prompts(args.prompts)) + "\n")
    cores = os.cpu_count() or 1
    rows = []
    for n in args.processes:
        result = tmp / f"result_{n}.json"
        common = [str(Path(__file__).resolve()), "--worker", "--model", model, "--prompts-file", str(pfile),
                  "--steps", str(args.steps), "--result", str(result), "--work", str(tmp / "out"),
                  "--batch-sizes", *map(str, args.batch_sizes)]
        if args.device:
            common += ["--device", args.device]
        if args.dtype:
            common += ["--dtype", args.dtype]
        threads = 1 if args.device and args.device.startswith("cuda") else max(1, cores // n)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "HF_HOME": str(tmp / "hf"),
               "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
        if n == 1:
            cmd = [sys.executable, *common]
        else:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                   "--num_cpu_threads_per_process", str(threads), "--main_process_port", "0", *common]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"worker run with {n} process(es) failed:\n{proc.stderr[-4000:]}")
        for r in json.loads(result.read_text()):
            r["threads_per_process"] = threads
            rows.append(r)
            print(f"processes {r['processes']}  batch {r['batch_size']:>2}  untraced {r['untraced_prompts_per_s']:7.2f} "
                  f"prompts/s  traced+saved {r['traced_prompts_per_s']:7.2f} prompts/s  "
                  f"(time x{r['traced_over_untraced_time']:.2f})", flush=True)
        print(f"  (processes {n}: {time.perf_counter() - t0:.0f} s with start-up and warm-up)", flush=True)
    return {"benchmark": "daamkit batch throughput", "model": description, "steps": args.steps,
            "device": args.device or "cpu", "dtype": args.dtype, "cpu_count": cores,
            "platform": platform.platform(), "rows": rows}


# -- disk per record ------------------------------------------------------------------------------------
RECORD_SHAPES = {
    # name: (tokens, grid h, grid w, image h, image w, padding token, word-piece prefix/suffix)
    "SD 1.5 (512 px, 77 CLIP tokens, 64x64 latent grid)": (77, 64, 64, 512, 512, "clip"),
    "SDXL (1024 px, 77 CLIP tokens, 128x128 latent grid)": (77, 128, 128, 1024, 1024, "clip"),
    "Flux (1024 px, 512 T5 tokens, 64x64 packed latent grid)": (512, 64, 64, 1024, 1024, "t5"),
}


def record_sizes() -> dict:
    """Save one record of each shape with random maps and a random image and measure the files."""
    import numpy as np
    import PIL.Image
    import torch
    from safetensors.torch import save as st_save

    from daamkit.heatmap import GlobalHeatMap
    from daamkit.io.record import RunRecord
    from daamkit.tokens import TokenAlignment, Word

    prompt = "a photograph of an astronaut riding a horse on the moon, highly detailed"
    words = [w.strip(",") for w in prompt.split()]
    out = {}
    tmp = Path(tempfile.mkdtemp(prefix="daamkit-record-size-"))
    for name, (T, h, w, H, W, kind) in RECORD_SHAPES.items():
        if kind == "clip":
            toks = ["<|startoftext|>", *(f"{x}</w>" for x in words), ",</w>"] + ["<|endoftext|>"] * (T - len(words) - 2)
            positions = list(range(1, len(words) + 1))
        else:
            toks = [f"\u2581{x}" for x in words] + [","] + ["</s>"] + ["<pad>"] * (T - len(words) - 2)
            positions = list(range(len(words)))
        seen: dict[str, int] = {}
        wl = []
        for i, (x, p) in enumerate(zip(words, positions, strict=True)):
            wl.append(Word(x, i, seen.get(x, 0), (p,), False, False))
            seen[x] = seen.get(x, 0) + 1
        alignment = TokenAlignment(tuple(toks), tuple(wl), T, prompt)
        g = torch.Generator().manual_seed(0)
        maps = torch.rand(T, h, w, generator=g)
        meta = {"family": "unet" if kind == "clip" else "flux", "pipeline": "StableDiffusionPipeline",
                "branch": "cond", "image_index": 0, "num_steps": 30, "cfg": True, "latent_hw": [h, w],
                "layers": [f"up_blocks.{i}.attentions.{j}.transformer_blocks.0.attn2" for i in range(1, 4) for j in range(3)]
                + [f"down_blocks.{i}.attentions.{j}.transformer_blocks.0.attn2" for i in range(3) for j in range(2)]
                + ["mid_block.attentions.0.transformer_blocks.0.attn2"],
                "config": {"steps": None, "layers": None, "factors": None, "heads": None, "keep_steps": False,
                           "keep_layers": False, "keep_heads": False, "negative": False, "mode": "daam", "grid": None},
                "selection": {"steps": None, "layers": None, "heads": None}}
        hm = GlobalHeatMap(maps, alignment, (H, W), meta)
        image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (H, W, 3), dtype=np.uint8))
        settings = {"steps": 30, "seed": 0, "height": H, "width": W, "guidance_scale": 7.5, "negative_prompt": None,
                    "num_images_per_prompt": 1, "trace": {"mode": "daam"}, "model": "/models/some-model",
                    "pipeline": "StableDiffusionPipeline", "dtype": "float16"}
        rec = RunRecord(prompt, image, hm, seed=0, settings=settings, meta={"batch_id": "000000", "batch_index": 0,
                                                                              "words": None, "item": {}})
        st, js = rec.save(tmp / "with_image")
        st2, js2 = RunRecord(prompt, None, hm, seed=0, settings=settings).save(tmp / "no_image")
        fp16_maps = len(st_save({"maps": maps.half()}))  # what maps stored as float16 would take (not the format)
        fp32_maps = len(st_save({"maps": maps}))
        out[name] = {
            "maps_shape": [T, h, w], "image_shape": [H, W, 3],
            "with_image_bytes": st.stat().st_size + js.stat().st_size,
            "safetensors_bytes": st.stat().st_size, "json_bytes": js.stat().st_size,
            "no_image_bytes": st2.stat().st_size + js2.stat().st_size,
            "maps_fp32_bytes": fp32_maps, "maps_fp16_bytes_hypothetical": fp16_maps,
        }
        r = out[name]
        print(f"{name}: {r['with_image_bytes'] / 2**20:.2f} MiB per record with the image "
              f"(safetensors {r['safetensors_bytes']:,} B + JSON {r['json_bytes']:,} B), "
              f"{r['no_image_bytes'] / 2**20:.2f} MiB with --no-image; maps alone fp32 {fp32_maps / 2**20:.2f} MiB, "
              f"fp16 would be {fp16_maps / 2**20:.2f} MiB", flush=True)
    return {"benchmark": "daamkit record size", "records": out}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="local diffusers folder (default: shapes-world model if shipped, else tiny SD)")
    p.add_argument("--prompts", type=int, default=16, help="number of prompts (default 16)")
    p.add_argument("--steps", type=int, default=8, help="denoising steps (default 8)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    p.add_argument("--device", help="cpu (default) or cuda (one process per GPU)")
    p.add_argument("--dtype", help="float16 / bfloat16 / float32")
    p.add_argument("--json", help="also write the result to this file")
    p.add_argument("--record-sizes", action="store_true", help="only measure the disk size of one record")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--prompts-file", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return
    result = record_sizes() if args.record_sizes else run(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
