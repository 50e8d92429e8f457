"""Options and parsers shared by several commands."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from daamkit.errors import InputError
from daamkit.jobs.generate import GenerateOptions, check_prompts, parse_size, parse_steps
from daamkit.metrics import DEFAULT_THRESHOLD


class CLIError(InputError):
    """A command-line value is not allowed."""


# argparse types: a bad value ends in argparse's error naming the option (one line, see cli.main)

def at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number of at least {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def unit_float(text: str) -> float:
    """A value in [0, 1] (a threshold on the normalised map)."""
    value = finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1] (it applies to the map scaled to its maximum), "
                                         f"got {text!r}")
    return value


def fps_float(text: str) -> float:
    from daamkit.video import MAX_FPS

    value = finite_float(text)
    if not 0 < value <= MAX_FPS:
        raise argparse.ArgumentTypeError(f"must lie in (0, {MAX_FPS:g}] frames per second, got {text!r}")
    return value


def seed_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, got {text!r}") from None
    if not 0 <= value < 2**64:
        raise argparse.ArgumentTypeError(f"must lie in 0 .. 2**64-1, got {value}")
    return value


positive_int = at_least(1)


def add_trace_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("attribution")
    g.add_argument("--layers", nargs="+", help="keep only these layers: down/mid/up, a name prefix or full name")
    g.add_argument("--factors", nargs="+", type=positive_int, help="keep layers at these downsampling factors (1,2,4,8)")
    g.add_argument("--steps-range", help="denoising steps to aggregate: START:END or a comma list")
    g.add_argument("--heads", nargs="+", type=at_least(0), help="attention heads to aggregate")
    g.add_argument("--mode", choices=["daam", "reference"], default="daam",
                   help="'reference' reproduces PyPI daam 0.2.0's aggregation")
    g.add_argument("--probabilities", choices=["text", "model"], default="text",
                   help="joint-attention models: softmax over the text keys only ('text', default) or the "
                        "model's own softmax over every key ('model'); UNet cross-attention is the same either way")
    g.add_argument("--threshold", type=unit_float, default=DEFAULT_THRESHOLD,
                   help=f"tau in [0, 1] for the binarised masks (default {DEFAULT_THRESHOLD})")


def add_generation_options(p: argparse.ArgumentParser, steps: int, guidance: float) -> None:
    p.add_argument("--steps", type=positive_int, default=steps, help=f"denoising steps (default {steps})")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--size", help="N or WIDTHxHEIGHT in pixels, multiples of 8 (default: the model's)")
    p.add_argument("--guidance", type=finite_float, default=guidance, help=f"guidance scale (default {guidance})")
    p.add_argument("--negative-prompt")
    p.add_argument("--num-images", type=positive_int, default=1, help="images (videos) per prompt")
    p.add_argument("--num-frames", type=positive_int,
                   help="video pipelines: frames to generate (default: the pipeline's; Wan wants 4k+1, e.g. 81)")
    p.add_argument("--fps", type=fps_float, help="video pipelines: frames per second of the written videos "
                   "(default: the model's usual rate, e.g. 16 for Wan)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: as saved)")
    p.add_argument("--words", nargs="+", help="words to map (default: every word of the prompt)")
    p.add_argument("--open-vocabulary", metavar="WORDS",
                   help="comma-separated words, which need not be in the prompt, to map with OVAM (e.g. "
                        "'cat,grass'); written to ovam/ beside the DAAM maps (cross-attention models)")
    p.add_argument("--relations", metavar="KINDS",
                   help="comma-separated relation maps to write to relations/ beside the word maps: "
                        "image->image (where --query / --query-box attends in the image; UNets and joint "
                        "transformers) and text->text (prompt token to token; joint transformers)")
    q = p.add_mutually_exclusive_group()
    q.add_argument("--query", metavar="X,Y", help="image->image: the point it looks from, in pixels of the image")
    q.add_argument("--query-box", metavar="X0,Y0,X1,Y1",
                   help="image->image: the box it looks from, in pixels (x0 <= x < x1, y0 <= y < y1)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    add_overwrite_option(p)
    add_trace_options(p)


def add_overwrite_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace an earlier result in --out entirely (without it, a folder that holds files is refused)")


def trace_kwargs(args: argparse.Namespace) -> dict:
    kw: dict = {"mode": args.mode}
    if args.probabilities != "text":
        kw["probabilities"] = args.probabilities
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


def check_generation_args(args: argparse.Namespace) -> GenerateOptions:
    """Everything the command line alone decides, checked before a model loads; the options."""
    if args.prompt:  # demo's default prompts are used when none is given
        check_prompts(args.prompt)
    if args.words is not None and any(not w.strip() for w in args.words):
        raise CLIError("--words holds an empty word: give words of the prompt")
    open_vocabulary(args)
    if args.model is not None and not str(args.model).strip():
        raise CLIError("--model is empty: give a local diffusers folder or a checkpoint file")
    from daamkit.jobs.pipeline import check_device, parse_dtype

    parse_dtype(args.dtype)
    check_device(args.device)
    return generate_options(args)


def open_vocabulary(args: argparse.Namespace) -> list[str]:
    """The words of ``--open-vocabulary`` ([] when not given)."""
    text = getattr(args, "open_vocabulary", None)
    if text is None:
        return []
    words = [w.strip() for w in text.split(",")]
    if not any(words) or any(not w for w in words):
        raise CLIError(f"--open-vocabulary holds an empty word ({text!r}): give comma-separated words, e.g. 'cat,grass'")
    if len(set(words)) != len(words):
        raise CLIError(f"--open-vocabulary names a word twice ({text!r})")
    return words


def relation_args(args: argparse.Namespace) -> tuple[list[str], tuple[float, float] | None,
                                                     tuple[float, float, float, float] | None]:
    """(relations, query point (y, x), query box (y0, x0, y1, x1)) of ``--relations``, ``--query X,Y`` and
    ``--query-box X0,Y0,X1,Y1``."""
    text = getattr(args, "relations", None)
    kinds: list[str] = []
    if text is not None:
        kinds = [k.strip() for k in text.split(",")]
        if not any(kinds) or any(not k for k in kinds):
            raise CLIError(f"--relations holds an empty kind ({text!r}): give image->image and/or text->text, "
                           "comma-separated")

    def numbers(option: str, value: str | None, n: int, form: str) -> list[float] | None:
        if value is None:
            return None
        try:
            vals = [float(v) for v in value.split(",")]
        except ValueError:
            vals = []
        if len(vals) != n or not all(math.isfinite(v) for v in vals):
            raise CLIError(f"{option} must be {form} in pixels of the generated image, got {value!r}")
        return vals

    point = numbers("--query", getattr(args, "query", None), 2, "X,Y (e.g. 120,300)")
    box = numbers("--query-box", getattr(args, "query_box", None), 4, "X0,Y0,X1,Y1 (e.g. 10,20,200,240)")
    return (kinds, (point[1], point[0]) if point else None,
            (box[1], box[0], box[3], box[2]) if box else None)


def generate_options(args: argparse.Namespace) -> GenerateOptions:
    h, w = parse_size(args.size)
    opts = GenerateOptions(
        steps=args.steps,
        seed=args.seed,
        height=h,
        width=w,
        guidance_scale=args.guidance,
        negative_prompt=args.negative_prompt,
        num_images_per_prompt=args.num_images,
        trace=trace_kwargs(args),
        progress=not args.no_progress,
        num_frames=getattr(args, "num_frames", None),
        fps=getattr(args, "fps", None),
        open_vocabulary=open_vocabulary(args),
    )
    opts.relations, opts.query, opts.query_box = relation_args(args)
    opts.check()
    return opts
