"""``daamkit families``: every text-conditioned denoiser of the installed diffusers and whether daamkit traces it."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from daamkit.capture.coverage import coverage, markdown_table


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("families", help="which diffusers denoisers daamkit traces, and how each is tested")
    add_arguments(p)
    p.set_defaults(func=main)


def add_arguments(p: argparse.ArgumentParser) -> None:
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--markdown", action="store_true", help="print the table as Markdown (the README's table)")
    fmt.add_argument("--json", action="store_true", help="print one JSON object per denoiser")
    p.add_argument("--supported", action="store_true", help="list only the denoisers daamkit traces")


def main(args: argparse.Namespace) -> int:
    rows = coverage()
    total, traced = len(rows), sum(r.family is not None for r in rows)
    if args.supported:
        rows = [r for r in rows if r.family is not None]
    if args.markdown:
        print(markdown_table(rows))
    elif args.json:
        for r in rows:
            print(json.dumps(asdict(r)))
    else:
        width = max(len(r.denoiser) for r in rows)
        for r in rows:
            where = f"{r.family}: {', '.join(r.pipelines)} ({r.tests})" if r.family else r.status
            print(f"{r.denoiser:<{width}}  {'yes' if r.family else 'no '}  {where}")
        print(f"{traced} of {total} text-conditioned denoisers of diffusers are traced")
    return 0
