"""Read a runs directory back lazily: ``for rec in daamkit.load_runs("out"): ...``.

A runs directory is what ``daamkit batch`` writes (``index.jsonl`` + ``records/<id>.*``). Without an index
(a batch that never finished, or ``daamkit generate``/``demo`` output folders) the records are found by
scanning for ``*.json`` files of the daamkit run format.

Only the index (a few hundred bytes per run) is held in memory; each record's tensors are read when the
iteration reaches it and dropped when the caller lets go of it, so a loop over 100 000 SD records needs
the memory of one record.

A runs directory is untrusted input like a record: every index line is checked when the directory is
opened (a malformed line raises :class:`RunsError` naming ``index.jsonl:LINE``), and a record path is
followed only if it stays inside the directory -- no ``..``, no absolute path, no symbolic link that
leads out -- so an index cannot make a loop over runs read files elsewhere.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from daamkit.errors import DaamkitError
from daamkit.io.record import FORMAT_NAME, MAX_JSON_BYTES, MAX_VIDEO_FRAMES, RecordError, RunRecord

__all__ = [
    "INDEX_NAME",
    "NoRunsError",
    "Runs",
    "RunsError",
    "index_entry",
    "index_line",
    "load_runs",
    "read_index",
]

INDEX_NAME = "index.jsonl"
# Keys of an entry besides id and paths, with the JSON types each may hold (None: the key may be absent).
_ENTRY_TYPES: dict[str, tuple[type, ...]] = {
    "index": (int,),
    "prompt": (str, type(None)),
    "seed": (int, type(None)),
    "negative_prompt": (str, type(None)),
    "words": (list, type(None)),
    "meta": (dict, type(None)),
    "settings": (dict, type(None)),
    "image_size": (list, type(None)),
    "num_frames": (int, type(None)),  # videos only: frames of the video the maps lie on
}


class RunsError(RecordError):
    """A runs directory's index is malformed or points outside the directory (the message names the line)."""


class NoRunsError(DaamkitError, FileNotFoundError):
    """There is no runs directory at the given path."""


# -- index entries: the one definition of an index.jsonl line -------------------------------------------------
def index_entry(run_id: str, index: int, stem: str, *, prompt: str | None, seed: int | None,
                negative_prompt: str | None, words: list[str] | None, meta: dict[str, Any] | None,
                settings: dict[str, Any] | None, image_size: list[int] | None,
                num_frames: int | None = None) -> dict[str, Any]:
    """One index entry: the run's id and position, what made it, and its record files.

    ``stem`` is the record's path without suffix, relative to the runs directory (``records/<id>`` for
    a batch). Keys in this order, which is the order of the lines ``daamkit batch`` writes; a video's
    entry adds ``num_frames`` (an image's has no such key, as before videos).
    """
    video = {} if num_frames is None else {"num_frames": num_frames}
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
        **video,
        "paths": {"safetensors": f"{stem}.safetensors", "json": f"{stem}.json"},
    }


def index_line(entry: dict[str, Any]) -> str:
    """An entry as one line of ``index.jsonl`` (UTF-8 kept as is, newline-terminated)."""
    return json.dumps(entry, ensure_ascii=False) + "\n"


def read_index(path: str | os.PathLike[str], partial: bool = False) -> list[dict[str, Any]]:
    """The entries of an index file; blank lines are skipped.

    ``partial=True`` is for a file another process may have been killed while appending to (the batch
    runner's part files): a last line without its newline is ignored rather than parsed. A line that is
    not JSON, not an entry (``id`` and ``paths`` of the right types), repeats an id or names a record
    outside the directory raises :class:`RunsError` (a ``ValueError``) naming the file and line.
    """
    entries = []
    seen: dict[str, int] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if partial and not line.endswith("\n"):
                    continue
                if not line.strip():
                    continue
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError as e:
                    raise RunsError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                except (ValueError, RecursionError) as e:  # overlong integers, nesting past the stack
                    raise RunsError(f"{path}:{n}: not an index entry ({type(e).__name__})") from None
                if (problem := _entry_problem(entry)) is not None:
                    raise RunsError(f"{path}:{n}: {problem}")
                if entry["id"] in seen:
                    raise RunsError(f"{path}:{n}: duplicate id {entry['id']!r} (first on line {seen[entry['id']]})")
                seen[entry["id"]] = n
                entries.append(entry)
    except UnicodeDecodeError:
        raise RunsError(f"{path}: not UTF-8 text") from None
    return entries


