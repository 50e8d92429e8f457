"""``daamkit eval``: the COCO-Gen protocol on the shapes world, or on saved records."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from daamkit.cli.common import (
    CLIError,
    add_overwrite_option,
    add_trace_options,
    at_least,
    finite_float,
    positive_int,
    seed_int,
    trace_kwargs,
    unit_float,
)


def cmd_eval(args: argparse.Namespace) -> int:
    from daamkit.evaluate.protocol import evaluate_records, evaluate_world, select_methods
    from daamkit.jobs.outdir import check_out_dir, save_result

    check_out_dir(args.out, overwrite=args.overwrite)  # before the work, not after it
    # the names are checked before a model loads; whether each applies is decided once it has
    methods, _ = select_methods(args.methods)
    tau = args.threshold  # the headline tau (default 0.4); --taus is the sweep
    taus = tuple(sorted(set(args.taus) | {tau}))
    if args.runs:
        from daamkit.io.runs import load_runs

        if args.faithfulness:
            raise CLIError("--faithfulness applies when eval generates the images (its tests generate again); "
                           "leave it out with --runs")
        if methods != ["daam"]:
            raise CLIError("--methods applies when eval generates the images; --runs scores the DAAM maps its "
                           "records hold (leave --methods out)")

        result = evaluate_records(load_runs(args.runs), taus=taus)
        result.settings = {"runs": str(args.runs)}
        if result.skipped:
            # a damaged record costs its own line, not the evaluation of all the others
            print(f"daamkit eval: skipped {len(result.skipped)} run(s) of {args.runs} (listed in eval.json):",
                  file=sys.stderr)
            for item in result.skipped[:20]:
                print(f"  {item['id']}: {item['reason']}", file=sys.stderr)
            if len(result.skipped) > 20:
                print(f"  ... and {len(result.skipped) - 20} more", file=sys.stderr)
    else:
        from daamkit.jobs.generate import GenerateOptions, check_against_pipeline
        from daamkit.jobs.pipeline import load_pipeline
        from daamkit.world import default_model_path

        model = args.model or default_model_path()
        pipe = load_pipeline(model, device=args.device, dtype=args.dtype, progress=not args.no_progress)
        check_against_pipeline(pipe, GenerateOptions(steps=args.steps, trace=trace_kwargs(args)))
        result = evaluate_world(pipe, n=args.n, seed=args.seed, steps=args.steps, guidance_scale=args.guidance,
                                taus=taus, batch_size=args.batch_size, progress=not args.no_progress,
                                trace_options=trace_kwargs(args), methods=args.methods)
        result.settings["model"] = str(model)
        for note in result.notes:
            print(f"daamkit eval: {note}", file=sys.stderr)
        if args.faithfulness:
            from daamkit.evaluate.faithfulness import evaluate_faithfulness

            faith = evaluate_faithfulness(pipe, n=min(args.faithfulness, args.n), seed=args.seed, steps=args.steps,
                                          guidance_scale=args.guidance, taus=args.faithfulness_taus,
                                          batch_size=args.batch_size, methods=args.methods,
                                          trace_options=trace_kwargs(args), progress=not args.no_progress)
            faith.settings["model"] = str(model)

    def write(folder: Path) -> dict[str, str]:
        paths = result.save(folder, tau=tau)
        if not args.runs and args.faithfulness:
            paths |= {f"faithfulness_{k}": v for k, v in faith.save(folder, tau=tau).items()}
        return paths

    paths = save_result(args.out, write, command="eval", overwrite=args.overwrite, settings=result.settings)
    print(result.markdown(tau))
    print(f"wrote {paths['markdown']}, {paths['json']}, {paths['plot']}")
    if not args.runs and args.faithfulness:
        print(faith.markdown(tau))
        print(f"wrote {paths['faithfulness_markdown']}, {paths['faithfulness_json']}, {paths['faithfulness_plot']}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser("eval", help="COCO-Gen style mIoU of noun/colour maps on the shapes world")
    e.add_argument("--model", help="model to evaluate: a local folder, or the shipped shapes-world model by name (world, the "
                   "default)")
    e.add_argument("--runs", help="score a runs directory of saved records instead of generating")
    e.add_argument("--n", type=positive_int, default=200, help="held-out captions to generate (default 200)")
    e.add_argument(
        "--seed",
        type=seed_int,
        default=0,
        help="first held-out scene: captions are scenes SEED .. SEED+N-1, image i is generated with seed "
        "SEED+i; two caption sets are disjoint only when their seeds differ by at least N (e.g. --seed 0 "
        "and --seed 200 with --n 200)",
    )
    e.add_argument("--steps", type=positive_int, default=20)
    e.add_argument("--guidance", type=finite_float, default=5.0)
    e.add_argument("--batch-size", type=positive_int, default=16)
    e.add_argument("--taus", type=unit_float, nargs="+", default=[0.2, 0.3, 0.4, 0.5, 0.6, 0.7], help="tau sweep")
    e.add_argument("--device", default="cpu")
    e.add_argument("--dtype", default=None)
    e.add_argument("--out", default="daamkit-eval", help="output folder (default: daamkit-eval)")
    add_overwrite_option(e)
    e.add_argument("--no-progress", action="store_true")
    e.add_argument(
        "--methods",
        default="daam",
        metavar="NAMES",
        help="attribution methods to score side by side on the same images, comma-separated (e.g. daam,ovam), "
        "or 'all' for every method that applies to the model (default: daam); methods that map given words "
        "(ovam) map each scene's nouns and colours",
    )
    e.add_argument(
        "--faithfulness",
        type=at_least(0),
        default=0,
        metavar="N",
        help="also run the causal tests on the first N of the scenes (0, the default: off): each word's "
        "counterfactual (swapped for another of its kind, same seed) and the deletion of its attention in "
        "its map's region vs a random region of equal area; writes faithfulness.md/json and "
        "deletion_curves.png",
    )
    e.add_argument("--faithfulness-taus", type=unit_float, nargs="+", default=[0.2, 0.4, 0.6],
                   help="taus of the deletion curve (default 0.2 0.4 0.6)")
    add_trace_options(e)
    e.set_defaults(func=cmd_eval)
