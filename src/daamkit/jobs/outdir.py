"""Result folders that are written whole or not at all.

A job writes into a hidden staging folder beside the final one and renames it into place at the end,
so an interrupted or failed run leaves nothing behind, and a result is never a mix of an earlier
run's files and this one's.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

from daamkit.errors import InputError

#: The file that marks a folder as a finished result; only such folders may be replaced.
RESULT_MARKER = "summary.json"


def check_out_dir(out: str | os.PathLike[str], *, overwrite: bool = False, option: str = "--out",
                  overwrite_flag: str = "--overwrite") -> Path:
    """The absolute path of ``out`` if a result can go there, else :class:`InputError` naming why.

    An existing folder is accepted when it is empty, or when it holds an earlier result
    (:data:`RESULT_MARKER`) and ``overwrite`` is set: a folder of other files is never replaced.
    ``option``/``overwrite_flag`` name the settings in the message.
    """
    if not str(out).strip():
        raise InputError(f"{option} is empty: give the folder to write the result into")
    final = Path(out).expanduser().absolute()
    if final.is_symlink() and not final.exists():
        raise InputError(f"{option} {str(final)!r} is a broken symbolic link")
    if final.exists():
        if not final.is_dir():
            raise InputError(f"{option} {str(final)!r} is a file, not a folder: choose a folder path")
        if any(final.iterdir()):
            if not overwrite:
                raise InputError(f"{option} {str(final)!r} already holds files: pass {overwrite_flag} to replace "
                                 f"the earlier result entirely, or choose another {option}")
            if not (final / RESULT_MARKER).is_file():
                raise InputError(f"{option} {str(final)!r} holds files but no earlier result ({RESULT_MARKER}); "
                                 f"{overwrite_flag} replaces results only: choose another {option}")
    ancestor = final.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"{option} {str(final)!r} cannot be created: {str(ancestor)!r} is a file")
    return final


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike[str], *, overwrite: bool = False, option: str = "--out",
               overwrite_flag: str = "--overwrite") -> Iterator[Path]:
    """Yield an empty staging folder; when the block ends normally it becomes ``out`` (replacing an
    earlier result when ``overwrite`` is set), when it raises it is removed with any parent folders
    this call created.

    The staging folder is made at once, so a place that cannot be written fails here, before the
    caller does any work.
    """
    final = check_out_dir(out, overwrite=overwrite, option=option, overwrite_flag=overwrite_flag)
    created: list[Path] = []
    parent = final.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    stage: Path | None = None
    try:
        for d in reversed(created):
            d.mkdir()
        stage = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
        umask = os.umask(0)
        os.umask(umask)
        stage.chmod(0o777 & ~umask)  # mkdtemp's 0700 would otherwise become the result's mode
    except OSError as e:
        _remove(stage, created)
        raise InputError(f"{option} {str(final)!r} cannot be created: {e.strerror or e}") from None
    try:
        yield stage
        _commit(stage, final)
    except BaseException:
        _remove(stage, created)
        raise


def save_result(out: str | os.PathLike[str], write: Callable[[Path], dict[str, str]], *, command: str,
                overwrite: bool = False, settings: dict | None = None) -> dict[str, str]:
    """Write a result folder whole: ``write(folder)`` puts its files into a staging folder and returns
    them by name; a :data:`RESULT_MARKER` naming them marks the result finished; the folder then
    becomes ``out``. Returns the files' paths under ``out``."""
    final = Path(out).expanduser().absolute()
    with staged_dir(out, overwrite=overwrite) as stage:
        written = {k: Path(v).relative_to(stage).as_posix() for k, v in write(stage).items()}
        summary = {"command": command, "files": written, "settings": settings or {}}
        (stage / RESULT_MARKER).write_text(json.dumps(summary, indent=2, default=str))
    return {k: str(final / v) for k, v in written.items()}


def _commit(stage: Path, final: Path) -> None:
    if not final.exists():
        stage.rename(final)
        return
    # two renames: the earlier result stays whole until the new one is complete beside it
    old = final.with_name(f".{final.name}.{uuid.uuid4().hex[:8]}.old")
    final.rename(old)
    try:
        stage.rename(final)
    except BaseException:
        old.rename(final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _remove(stage: Path | None, created: list[Path]) -> None:
    if stage is not None:
        shutil.rmtree(stage, ignore_errors=True)
    for d in created:  # innermost first
        with contextlib.suppress(OSError):
            d.rmdir()
