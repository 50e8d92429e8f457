"""``daamkit generate`` and ``daamkit demo``: traced generation into a run folder per image."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from daamkit.cli.common import add_generation_options, check_generation_args

DEMO_PROMPTS = (
    "a red circle and a blue square",
    "a yellow star above a green heart",
    "a small purple triangle",
)


def _rebase(value: Any, stage: Path, final: Path) -> Any:
    """Paths under the staging folder as they will be once it is renamed to ``final``."""
    if isinstance(value, dict):
        return {k: _rebase(v, stage, final) for k, v in value.items()}
    if isinstance(value, list):
        return [_rebase(v, stage, final) for v in value]
    if isinstance(value, str) and value.startswith(str(stage)):
        return str(final) + value[len(str(stage)):]
    return value


def _run(args: argparse.Namespace, model: str, prompts: Sequence[str]) -> Path:
    """Check, load, check against the model, generate into a staging folder that becomes ``--out``
    only when every output is written."""
    from daamkit.jobs.generate import (
        check_against_pipeline,
        generate_with_methods,
        slug,
        split_relations,
        write_outputs,
    )
    from daamkit.jobs.outdir import staged_dir
    from daamkit.jobs.pipeline import load_pipeline

    options = check_generation_args(args)
    with staged_dir(args.out, overwrite=args.overwrite) as stage:
        final = Path(args.out).expanduser().absolute()
        pipe = load_pipeline(model, device=args.device, dtype=args.dtype, config=getattr(args, "config", None),
                             progress=not args.no_progress)
        check_against_pipeline(pipe, options, prompts, words=args.words)
        summary = []
        for k, prompt in enumerate(prompts):
            records = generate_with_methods(pipe, prompt, options, model=model)
            for i, (rec, others) in enumerate(records):
                rel = Path(".") if len(prompts) == 1 and len(records) == 1 else Path(f"{k:02d}_{slug(prompt)}") / f"{i}"
                if len(prompts) > 1 and len(records) == 1:
                    rel = Path(f"{k:02d}_{slug(prompt)}")
                methods, relations = split_relations(others)
                paths = write_outputs(rec, stage / rel, words=args.words, threshold=args.threshold, methods=methods,
                                      relations=relations)
                summary.append(_rebase({"prompt": prompt, "image_index": i, "dir": str(stage / rel), **paths},
                                       stage, final))
                what = f"video of {rec.heat_maps.num_frames} frames" if rec.is_video else "image"
                print(f"  {prompt!r} -> {final / rel}  ({what})  words: {', '.join(rec.heat_maps.words)}")
                if "ovam" in methods:
                    print(f"    open vocabulary (ovam/): {', '.join(methods['ovam'].words)}")
                if relations:
                    print(f"    relations (relations/): {', '.join(relations)}")
                if rec.heat_maps.truncated_words:
                    print("  note: past the token limit, not seen by the model: "
                          f"{', '.join(rec.heat_maps.truncated_words)}")
        (stage / "summary.json").write_text(json.dumps(summary, indent=2))
    return final


def cmd_generate(args: argparse.Namespace) -> int:
    out = _run(args, str(args.model), args.prompt)
    print(f"wrote {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from daamkit.world import default_model_path

    check_generation_args(args)  # before looking for the embedded model
    model = str(args.model or default_model_path())
    prompts = list(args.prompt or DEMO_PROMPTS)
    print(f"daamkit demo: {len(prompts)} prompts on {model}")
    out = _run(args, model, prompts)
    print(f"wrote {out} (images, per-word maps, overlays and masks, grid.png, record.safetensors/json)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="generate images (or videos) from a local model and write each word's heat "
                       "map (video pipelines: video.mp4, overlays/<word>.mp4, overlays/<word>_frames.png, "
                       "frame_scores.png)")
    g.add_argument("prompt", nargs="+", help="one or more prompts (quote each)")
    g.add_argument("--model", required=True, help="local diffusers folder, single-file checkpoint, or the shipped "
                   "shapes-world model by name (world)")
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