def _entry_problem(entry: Any) -> str | None:
    """What makes ``entry`` not an index entry, or None."""
    if not isinstance(entry, dict):
        return f"an index line is a JSON object, not a {type(entry).__name__}"
    run_id = entry.get("id")
    if not isinstance(run_id, str) or not run_id:
        return f"'id' must be a non-empty string, got {run_id!r:.80}"
    paths = entry.get("paths")
    if not isinstance(paths, dict) or not all(isinstance(paths.get(k), str) for k in ("json", "safetensors")):
        return "'paths' must be an object with the strings 'json' and 'safetensors'"
    for key, suffix in (("json", ".json"), ("safetensors", ".safetensors")):
        if (problem := _path_problem(paths[key], suffix)) is not None:
            return f"paths.{key} {paths[key]!r:.200} {problem}"
    if paths["json"].removesuffix(".json") != paths["safetensors"].removesuffix(".safetensors"):
        return "paths.json and paths.safetensors name different records"
    for key, types in _ENTRY_TYPES.items():
        value = entry.get(key)
        if (value is not None or key in entry) and (isinstance(value, bool) or not isinstance(value, types)):
            return f"{key!r} has the wrong type ({type(value).__name__})"
    return None


def _path_problem(rel: str, suffix: str) -> str | None:
    """Why ``rel`` is not a record path relative to the runs directory, or None."""
    if not rel.endswith(suffix) or rel == suffix:
        return f"is not a {suffix} file"
    if "\0" in rel or "\\" in rel:
        return "is not a relative POSIX path"
    p = PurePosixPath(rel)
    if p.is_absolute() or PureWindowsPath(rel).drive:
        return "is absolute: index paths are relative to the runs directory"
    if ".." in p.parts:
        return "leads out of the runs directory ('..')"
    return None


def _inside(root: Path, path: Path) -> bool:
    """Whether ``path``, after following symbolic links, lies inside ``root``."""
    try:
        return path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # a symlink loop, say
        return False


def _scan(root: Path) -> list[dict[str, Any]]:
    """Entries for every record under ``root`` (reads the JSON halves only, never the tensors).

    A JSON file that leads out of ``root`` is listed without being read, so that loading it is refused.
    """
    entries = []
    for js in sorted(root.rglob("*.json")):
        if js.name.startswith("."):
            continue
        stem = js.with_suffix("").relative_to(root).as_posix()
        if not _inside(root, js):
            entries.append(index_entry(stem, len(entries), stem, prompt=None, seed=None, negative_prompt=None,
                                       words=None, meta=None, settings=None, image_size=None))
            continue
        try:
            if js.stat().st_size > MAX_JSON_BYTES:
                continue
            doc = json.loads(js.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):  # unreadable, not JSON: not a record
            continue
        if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
            continue

        def field(obj: Any, key: str, types: tuple[type, ...]) -> Any:
            # the listing is informative only; a mistyped field is left out here and refused at load
            value = obj.get(key) if isinstance(obj, dict) else None
            return value if isinstance(value, types) and not isinstance(value, bool) else None

        meta = field(doc, "meta", (dict,)) or {}
        hm = field(doc, "heat_maps", (dict,))
        entries.append(index_entry(
            stem, len(entries), stem, prompt=field(doc, "prompt", (str,)), seed=field(doc, "seed", (int,)),
            negative_prompt=field(doc, "negative_prompt", (str,)), words=field(meta, "words", (list,)),
            meta=field(meta, "item", (dict,)) or {}, settings=field(doc, "settings", (dict,)),
            image_size=field(hm, "image_size", (list,)), num_frames=_num_frames(field(hm, "meta", (dict,))),
        ))
    return entries


def _num_frames(hm_meta: dict[str, Any] | None) -> int | None:
    """Frames of the video a record's maps lie on, from its heat maps' meta (None: an image, or a time
    axis that loading will refuse)."""
    from daamkit.frames import TimeAxis

    time = (hm_meta or {}).get("time")
    if time is None:
        return None
    try:
        n = TimeAxis.from_json(time).num_frames
    except ValueError:
        return None
    return n if n <= MAX_VIDEO_FRAMES else None


