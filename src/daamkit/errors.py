"""The library's error types for problems caused by the input or the environment, and the one
mapping from an exception to the line a user reads (shared by the command line and the web app).

Every such error derives from :class:`DaamkitError` and from the builtin type a caller would expect
(``ValueError``, ``KeyError``, ...), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class DaamkitError(Exception):
    """A problem the user can act on; ``user_message(e)`` is one line that says what was wrong."""


class InputError(DaamkitError, ValueError):
    """A value given by the user is not allowed (the message names it and what is allowed)."""


class TraceError(DaamkitError, RuntimeError):
    """A trace was used in a way it cannot serve (not entered, nothing traced, a method not enabled)."""


def user_message(exc: BaseException) -> str | None:
    """The one line to show for an error the user can act on, or None for an internal error."""
    if not isinstance(exc, DaamkitError):
        return None
    if isinstance(exc, KeyError) and exc.args:  # a KeyError's str() would repr() its message
        return str(exc.args[0])
    return str(exc)


def environment_message(exc: BaseException) -> str | None:
    """The one line for a failure of the machine rather than of daamkit (a file that cannot be
    written, a full disk, memory run out), or None when ``exc`` is not one."""
    if isinstance(exc, OSError) and exc.filename is not None:
        return f"{exc.strerror or type(exc).__name__}: {exc.filename}"
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return "out of memory: try a smaller image size, fewer images at once or another device"
    return None
