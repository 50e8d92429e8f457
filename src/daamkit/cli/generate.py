"""``daamkit generate`` and ``daamkit demo``: traced generation into a run folder per image."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from daamkit.cli.common import add_generation_options, generate_options

DEMO_PROMPTS = (
    "a red circle and a blue square",
    "a yellow star above a green heart",
    "a small purple triangle",
)


def _run_prompts(pipe, prompts: Sequence[str], args: argparse.Namespace, out: Path, model: str) -> list[dict]:
    from daamkit.jobs.generate import generate, slug, write_outputs

    summary = []
    for k, prompt in enumerate(prompts):
        records = generate(pipe, prompt, generate_options(args), model=model)
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
    from daamkit.jobs.pipeline import load_pipeline

    pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype, config=args.config)
    out = Path(args.out)
    _run_prompts(pipe, args.prompt, args, out, model=str(args.model))
    print(f"wrote {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from daamkit.jobs.pipeline import load_pipeline
    from daamkit.world import default_model_path

    model = args.model or default_model_path()
    pipe = load_pipeline(model, device=args.device, dtype=args.dtype)
    out = Path(args.out)
    print(f"daamkit demo: {len(args.prompt or DEMO_PROMPTS)} prompts on {model}")
    _run_prompts(pipe, list(args.prompt or DEMO_PROMPTS), args, out, model=str(model))
    print(f"wrote {out.resolve()} (images, per-word maps and overlays, grid.png, record.safetensors/json)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="generate images from a local model and write each word's heat map")
    g.add_argument("prompt", nargs="+", help="one or more prompts (quote each)")
    g.add_argument("--model", required=True, help="local diffusers folder or single-file checkpoint")
    g.add_argument("--config", help="for a single-file checkpoint: a local diffusers folder of its architecture")
    g.add_argument("--out", default="daamkit-out", help="output folder (default: daamkit-out)")
    add_generation_options(g, steps=30, guidance=7.5)
    g.set_defaults(func=cmd_generate)

    d = sub.add_parser("demo", help="run the embedded shapes-world model on a few prompts")
    d.add_argument("prompt", nargs="*", help="prompts (default: a few shapes-world scenes)")
    d.add_argument("--model", help="another local model instead of the embedded one")
    d.add_argument("--out", default="daamkit-demo", help="output folder (default: daamkit-demo)")
    add_generation_options(d, steps=20, guidance=5.0)
    d.set_defaults(func=cmd_demo)