class Runs:
    """The runs of a directory: iterate for :class:`RunRecord` objects (loaded one at a time).

    ``entries`` are the index lines (dicts: id, prompt, seed, negative_prompt, words, meta, settings,
    image_size, paths; videos' also num_frames), after the filter; ``len(runs)`` counts them; ``runs[id]``
    or ``runs.load(id)`` loads one record; ``runs.items()`` yields ``(entry, record)`` pairs;
    ``runs.frame_scores()`` tabulates the videos' per-word scores per frame.
    """

    def __init__(self, root: str | os.PathLike[str],
                 filter: Callable[[dict[str, Any]], bool] | None = None, verify: bool = True):
        self.root = Path(root)
        if not self.root.is_dir():
            raise NoRunsError(f"no runs directory at {str(self.root)!r}")
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
        """The record stem of an entry (``<root>/records/<id>``); :class:`RunsError` if it leads outside."""
        for key, suffix in (("json", ".json"), ("safetensors", ".safetensors")):
            rel = entry["paths"][key]
            if (problem := _path_problem(rel, suffix)) is not None:
                raise RunsError(f"{self.root}: run {entry['id']!r}: paths.{key} {rel!r:.200} {problem}")
            if not _inside(self.root, self.root / rel):
                raise RunsError(f"{self.root}: run {entry['id']!r}: {rel} leads out of the runs directory "
                                "(a symbolic link?); refusing to read it")
        return (self.root / entry["paths"]["json"]).with_suffix("")

    def load(self, run_id: str) -> RunRecord:
        try:
            entry = self._by_id[run_id]
        except KeyError:
            raise KeyError(f"no run {run_id!r} in {self.root} (after the filter)") from None
        return self._load(entry)

    def _load(self, entry: dict[str, Any]) -> RunRecord:
        stem = self.path(entry)
        try:
            return RunRecord.load(stem, verify=self.verify)
        except FileNotFoundError:
            where = f"{INDEX_NAME} lists" if self.indexed else "found"
            raise RunsError(f"{self.root}: {where} run {entry['id']!r} but its record {stem}.json/.safetensors "
                            "is missing") from None

    __getitem__ = load

    def items(self) -> Iterator[tuple[dict[str, Any], RunRecord]]:
        for entry in self.entries:
            yield entry, self._load(entry)

    def items_or_errors(self) -> Iterator[tuple[dict[str, Any], RunRecord | None, RecordError | None]]:
        """``(entry, record, None)`` for each run that loads and ``(entry, None, error)`` for each that is
        damaged, missing or outside the directory: for callers that skip bad runs instead of stopping."""
        for entry in self.entries:
            try:
                yield entry, self._load(entry), None
            except RecordError as e:
                yield entry, None, e

    def __iter__(self) -> Iterator[RunRecord]:
        for _, rec in self.items():
            yield rec

    def frame_scores(self, words: Sequence[str] | None = None) -> Iterator[dict[str, Any]]:
        """One row per video run, word and video frame: ``{"id", "prompt", "word", "frame", "score"}``,
        the score being the mean of the word's map over the frame (:meth:`GlobalHeatMap.frame_scores`).

        ``words`` default to each run's own words (a word missing from a run's prompt is left out of
        that run's rows); image runs are skipped without being loaded. Rows come one
        record at a time, e.g. ``pandas.DataFrame(runs.frame_scores())`` or a CSV writer.
        """
        for entry in self.entries:
            if entry.get("num_frames") is None:  # both the index and a scan give every video's
                continue
            rec = self._load(entry)
            hm = rec.heat_maps
            if not hm.is_video:
                continue
            chosen = hm.words if words is None else [w for w in words if w in hm]
            for word, scores in hm.frame_scores(chosen).items():
                for frame, score in enumerate(scores.tolist()):
                    yield {"id": entry["id"], "prompt": rec.prompt, "word": word, "frame": frame, "score": score}


def load_runs(root: str | os.PathLike[str], filter: Callable[[dict[str, Any]], bool] | None = None,
              *, verify: bool = True) -> Runs:
    """The runs under ``root`` (a ``daamkit batch`` output folder, or any folder of records), lazily.

    ``filter(entry) -> bool`` selects runs by their index entry before anything is loaded, e.g.
    ``load_runs("out", lambda e: "dog" in e["prompt"])``. ``verify=False`` skips the sha256 check of
    each record's tensor file. Iterating yields one :class:`~daamkit.io.record.RunRecord` at a time.
    """
    return Runs(root, filter=filter, verify=verify)
