"""``daamkit ui``: a local web app (Gradio, optional extra ``[ui]``) to look at each word's heat map.

``build_app`` (in :mod:`daamkit.ui.app`) gives the ``gr.Blocks`` for embedding; ``daamkit ui``
(:mod:`daamkit.cli.ui`) serves it. Importing this package does not import gradio, so the CLI works (and
says what to install) without it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["INSTALL_HINT", "build_app"]

INSTALL_HINT = "the web app needs gradio: pip install 'daamkit[ui]'"


def build_app(*args: Any, **kwargs: Any) -> Any:
    """See :func:`daamkit.ui.app.build_app` (imports gradio)."""
    from daamkit.ui.app import build_app as _build

    return _build(*args, **kwargs)
