"""``daamkit`` command line: one module per command, every ``add_argument`` of the project lives here.

Each command module has ``register(subparsers)``; :func:`main` maps the library's errors to one line
on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from daamkit.cli import analysis, batch, eval, generate, ui, world
from daamkit.cli.common import CLIError
from daamkit.errors import DaamkitError, user_message

__all__ = ["CLIError", "build_parser", "main"]

COMMANDS = (generate, batch, ui, eval, analysis, world)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="daamkit", description="Per-word attribution maps for diffusers pipelines")
    sub = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except DaamkitError as e:
        print(f"daamkit: error: {user_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("daamkit: interrupted", file=sys.stderr)
        return 130
