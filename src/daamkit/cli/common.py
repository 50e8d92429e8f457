"""Options and parsers shared by several commands."""

from __future__ import annotations

import argparse

from daamkit.errors import InputError
from daamkit.jobs.generate import GenerateOptions, parse_size, parse_steps
from daamkit.metrics import DEFAULT_THRESHOLD


class CLIError(InputError):
    """A command-line value is not allowed."""


def add_trace_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("attribution")
    g.add_argument("--layers", nargs="+", help="keep only these layers: down/mid/up, a name prefix or full name")
    g.add_argument("--factors", nargs="+", type=int, help="keep layers at these downsampling factors (1,2,4,8)")
    g.add_argument("--steps-range", help="denoising steps to aggregate: START:END or a comma list")
    g.add_argument("--heads", nargs="+", type=int, help="attention heads to aggregate")
    g.add_argument("--mode", choices=["daam", "reference"], default="daam",
                   help="'reference' reproduces PyPI daam 0.2.0's aggregation")
    g.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"tau for the binarised masks (default {DEFAULT_THRESHOLD})")


def add_generation_options(p: argparse.ArgumentParser, steps: int, guidance: float) -> None:
    p.add_argument("--steps", type=int, default=steps, help=f"denoising steps (default {steps})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", help="N or WIDTHxHEIGHT in pixels (default: the model's)")
    p.add_argument("--guidance", type=float, default=guidance, help=f"guidance scale (default {guidance})")
    p.add_argument("--negative-prompt")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: as saved)")
    p.add_argument("--words", nargs="+", help="words to map (default: every word of the prompt)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_trace_options(p)


def trace_kwargs(args: argparse.Namespace) -> dict:
    kw: dict = {"mode": args.mode}
    if args.layers:
        kw["layers"] = tuple(args.layers)
    if args.factors:
        kw["factors"] = tuple(args.factors)
    if args.heads:
        kw["heads"] = tuple(args.heads)
    steps = parse_steps(args.steps_range)
    if steps is not None:
        kw["steps"] = steps
    return kw


def generate_options(args: argparse.Namespace) -> GenerateOptions:
    h, w = parse_size(args.size)
    return GenerateOptions(
        steps=args.steps,
        seed=args.seed,
        height=h,
        width=w,
        guidance_scale=args.guidance,
        negative_prompt=args.negative_prompt,
        num_images_per_prompt=args.num_images,
        trace=trace_kwargs(args),
        progress=not args.no_progress,
    )
