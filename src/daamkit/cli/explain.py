"""``daamkit explain IMAGE --prompt ... --model ...``: per-word maps for an existing image (a photo, an
image made elsewhere), from tracing the model's denoising of the noised or inverted image."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from daamkit.cli.common import (
    CLIError,
    add_overwrite_option,
    add_trace_options,
    finite_float,
    open_vocabulary,
    positive_int,
    seed_int,
    trace_kwargs,
)


def strength_float(text: str) -> float:
    value = finite_float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1] (the fraction of the schedule the image is noised "
                                         f"by), got {text!r}")
    return value


def cmd_explain(args: argparse.Namespace) -> int:
    from daamkit.cli.generate import _rebase
    from daamkit.jobs.explain import check_strength, explain, load_image, size_multiple
    from daamkit.jobs.generate import GenerateOptions, check_against_pipeline, check_prompts, write_outputs
    from daamkit.jobs.outdir import staged_dir
    from daamkit.jobs.pipeline import check_device, load_pipeline, parse_dtype

    # everything the command line alone decides, before a model loads or a folder is made
    prompt = args.prompt
    check_prompts(prompt)
    if args.words is not None and any(not w.strip() for w in args.words):
        raise CLIError("--words holds an empty word: give words of the prompt")
    vocabulary = open_vocabulary(args)
    if not str(args.model).strip():
        raise CLIError("--model is empty: give a local diffusers folder or a checkpoint file")
    parse_dtype(args.dtype)
    check_device(args.device)
    check_strength(args.strength, args.steps)
    load_image(args.image)
    trace_options = trace_kwargs(args)
    traced_steps = int(args.steps * args.strength)
    options = GenerateOptions(steps=traced_steps, seed=args.seed, guidance_scale=args.guidance,
                              negative_prompt=args.negative_prompt, trace=trace_options,
                              open_vocabulary=vocabulary)
    options.check()

    with staged_dir(args.out, overwrite=args.overwrite) as stage:
        final = Path(args.out).expanduser().absolute()
        pipe = load_pipeline(args.model, device=args.device, dtype=args.dtype, config=args.config,
                             progress=not args.no_progress)
        image = load_image(args.image, size_multiple(pipe))
        check_against_pipeline(pipe, options, prompt, words=args.words)
        result = explain(pipe, image, prompt, strength=args.strength, inversion=args.inversion, steps=args.steps,
                         guidance_scale=args.guidance, seed=args.seed, negative_prompt=args.negative_prompt,
                         trace_options=trace_options, open_vocabulary=vocabulary, progress=not args.no_progress)
        record = result.record(model=str(args.model))
        record.settings["source"] = str(Path(args.image).expanduser().absolute())
        paths = write_outputs(record, stage, words=args.words, threshold=args.threshold, methods=result.methods)
        result.regenerated.save(stage / "regenerated.png")
        paths["regenerated"] = str(stage / "regenerated.png")
        rebased = _rebase(paths, stage, final)
        summary = [{"prompt": prompt, "image_index": 0, "dir": str(final), "source": record.settings["source"],
                    "strength": args.strength, "inversion": args.inversion, **rebased}]
        (stage / "summary.json").write_text(json.dumps(summary, indent=2))
    how = "DDIM inversion" if args.inversion == "ddim" else "noise"
    print(f"  {prompt!r}: {how} at strength {args.strength:g}, {result.settings['traced_steps']} traced steps  "
          f"words: {', '.join(result.heat_maps.words)}")
    if "ovam" in result.methods:
        print(f"    open vocabulary (ovam/): {', '.join(result.methods['ovam'].words)}")
    print(f"wrote {final} (the image, per-word maps, overlays and masks, grid.png, regenerated.png, record)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "explain",
        help="per-word maps for an existing image: noise it (or DDIM-invert it) and trace the model's denoising "
             "toward the prompt; the maps say how the model would denoise this image, not how it was made",
    )
    e.add_argument("image", help="the image file to explain (sides multiples of 8 pixels; 16 for transformer models)")
    e.add_argument("--prompt", required=True, help="the text whose words are mapped onto the image")
    e.add_argument("--model", required=True, help="local diffusers folder or single-file checkpoint")
    e.add_argument("--config", help="for a single-file checkpoint: a local diffusers folder of its architecture")
    e.add_argument("--out", default="daamkit-explain", help="output folder (default: daamkit-explain)")
    e.add_argument("--strength", type=strength_float, default=0.5,
                   help="how far to noise the image, in (0, 1] (default 0.5): low keeps the image but gives few, "
                        "weak steps; high gives the model room but lets it drift from the image")
    e.add_argument("--inversion", choices=["ddim"],
                   help="'ddim': invert the image deterministically with DDIM instead of adding random noise "
                        "(Stable Diffusion 1.x/2.x UNets with an epsilon model)")
    e.add_argument("--steps", type=positive_int, default=30,
                   help="steps of the full schedule (default 30); steps x strength of them are traced")
    e.add_argument("--seed", type=seed_int, default=0, help="seed of the added noise (unused with --inversion)")
    e.add_argument("--guidance", type=finite_float, default=7.5, help="guidance scale (default 7.5)")
    e.add_argument("--negative-prompt")
    e.add_argument("--device", default="cpu")
    e.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: as saved)")
    e.add_argument("--words", nargs="+", help="words to map (default: every word of the prompt)")
    e.add_argument("--open-vocabulary", metavar="WORDS",
                   help="comma-separated words, which need not be in the prompt, to map with OVAM; written to ovam/")
    e.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    add_overwrite_option(e)
    add_trace_options(e)
    e.set_defaults(func=cmd_explain)
