"""``daamkit`` command line: generate, demo, batch, ui, eval, syntax, entangle, pos, world (one subcommand per job)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

DEMO_PROMPTS = (
    "a red circle and a blue square",
    "a yellow star above a green heart",
    "a small purple triangle",
)


class CLIError(Exception):
    pass


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
        raise CLIError(f"--size must be N or WIDTHxHEIGHT (e.g. 512 or 768x512), got {text!r}") from None
    if w <= 0 or h <= 0 or w % 8 or h % 8:
        raise CLIError(f"--size must be positive multiples of 8, got {text!r}")
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
        raise CLIError(f"--steps-range must be START:END or a comma list of step indices, got {text!r}") from None


def _add_trace_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("attribution")
    g.add_argument("--layers", nargs="+", help="keep only these layers: down/mid/up, a name prefix or full name")
    g.add_argument("--factors", nargs="+", type=int, help="keep layers at these downsampling factors (1,2,4,8)")
    g.add_argument("--steps-range", help="denoising steps to aggregate: START:END or a comma list")
    g.add_argument("--heads", nargs="+", type=int, help="attention heads to aggregate")
    g.add_argument("--mode", choices=["daam", "reference"], default="daam",
                   help="'reference' reproduces PyPI daam 0.2.0's aggregation")
    g.add_argument("--threshold", type=float, default=0.4, help="tau for the binarised masks (default 0.4)")


def _add_generation_options(p: argparse.ArgumentParser, steps: int, guidance: float) -> None:
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
    _add_trace_options(p)


def _trace_kwargs(args: argparse.Namespace) -> dict:
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


def _options(args: argparse.Namespace):
    from .generate import GenerateOptions

    h, w = parse_size(args.size)
    return GenerateOptions(
        steps=args.steps,
        seed=args.seed,
        height=h,
        width=w,
        guidance_scale=args.guidance,
        negative_prompt=args.negative_prompt,
        num_images_per_prompt=args.num_images,
        trace=_trace_kwargs(args),
        progress=not args.no_progress,
    )


def _run_prompts(pipe, prompts: Sequence[str], args: argparse.Namespace, out: Path, model: str) -> list[dict]:
    from .generate import generate, slug, write_outputs

    summary = []
    for k, prompt in enumerate(prompts):
        records = generate(pipe, prompt, _options(args), model=model)
        for i, rec in enumerate(records):
            sub = out if len(prompts) == 1 and len(records) == 1 else out / f"{k:02d}_{slug(prompt)}" / f"{i}"
            if len(prompts) > 1 and len(records) == 1:
                sub = out / f"{k:02d}_{slug(prompt)}"
            paths = write_outputs(rec, sub, words=args.words, threshold=args.threshold)
            summary.append({"prompt": prompt, "image_index": i, "dir": str(sub), **paths})
            print(f"  {prompt!r} -> {sub}  words: {', '.join(rec.heat_maps.words)}")
            if rec.heat_maps.truncated_words:
                print(f"  note: past the token limit, not seen by the model: {', '.join(rec.heat_maps.truncated_words)}")
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def cmd_generate(args: argparse.Namespace) -> int:
    from .models import load_pipeline

    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype, config=args.config)
    out = Path(args.out)
    _run_prompts(pipe, args.prompt, args, out, model=str(args.model))
    print(f"wrote {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .models import load_pipeline
    from .world import default_model_path

    model = args.model or default_model_path()
    pipe = load_pipeline(model, device=args.device, dtype=args.dtype)
    out = Path(args.out)
    print(f"daamkit demo: {len(args.prompt or DEMO_PROMPTS)} prompts on {model}")
    _run_prompts(pipe, list(args.prompt or DEMO_PROMPTS), args, out, model=str(model))
    print(f"wrote {out.resolve()} (images, per-word maps and overlays, grid.png, record.safetensors/json)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluate.protocol import evaluate_records, evaluate_world

    tau = args.threshold  # the headline tau (default 0.4); --taus is the sweep
    taus = tuple(sorted(set(args.taus) | {tau}))
    if args.runs:
        from .runs import load_runs

        result = evaluate_records(load_runs(args.runs), taus=taus)
        result.settings = {"runs": str(args.runs)}
    else:
        from .models import load_pipeline
        from .world import default_model_path

        model = args.model or default_model_path()
        pipe = load_pipeline(model, device=args.device, dtype=args.dtype)
        result = evaluate_world(pipe, n=args.n, seed=args.seed, steps=args.steps, guidance_scale=args.guidance,
                                taus=taus, batch_size=args.batch_size, progress=not args.no_progress,
                                trace_options=_trace_kwargs(args))
        result.settings["model"] = str(model)
    paths = result.save(args.out, tau=tau)
    print(result.markdown(tau))
    print(f"wrote {paths['markdown']}, {paths['json']}, {paths['plot']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="daamkit", description="Per-word attribution maps for diffusers pipelines")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate images from a local model and write each word's heat map")
    g.add_argument("prompt", nargs="+", help="one or more prompts (quote each)")
    g.add_argument("--model", required=True, help="local diffusers folder or single-file checkpoint")
    g.add_argument("--config", help="for a single-file checkpoint: a local diffusers folder of its architecture")
    g.add_argument("--out", default="daamkit-out", help="output folder (default: daamkit-out)")
    _add_generation_options(g, steps=30, guidance=7.5)
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="run the embedded shapes-world model on a few prompts")
    d.add_argument("prompt", nargs="*", help="prompts (default: a few shapes-world scenes)")
    d.add_argument("--model", help="another local model instead of the embedded one")
    d.add_argument("--out", default="daamkit-demo", help="output folder (default: daamkit-demo)")
    _add_generation_options(d, steps=20, guidance=5.0)
    d.set_defaults(func=cmd_demo)

    from . import batch as batch_cmd

    b = sub.add_parser("batch", help="trace every prompt of a prompt file (text, JSONL, CSV); works under accelerate launch")
    batch_cmd.add_arguments(b)
    b.set_defaults(func=batch_cmd.main)

    from .ui import add_arguments as ui_add_arguments
    from .ui import main as ui_main

    u = sub.add_parser("ui", help="a local web app: type a prompt, click a word, see its heat map")
    ui_add_arguments(u)
    u.set_defaults(func=ui_main)

    e = sub.add_parser("eval", help="COCO-Gen style mIoU of noun/colour maps on the shapes world")
    e.add_argument("--model", help="model to evaluate (default: the embedded shapes-world model)")
    e.add_argument("--runs", help="score a runs directory of saved records instead of generating")
    e.add_argument("--n", type=int, default=200, help="held-out captions to generate (default 200)")
    e.add_argument(
        "--seed",
        type=int,
        default=0,
        help="first held-out scene: captions are scenes SEED .. SEED+N-1, image i is generated with seed "
        "SEED+i; two caption sets are disjoint only when their seeds differ by at least N (e.g. --seed 0 "
        "and --seed 200 with --n 200)",
    )
    e.add_argument("--steps", type=int, default=20)
    e.add_argument("--guidance", type=float, default=5.0)
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--taus", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5, 0.6, 0.7], help="tau sweep")
    e.add_argument("--device", default="cpu")
    e.add_argument("--dtype", default=None)
    e.add_argument("--out", default="daamkit-eval")
    e.add_argument("--no-progress", action="store_true")
    _add_trace_options(e)
    e.set_defaults(func=cmd_eval)

    from .analysis import entanglement as _entangle
    from .analysis import pos as _pos
    from .analysis import syntax as _syntax

    for name, mod, help_ in (
        ("syntax", _syntax, "head/dependent map overlap per dependency relation, from saved runs"),
        ("entangle", _entangle, "co-hyponym pairs and adjective spread (generates, or scores --runs)"),
        ("pos", _pos, "attention mass per part of speech, from saved runs"),
    ):
        a = sub.add_parser(name, help=help_)
        mod.add_arguments(a)
        a.set_defaults(func=mod.main)

    try:
        from .world.train import cli_args as world_train
    except ImportError:  # the world package is optional at import time of the CLI
        world_train = None
    if world_train is not None:
        w = sub.add_parser("world", help="the shapes world: train the embedded model")
        wsub = w.add_subparsers(dest="world_command", required=True)
        t = wsub.add_parser("train", help="train the shapes-world model from scratch")
        world_train.add_arguments(t)
        t.set_defaults(func=world_train.main_from_args)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    from .models import ModelLoadError
    from .tokens import WordNotFoundError
    from .trace import TraceError, UnsupportedPipelineError

    try:
        return int(args.func(args) or 0)
    except (CLIError, ModelLoadError, UnsupportedPipelineError, TraceError, WordNotFoundError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"daamkit: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("daamkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
