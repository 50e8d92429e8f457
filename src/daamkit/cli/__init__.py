"""``daamkit`` command line: one module per command, every ``add_argument`` of the project lives here.

Each command module has ``register(subparsers)``. :func:`main` ends every failure in one line on
stderr: a bad value or an environment problem exits 2 naming it, an internal error (a bug) exits 1
and says where its traceback was written.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
from collections.abc import Sequence
from typing import NoReturn

from daamkit.cli import analysis, batch, eval, explain, faithfulness, families, generate, ui, world
from daamkit.cli.common import CLIError
from daamkit.errors import DaamkitError, environment_message, user_message

__all__ = ["CLIError", "build_parser", "main"]

COMMANDS = (generate, explain, faithfulness, batch, ui, eval, analysis, world, families)


class Parser(argparse.ArgumentParser):
    """argparse with its errors as one line (the usage block buried the reason); subcommands'
    parsers are of this class too, since ``add_subparsers`` uses the parent's class."""

    def error(self, message: str) -> NoReturn:
        raise CLIError(f"{message} (see: {self.prog} --help)")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="daamkit", description="Per-word attribution maps for diffusers pipelines")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    for command in COMMANDS:
        command.register(sub)
    return parser


def _quiet_libraries() -> None:
    # transformers warns on import about optional backends it does not need here (torchvision);
    # that noise must not bury the one error line. A user's own setting wins.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _internal_error(exc: BaseException, argv: Sequence[str] | None) -> int:
    try:
        fd, log = tempfile.mkstemp(prefix="daamkit-error-", suffix=".log")
        with os.fdopen(fd, "w") as f:
            f.write(f"daamkit {' '.join(argv if argv is not None else sys.argv[1:])}\n\n")
            traceback.print_exception(exc, file=f)
        where = f"the traceback is in {log}"
    except OSError:
        where = "the traceback could not be written to the temporary folder"
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    print(f"daamkit: internal error: {type(exc).__name__}: {first} (a bug: please report it; {where})",
          file=sys.stderr)
    return 1


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _quiet_libraries()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        return int(args.func(args) or 0)
    except DaamkitError as e:
        print(f"daamkit: error: {user_message(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("daamkit: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - every failure ends in one line
        message = environment_message(e)
        if message is not None:
            print(f"daamkit: error: {message}", file=sys.stderr)
            return 2
        return _internal_error(e, argv)
