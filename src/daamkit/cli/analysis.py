"""``daamkit syntax``, ``daamkit pos`` and ``daamkit entangle``: the paper's analyses."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from daamkit.analysis.entanglement import (
    SHAPE_FAMILIES,
    analyze_entanglement,
    load_ontology,
    pair_prompt,
    run_entanglement,
)
from daamkit.analysis.pos import analyze_pos
from daamkit.analysis.syntax import PAPER_RELATIONS, ParserNotFoundError, analyze_syntax
from daamkit.cli.common import (
    CLIError,
    add_overwrite_option,
    finite_float,
    positive_int,
    seed_int,
    unit_float,
)
from daamkit.jobs.outdir import check_out_dir, save_result
from daamkit.metrics import DEFAULT_THRESHOLD


def register(sub: argparse._SubParsersAction) -> None:
    for name, add, run, help_ in (
        ("syntax", add_syntax_arguments, syntax_main,
         "head/dependent map overlap per dependency relation, from saved runs"),
        ("entangle", add_entangle_arguments, entangle_main,
         "co-hyponym pairs and adjective spread (generates, or scores --runs)"),
        ("pos", add_pos_arguments, pos_main, "attention mass per part of speech, from saved runs"),
    ):
        a = sub.add_parser(name, help=help_)
        add(a)
        a.set_defaults(func=run)


def add_syntax_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs_dir", metavar="RUNS_DIR", help="folder of run records (daamkit batch/generate/demo output)")
    p.add_argument("--parser", default=None,
                   help="spaCy package name, or 'world' for the shapes-world grammar (default: the first "
                        "installed English spaCy pipeline)")
    p.add_argument("--relations", nargs="+", default=None,
                   help=f"relations to tabulate (default: {' '.join(PAPER_RELATIONS)}; 'all' = every one found)")
    p.add_argument("--threshold", type=unit_float, default=DEFAULT_THRESHOLD, help="tau (default 0.4)")
    p.add_argument("--out", default="daamkit-syntax", help="output folder (default: daamkit-syntax)")
    add_overwrite_option(p)


def syntax_main(args: argparse.Namespace) -> int:
    from daamkit.analysis import open_runs

    check_out_dir(args.out, overwrite=args.overwrite)

    relations: Sequence[str] | None = PAPER_RELATIONS
    if args.relations:
        relations = None if args.relations == ["all"] else tuple(args.relations)
    parser: Any = args.parser
    try:
        result = analyze_syntax(open_runs(args.runs_dir), parser=parser, relations=relations,
                                threshold=args.threshold)
    except ParserNotFoundError as e:
        raise CLIError(str(e)) from None
    result.settings = {"runs": str(args.runs_dir), "parser": args.parser or "spacy"}
    if result.n_runs == 0:
        raise CLIError(f"no run records found in {args.runs_dir}")
    paths = save_result(args.out, result.save, command="syntax", overwrite=args.overwrite,
                        settings=result.settings)
    print(result.markdown())
    print(f"wrote {paths['markdown']}, {paths['json']}, {paths['plot']}")
    return 0


def add_pos_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs_dir", metavar="RUNS_DIR", help="folder of run records")
    p.add_argument("--parser", default=None,
                   help="spaCy package name, or 'world' for the shapes-world vocabulary (default: the first "
                        "installed English spaCy pipeline)")
    p.add_argument("--threshold", type=unit_float, default=DEFAULT_THRESHOLD, help="tau for the area column (default 0.4)")
    p.add_argument("--out", default="daamkit-pos", help="output folder (default: daamkit-pos)")
    add_overwrite_option(p)


def pos_main(args: argparse.Namespace) -> int:
    from daamkit.analysis import open_runs

    check_out_dir(args.out, overwrite=args.overwrite)

    try:
        result = analyze_pos(open_runs(args.runs_dir), args.parser, args.threshold)
    except ParserNotFoundError as e:
        raise CLIError(str(e)) from None
    if result.n_runs == 0:
        raise CLIError(f"no run records found in {args.runs_dir}")
    result.settings = {"runs": str(args.runs_dir), "parser": args.parser or "spacy"}
    paths = save_result(args.out, result.save, command="pos", overwrite=args.overwrite,
                        settings=result.settings)
    print(result.markdown())
    print(f"wrote {paths['markdown']}, {paths['json']}, {paths['plot']}")
    return 0


def add_entangle_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="local model folder (default: the embedded shapes-world model)")
    p.add_argument("--world", action="store_true",
                   help="shapes-world prompts with --model (the default when --model is not given or is a "
                        "folder exported by `daamkit world train`)")
    p.add_argument("--ontology", help="JSON {hypernym: [nouns]} for real models (default: the shipped one)")
    p.add_argument("--pairs", nargs="+", metavar="X,Y", help="noun pairs to test instead of sampled ones")
    p.add_argument("--runs", help="score saved records (written with --save-records) instead of generating")
    p.add_argument("--n", type=positive_int, default=100, help="prompts per group (default 100: 200 runs)")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--steps", type=positive_int, default=20)
    p.add_argument("--guidance", type=finite_float, default=5.0)
    p.add_argument("--batch-size", type=positive_int, default=16)
    p.add_argument("--threshold", type=unit_float, default=DEFAULT_THRESHOLD)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--save-records", action="store_true", help="also write each run's record under OUT/records")
    p.add_argument("--out", default="daamkit-entangle", help="output folder (default: daamkit-entangle)")
    add_overwrite_option(p)
    p.add_argument("--no-progress", action="store_true")


def _world_mode(args: argparse.Namespace) -> bool:
    """Shapes-world pairs and judge: asked for, the embedded model, or a model folder that
    `daamkit world train` exported (it carries ``daamkit_world.json``)."""
    if args.world or not args.model:
        return True
    return Path(args.model, "daamkit_world.json").is_file()


def entangle_main(args: argparse.Namespace) -> int:
    world = _world_mode(args)
    onto = load_ontology(args.ontology) if args.ontology else None
    check_out_dir(args.out, overwrite=args.overwrite)
    if args.runs:
        from daamkit.analysis import open_runs

        res = analyze_entanglement(open_runs(args.runs), world=world, ontology=onto, threshold=args.threshold)
        res.settings = {"runs": str(args.runs), "world": world}
        paths = save_result(args.out, res.save, command="entangle", overwrite=args.overwrite, settings=res.settings)
    else:
        from daamkit.jobs.pipeline import load_pipeline

        if args.model:
            model = args.model
        else:
            from daamkit.world import ModelNotFoundError, default_model_path

            try:
                model = default_model_path()
            except ModelNotFoundError as e:
                raise CLIError(f"{e} (or pass --model PATH)") from None
        prompts = None
        if args.pairs:
            onto_for_pairs = onto if onto is not None else (SHAPE_FAMILIES if world else load_ontology())
            prompts = []
            for i, spec in enumerate(args.pairs):
                a, _, b = spec.partition(",")
                if not a or not b:
                    raise CLIError(f"--pairs takes X,Y (got {spec!r})")
                prompts.append(pair_prompt(a.strip().lower(), b.strip().lower(), onto_for_pairs, seed=args.seed + i, index=i))
        pipe = load_pipeline(model, device=args.device, dtype=args.dtype)

        def write(folder: Path) -> dict[str, str]:
            # generated inside the staging folder: the records written along the way go with the result
            nonlocal res
            res = run_entanglement(pipe, prompts, n=args.n, seed=args.seed, world=world, ontology=onto,
                                   steps=args.steps, guidance_scale=args.guidance, batch_size=args.batch_size,
                                   threshold=args.threshold, save_dir=(folder / "records") if args.save_records else None,
                                   progress=not args.no_progress)
            res.settings["model"] = str(model)
            return res.save(folder)

        res = None
        paths = save_result(args.out, write, command="entangle", overwrite=args.overwrite, settings={"model": str(model)})
        if not world:
            print("note: generation success on real models needs a judge (e.g. an object detector): pass "
                  "judge=... to daamkit.analysis.entanglement.run_entanglement; only overlaps are reported here")
    print(res.markdown())
    print(f"wrote {paths['markdown']}, {paths['json']}, {paths['plot']}")
    return 0
