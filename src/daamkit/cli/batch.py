"""``daamkit batch``: trace every prompt of a prompt file; the same command runs under ``accelerate launch``
(``accelerate launch -m daamkit batch ...``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from daamkit.cli.common import CLIError, add_trace_options, parse_size, positive_int, trace_kwargs
from daamkit.jobs.batch import FORMATS, BatchConfig, read_prompts, run_batch


def register(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser("batch", help="trace every prompt of a prompt file (text, JSONL, CSV); works under accelerate launch")
    add_arguments(b)
    b.set_defaults(func=main)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of ``daamkit batch`` (added to the ``batch`` subparser of ``daamkit.cli``)."""
    p.add_argument("prompts", help="prompt file: text (one per line), .jsonl (prompt, id, seed, size, words, "
                   "negative_prompt, meta) or .csv (a 'prompt' column)")
    p.add_argument("--model", required=True, help="local diffusers folder or single-file checkpoint")
    p.add_argument("--config", help="for a single-file checkpoint: a local diffusers folder of its architecture")
    p.add_argument("--out", required=True, help="output folder: records/<id>.safetensors|json and index.jsonl")
    p.add_argument("--format", choices=FORMATS, help="prompt file format (default: from the suffix)")
    p.add_argument("--batch-size", type=int, default=1, help="prompts per pipeline call in each process (default 1)")
    p.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    p.add_argument("--seed", type=int, default=0, help="prompts without a seed get SEED + their index (default 0)")
    p.add_argument("--size", help="default N or WIDTHxHEIGHT for prompts without one (default: the model's)")
    p.add_argument("--guidance", type=float, default=7.5, help="guidance scale (default 7.5)")
    p.add_argument("--device", default=None,
                   help="default: each process's accelerate device (cuda:<local rank>, or cpu)")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: as saved)")
    p.add_argument("--no-image", action="store_true",
                   help="do not store the generated image (a video's frames) in the records")
    p.add_argument("--num-frames", type=positive_int,
                   help="video pipelines: frames per video (default: the pipeline's; Wan wants 4k+1, e.g. 81)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--overwrite", action="store_true",
                   help="let this command take over an --out made from another prompt file or with other settings: "
                   "the old index goes, records of ids not in PROMPTS are deleted, records that still match are kept "
                   "and the rest regenerated (without it such an --out is refused)")
    add_trace_options(p)


def config_from_args(args: argparse.Namespace) -> BatchConfig:
    if args.batch_size < 1:
        raise CLIError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.steps < 1:
        raise CLIError(f"--steps must be at least 1, got {args.steps}")
    h, w = parse_size(args.size)
    return BatchConfig(model=str(args.model), steps=args.steps, guidance_scale=args.guidance, height=h, width=w,
                       trace=trace_kwargs(args), dtype=args.dtype, device=args.device, batch_size=args.batch_size,
                       save_image=not args.no_image, progress=not args.no_progress, config=args.config,
                       num_frames=args.num_frames)


def main(args: argparse.Namespace) -> int:
    """``daamkit batch``: the function the CLI calls with the parsed arguments."""
    config = config_from_args(args)
    items = read_prompts(args.prompts, base_seed=args.seed, fmt=args.format)
    if not Path(args.model).expanduser().exists():  # before anything is written to --out
        from daamkit.jobs.pipeline import ModelLoadError

        raise ModelLoadError(f"model path {str(args.model)!r} does not exist (daamkit loads local models only, "
                             "it never downloads)")
    run_batch(items, args.out, config, source=str(Path(args.prompts).resolve()), overwrite=args.overwrite)
    return 0
