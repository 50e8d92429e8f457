"""``daamkit ui``: serve the local web app until interrupted."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from daamkit.cli.common import fps_float, positive_int
from daamkit.ui import INSTALL_HINT


def register(sub: argparse._SubParsersAction) -> None:
    u = sub.add_parser("ui", help="a local web app: type a prompt, click a word, see its heat map")
    add_arguments(u)
    u.set_defaults(func=main)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="local diffusers pipeline folder (default: the embedded shapes-world model)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this computer only; 0.0.0.0 opens it to "
                             "the network, with no login: a warning says so)")
    parser.add_argument("--allow-paths", metavar="DIR", default=None,
                        help="let the page open records by their path on the server, only inside DIR (default: "
                             "off; records can always be uploaded)")
    parser.add_argument("--port", type=int, default=None, help="port (default: the first free one from 7860)")
    parser.add_argument("--device", default="cpu", help="torch device for the model (default cpu)")
    parser.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default: as saved)")
    parser.add_argument("--steps", type=int, default=20, help="initial value of the steps control (default 20)")
    parser.add_argument("--guidance", type=float, default=5.0, help="initial guidance scale (default 5.0)")
    parser.add_argument("--num-frames", type=positive_int, default=None,
                        help="video models: frames per video (default: the model's; Wan wants 4k+1, e.g. 33)")
    parser.add_argument("--fps", type=fps_float, default=None,
                        help="video models: frames per second of the shown videos (default: the model's usual rate)")
    parser.add_argument("--open", action="store_true", help="open the page in the default browser")


def main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """Run the server until interrupted. ``args``: parsed arguments of :func:`add_arguments`, or argv."""
    if not isinstance(args, argparse.Namespace):
        parser = argparse.ArgumentParser(prog="daamkit ui", description=__doc__.splitlines()[0])
        add_arguments(parser)
        args = parser.parse_args(args)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from daamkit.ui.app import build_app as _build
        from daamkit.ui.app import launch, wait_until_interrupted
    except ImportError as e:
        print(f"daamkit: error: {INSTALL_HINT} ({e})", file=sys.stderr)
        return 2
    if args.port is not None and not 0 < args.port < 65536:
        print(f"daamkit: error: --port must lie in 1..65535, got {args.port}", file=sys.stderr)
        return 2
    allow = getattr(args, "allow_paths", None)
    if allow is not None and not os.path.isdir(os.path.expanduser(allow)):
        print(f"daamkit: error: --allow-paths must name an existing folder, got {allow}", file=sys.stderr)
        return 2
    previous = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops it like Ctrl+C: scratch and cache removed
    app = None
    try:
        app = _build(args.model, device=args.device, dtype=args.dtype, steps=args.steps,
                     guidance=args.guidance, allow_paths=allow, num_frames=getattr(args, "num_frames", None),
                     fps=getattr(args, "fps", None))
        try:
            launch(app, host=args.host, port=args.port, open_browser=args.open, block=False, quiet=True)
        except OSError as e:  # port taken, address not available
            print(f"daamkit: error: cannot serve on {args.host}:{args.port}: {e}", file=sys.stderr)
            return 2
        print(f"daamkit ui: serving {app.daamkit_session.model.label} at {app.local_url} (Ctrl+C to stop)",
              flush=True)
        wait_until_interrupted(app)
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
        if app is not None:
            app.close()
            app.daamkit_session.close()
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
