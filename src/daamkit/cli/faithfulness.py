"""``daamkit faithfulness --prompt ... --word WORD``: did the word act where its map says? A counterfactual
generation without the word (or with it swapped) and a deletion (or insertion) curve of its attention
inside the map's region against random regions of the same shape, written with plots and
``faithfulness.json``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from daamkit.cli.common import (
    CLIError,
    add_overwrite_option,
    finite_float,
    positive_int,
    seed_int,
    unit_float,
)


def _swap(text: str) -> tuple[str, str]:
    word, sep, repl = text.partition("=")
    if not sep or not word.strip() or not repl.strip():
        raise argparse.ArgumentTypeError(f"must be WORD=REPLACEMENT (e.g. red=blue), got {text!r}")
    return word.strip(), repl.strip()


def _scale(text: str) -> float:
    value = finite_float(text)
    if value < 0 or value == 1:
        raise argparse.ArgumentTypeError(f"must be >= 0 and not 1 (0 deletes the word's attention, > 1 amplifies "
                                         f"it), got {text!r}")
    return value


def _save_png(array: np.ndarray, path: Path) -> str:
    import PIL.Image

    PIL.Image.fromarray(array).save(path)
    return str(path)


def cmd_faithfulness(args: argparse.Namespace) -> int:
    from daamkit.cli.generate import _rebase
    from daamkit.jobs.faithfulness import counterfactual, deletion_curve, edit_prompt
    from daamkit.jobs.generate import check_prompts, parse_size
    from daamkit.jobs.outdir import staged_dir
    from daamkit.jobs.pipeline import check_device, load_pipeline, parse_dtype
    from daamkit.plot import heat_image, plot_counterfactual, plot_deletion_curves, save_figure

    # everything the command line alone decides, before a model loads or a folder is made
    check_prompts(args.prompt)
    swap = None
    if args.swap is not None:
        swap_word, swap = args.swap
        if swap_word.lower() != args.word.lower():
            raise CLIError(f"--swap {swap_word}={swap} must replace the word under test, --word {args.word!r}")
    edit_prompt(args.prompt, args.word, swap)  # the word (and a swap's word) must be in the prompt
    if len(set(args.taus)) != len(args.taus):
        raise CLIError(f"--taus names a value twice: {args.taus}")
    taus = sorted(args.taus)
    height, width = parse_size(args.size)
    parse_dtype(args.dtype)
    check_device(args.device)
    model = args.model
    if model is None:
        from daamkit.world import default_model_path

        model = str(default_model_path())
    elif not str(model).strip():
        raise CLIError("--model is empty: give a local diffusers folder or a checkpoint file")
    call = {"num_inference_steps": args.steps, "guidance_scale": args.guidance}
    if height is not None:
        call.update(height=height, width=width)

    with staged_dir(args.out, overwrite=args.overwrite) as stage:
        final = Path(args.out).expanduser().absolute()
        pipe = load_pipeline(model, device=args.device, dtype=args.dtype, progress=not args.no_progress)
        cf = counterfactual(pipe, args.prompt, args.word, swap=swap, seed=args.seed, method=args.method, **call)
        curve = deletion_curve(pipe, args.prompt, args.word, cf.heat, taus=taus, scale=args.scale, seed=args.seed,
                               random_regions=args.random_regions, rng_seed=args.seed, **call)
        paths = {
            "image": _save_png(cf.image, stage / "image.png"),
            "counterfactual": _save_png(cf.counterfactual, stage / "counterfactual.png"),
            "change": str(stage / "change.png"),
            "map": str(stage / "map.png"),
            "counterfactual_plot": str(save_figure(plot_counterfactual(cf), stage / "counterfactual_plot.png")),
            "curves_plot": str(save_figure(plot_deletion_curves(curve), stage / f"{curve.kind}_curves.png")),
            "edited": [],
        }
        top = float(cf.change.max()) or 1.0
        heat_image(cf.change / top, "magma").save(stage / "change.png")
        heat_image(cf.heat).save(stage / "map.png")
        (stage / "edited").mkdir()
        for tau, image in zip(curve.taus, curve.edited, strict=True):
            paths["edited"].append(_save_png(image, stage / "edited" / f"tau_{tau:g}.png"))
        result = {
            "model": str(model), "prompt": args.prompt, "word": args.word, "seed": args.seed,
            "call": call, "counterfactual": cf.to_json(), "curve": curve.to_json(),
            "files": _rebase(paths, stage, final),
        }
        (stage / "faithfulness.json").write_text(json.dumps(result, indent=2, allow_nan=False))
        (stage / "summary.json").write_text(json.dumps([{"prompt": args.prompt, "word": args.word, "dir": str(final),
                                                         **result["files"]}], indent=2))
    rho = "n/a" if cf.spearman != cf.spearman else f"{cf.spearman:.3f}"
    auc = "n/a" if cf.auc != cf.auc else f"{cf.auc:.3f}"
    print(f"  counterfactual {cf.counterfactual_prompt!r}: Spearman {rho}, AUC {auc} "
          f"({100 * cf.region.mean():.1f}% of pixels changed)")
    for tau, m, r in zip(curve.taus, curve.map_effect, curve.random_effect, strict=True):
        print(f"  {curve.kind} at tau {tau:g}: change inside/outside {m:.3g} (map) vs {r:.3g} (random region)")
    print(f"wrote {final} (images, change and map, plots, faithfulness.json)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser(
        "faithfulness",
        help="does a word act where its map says? a counterfactual without the word (or with it swapped) and a "
             "deletion curve of its attention inside the map's region against random regions",
    )
    f.add_argument("--prompt", required=True, help="the prompt to generate")
    f.add_argument("--word", required=True, help="the word of the prompt under test")
    f.add_argument("--model", default=None,
                   help="local diffusers folder, single-file checkpoint, or the shipped shapes-world model by "
                        "name (world, the default)")
    f.add_argument("--swap", type=_swap, metavar="WORD=REPLACEMENT",
                   help="counterfactual: replace WORD (the --word) by REPLACEMENT instead of removing it, e.g. red=blue")
    f.add_argument("--seed", type=seed_int, default=0, help="seed of every generation (default 0)")
    f.add_argument("--taus", type=unit_float, nargs="+", default=[0.2, 0.4, 0.6, 0.8],
                   help="thresholds of the map's region, in [0, 1] (default 0.2 0.4 0.6 0.8)")
    f.add_argument("--scale", type=_scale, default=0.0,
                   help="factor on the word's attention inside the region: 0 deletes (default), > 1 amplifies "
                        "(an insertion curve)")
    f.add_argument("--random-regions", type=positive_int, default=1,
                   help="random regions of the map region's shape and area per tau (default 1)")
    f.add_argument("--method", choices=["daam", "refined", "ovam"], default="daam",
                   help="the attribution method whose map is tested (default daam)")
    f.add_argument("--steps", type=positive_int, default=20, help="denoising steps (default 20)")
    f.add_argument("--guidance", type=finite_float, default=5.0, help="guidance scale (default 5.0)")
    f.add_argument("--size", help="N or WIDTHxHEIGHT in pixels, multiples of 8 (default: the model's)")
    f.add_argument("--device", default="cpu")
    f.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: as saved)")
    f.add_argument("--out", default="daamkit-faithfulness", help="output folder (default: daamkit-faithfulness)")
    f.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    add_overwrite_option(f)
    f.set_defaults(func=cmd_faithfulness)
