"""Read a runs directory back lazily: ``for rec in daamkit.load_runs("out"): ...``.

A runs directory is what ``daamkit batch`` writes (``index.jsonl`` + ``records/<id>.*``). Without an index
(a batch that never finished, or ``daamkit generate``/``demo`` output folders) the records are found by
scanning for ``*.json`` files of the daamkit run format.

Only the index (a few hundred bytes per run) is held in memory; each record's tensors are read when the
iteration reaches it and dropped when the caller lets go of it, so a loop over 100 000 SD records needs
the memory of one record.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from daamkit.io.record import FORMAT_NAME, RunRecord

__all__ = ["INDEX_NAME", "Runs", "index_entry", "index_line", "load_runs", "read_index"]

INDEX_NAME = "index.jsonl"


# -- index entries: the one definition of an index.jsonl line -------------------------------------------------
def index_entry(run_id: str, index: int, stem: str, *, prompt: str | None, seed: int | None,
                negative_prompt: str | None, words: list[str] | None, meta: dict[str, Any] | None,
                settings: dict[str, Any] | None, image_size: list[int] | None) -> dict[str, Any]:
    """One index entry: the run's id and position, what made it, and its record files.

    ``stem`` is the record's path without suffix, relative to the runs directory (``records/<id>`` for
    a batch). Keys in this order, which is the order of the lines ``daamkit batch`` writes.
    """
    return {
        "id": run_id,
        "index": index,
        "prompt": prompt,
        "seed": seed,
        "negative_prompt": negative_prompt,
        "words": words,
        "meta": meta,
        "settings": settings,
        "image_size": image_size,
        "paths": {"safetensors": f"{stem}.safetensors", "json": f"{stem}.json"},
    }


def index_line(entry: dict[str, Any]) -> str:
    """An entry as one line of ``index.jsonl`` (UTF-8 kept as is, newline-terminated)."""
    return json.dumps(entry, ensure_ascii=False) + "\n"


def read_index(path: str | os.PathLike[str], partial: bool = False) -> list[dict[str, Any]]:
    """The entries of an index file; blank lines are skipped.

    ``partial=True`` is for a file another process may have been killed while appending to (the batch
    runner's part files): a last line without its newline is ignored rather than parsed. A line that is
    not JSON raises ``ValueError`` naming the file and line.
    """
    entries = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if partial and not line.endswith("\n"):
                continue
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return entries


def _scan(root: Path) -> list[dict[str, Any]]:
    """Entries for every record under ``root`` (reads the JSON halves only, never the tensors)."""
    entries = []
    for js in sorted(root.rglob("*.json")):
        if js.name.startswith("."):
            continue
        try:
            doc = json.loads(js.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            continue
        stem = js.with_suffix("").relative_to(root).as_posix()
        meta = doc.get("meta") or {}
        entries.append(index_entry(
            stem, len(entries), stem, prompt=doc.get("prompt"), seed=doc.get("seed"),
            negative_prompt=doc.get("negative_prompt"), words=meta.get("words"), meta=meta.get("item", {}),
            settings=doc.get("settings"), image_size=(doc.get("heat_maps") or {}).get("image_size"),
        ))
    return entries


class Runs:
    """The runs of a directory: iterate for :class:`RunRecord` objects (loaded one at a time).

    ``entries`` are the index lines (dicts: id, prompt, seed, negative_prompt, words, meta, settings,
    image_size, paths), after the filter; ``len(runs)`` counts them; ``runs[id]`` or ``runs.load(id)``
    loads one record; ``runs.items()`` yields ``(entry, record)`` pairs.
    """

    def __init__(self, root: str | os.PathLike[str],
                 filter: Callable[[dict[str, Any]], bool] | None = None, verify: bool = True):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"no runs directory at {str(self.root)!r}")
        index = self.root / INDEX_NAME
        if index.is_file():
            entries = read_index(index)
            self.indexed = True
        else:
            entries = _scan(self.root)
            self.indexed = False
        self.entries = [e for e in entries if filter is None or filter(e)]
        self.verify = verify
        self._by_id = {e["id"]: e for e in self.entries}

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return f"Runs({str(self.root)!r}, {len(self)} runs{'' if self.indexed else ', no index'})"

    @property
    def ids(self) -> list[str]:
        return [e["id"] for e in self.entries]

    def path(self, entry: dict[str, Any]) -> Path:
        """The record stem of an entry (``<root>/records/<id>``)."""
        return (self.root / entry["paths"]["json"]).with_suffix("")

    def load(self, run_id: str) -> RunRecord:
        try:
            entry = self._by_id[run_id]
        except KeyError:
            raise KeyError(f"no run {run_id!r} in {self.root} (after the filter)") from None
        return RunRecord.load(self.path(entry), verify=self.verify)

    __getitem__ = load

    def items(self) -> Iterator[tuple[dict[str, Any], RunRecord]]:
        for entry in self.entries:
            yield entry, RunRecord.load(self.path(entry), verify=self.verify)

    def __iter__(self) -> Iterator[RunRecord]:
        for _, rec in self.items():
            yield rec


def load_runs(root: str | os.PathLike[str], filter: Callable[[dict[str, Any]], bool] | None = None,
              *, verify: bool = True) -> Runs:
    """The runs under ``root`` (a ``daamkit batch`` output folder, or any folder of records), lazily.

    ``filter(entry) -> bool`` selects runs by their index entry before anything is loaded, e.g.
    ``load_runs("out", lambda e: "dog" in e["prompt"])``. ``verify=False`` skips the sha256 check of
    each record's tensor file. Iterating yields one :class:`~daamkit.io.record.RunRecord` at a time.
    """
    return Runs(root, filter=filter, verify=verify)
