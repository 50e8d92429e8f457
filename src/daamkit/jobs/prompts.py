"""Prompt files for batch runs: plain text (one prompt per line), JSONL (prompt, id, seed, size, words,
negative_prompt, meta) or CSV (a ``prompt`` column). Parsing is deterministic, so every process of a
distributed run reads the same items, ids and seeds."""

from __future__ import annotations

import csv
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daamkit.errors import InputError
from daamkit.jobs.generate import parse_size

__all__ = ["FORMATS", "PromptFileError", "PromptItem", "detect_format", "parse_prompts", "read_prompts"]

FORMATS = ("text", "jsonl", "csv")
JSONL_KEYS = ("id", "prompt", "seed", "size", "width", "height", "words", "negative_prompt", "meta")
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_SEED = 2**63 - 1


class PromptFileError(InputError):
    """The prompt file is empty, malformed or inconsistent; the message names the file and line."""


@dataclass(frozen=True)
class PromptItem:
    """One prompt of a prompt file, with everything that decides its image."""

    index: int  # position among the items (0-based), the order of index.jsonl
    id: str  # record stem: OUT/records/<id>.*
    prompt: str
    seed: int
    height: int | None = None  # None: the model's default size
    width: int | None = None
    negative_prompt: str | None = None
    words: tuple[str, ...] | None = None  # words the user cares about (checked, stored in the index)
    meta: dict[str, Any] = field(default_factory=dict)  # extra per-item data (JSONL "meta", other CSV columns)
    line: int = 0  # 1-based line of the prompt file, for messages


def _fail(source: str, line: int, msg: str) -> PromptFileError:
    return PromptFileError(f"{source}:{line}: {msg}" if line else f"{source}: {msg}")


def _as_words(value: Any, source: str, line: int) -> tuple[str, ...] | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):  # a JSON list in a CSV cell: allows multi-word queries like "red circle"
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise _fail(source, line, f"'words' looks like a JSON list but is not valid JSON ({e})") from None
        else:
            return tuple(text.split()) or None
    if isinstance(value, list) and all(isinstance(w, str) and w.strip() for w in value):
        return tuple(w.strip() for w in value) or None
    raise _fail(source, line, f"'words' must be a list of non-empty strings or a space-separated string, got {value!r}")


def _as_int(value: Any, what: str, source: str, line: int) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise _fail(source, line, f"{what!r} must be an integer, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _fail(source, line, f"{what!r} must be an integer, got {value!r}")
    return value


def _as_size(fields: dict[str, Any], source: str, line: int) -> tuple[int | None, int | None]:
    size = fields.get("size")
    height = _as_int(fields.get("height"), "height", source, line)
    width = _as_int(fields.get("width"), "width", source, line)
    if size not in (None, ""):
        if height is not None or width is not None:
            raise _fail(source, line, "give either 'size' or 'width'/'height', not both")
        try:
            return parse_size(str(size))
        except InputError as e:
            raise _fail(source, line, str(e).replace("--size", "'size'")) from None
    if (height is None) != (width is None):
        raise _fail(source, line, "give both 'width' and 'height' (or 'size': WIDTHxHEIGHT)")
    if height is not None and width is not None and (height <= 0 or width <= 0 or height % 8 or width % 8):
        raise _fail(source, line, f"width and height must be positive multiples of 8, got {width}x{height}")
    return height, width


def _item(fields: dict[str, Any], index: int, line: int, base_seed: int, source: str) -> PromptItem:
    prompt = fields.get("prompt")
    if not isinstance(prompt, str):
        raise _fail(source, line, "missing 'prompt'" if prompt is None else f"'prompt' must be a string, got {prompt!r}")
    if not prompt.strip():
        raise _fail(source, line, "empty prompt")
    raw_id = fields.get("id")
    if raw_id is None or raw_id == "":
        item_id = f"{index:06d}"
    elif isinstance(raw_id, bool) or not isinstance(raw_id, (str, int)):
        raise _fail(source, line, f"'id' must be a string or an integer, got {raw_id!r}")
    else:
        item_id = str(raw_id).strip()
        if not ID_RE.fullmatch(item_id):
            raise _fail(source, line, f"id {item_id!r} is not a safe file name: use letters, digits, '.', '_' and '-' "
                        "(not first), at most 128 characters")
    seed = _as_int(fields.get("seed"), "seed", source, line)
    if seed is None:
        seed = base_seed + index
    if not 0 <= seed <= MAX_SEED:
        raise _fail(source, line, f"seed must be between 0 and 2**63-1, got {seed}")
    height, width = _as_size(fields, source, line)
    negative = fields.get("negative_prompt")
    if negative == "":
        negative = None
    if negative is not None and not isinstance(negative, str):
        raise _fail(source, line, f"'negative_prompt' must be a string, got {negative!r}")
    meta = fields.get("meta") or {}
    if not isinstance(meta, dict):
        raise _fail(source, line, f"'meta' must be a JSON object, got {meta!r}")
    return PromptItem(index=index, id=item_id, prompt=prompt.strip(), seed=seed, height=height, width=width,
                      negative_prompt=negative, words=_as_words(fields.get("words"), source, line), meta=meta, line=line)


def detect_format(path: str | os.PathLike[str]) -> str:
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return "csv"
    return "text"


def parse_prompts(text: str, fmt: str = "text", base_seed: int = 0, source: str = "<prompts>") -> list[PromptItem]:
    """Parse a prompt file's content.

    text:  one prompt per line; blank lines and lines starting with ``#`` are skipped.
    jsonl: one JSON object per line with ``prompt`` and optionally ``id``, ``seed``, ``size`` ("512" or
           "WIDTHxHEIGHT") or ``width``+``height``, ``words`` (list or space-separated), ``negative_prompt``,
           ``meta`` (object); other keys are errors (a typo must not be ignored). Blank lines are skipped.
    csv:   a header row with a ``prompt`` column; optional columns as for JSONL (``words``: space-separated or
           a JSON list); other columns are kept as strings in the item's ``meta`` (e.g. COCO ``image_id``).

    Items without a seed get ``base_seed + index``; items without an id get ``f"{index:06d}"``.
    Raises :class:`PromptFileError` naming the line.
    """
    if fmt not in FORMATS:
        raise PromptFileError(f"{source}: unknown prompt file format {fmt!r}; use one of {', '.join(FORMATS)}")
    text = text.removeprefix("\ufeff")
    rows: list[tuple[int, dict[str, Any]]] = []
    if fmt == "text":
        for n, line in enumerate(text.splitlines(), 1):
            s = line.strip()
            if s and not s.startswith("#"):
                rows.append((n, {"prompt": s}))
    elif fmt == "jsonl":
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise _fail(source, n, f"not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise _fail(source, n, f"each line must be a JSON object with a 'prompt', got {type(obj).__name__}")
            unknown = sorted(set(obj) - set(JSONL_KEYS))
            if unknown:
                raise _fail(source, n, f"unknown key(s) {', '.join(map(repr, unknown))}; allowed: {', '.join(JSONL_KEYS)}")
            rows.append((n, obj))
    else:
        dialect = "excel-tab" if source.lower().endswith(".tsv") else "excel"
        reader = csv.DictReader(io.StringIO(text, newline=""), dialect=dialect)
        header = [h.strip() for h in (reader.fieldnames or [])]
        if "prompt" not in header:
            raise _fail(source, 1, f"a CSV prompt file needs a 'prompt' column; the header has: {', '.join(header) or '(nothing)'}")
        reader.fieldnames = header
        for row in reader:
            n = reader.line_num
            if None in row:
                raise _fail(source, n, f"more cells than the header has columns ({len(header)})")
            if all((v or "").strip() == "" for v in row.values()):
                continue
            known = {k: v for k, v in row.items() if k in JSONL_KEYS and k != "meta"}
            extra = {k: v for k, v in row.items() if k not in JSONL_KEYS and k}
            rows.append((n, {**known, "meta": extra}))
    if not rows:
        raise PromptFileError(f"{source}: no prompts found (format {fmt})")
    items = [_item(fields, i, n, base_seed, source) for i, (n, fields) in enumerate(rows)]
    seen: dict[str, int] = {}
    for it in items:
        if it.id in seen:
            raise _fail(source, it.line, f"duplicate id {it.id!r} (first on line {seen[it.id]})")
        seen[it.id] = it.line
    return items


def read_prompts(path: str | os.PathLike[str], base_seed: int = 0, fmt: str | None = None) -> list[PromptItem]:
    """Read a prompt file (format from ``fmt`` or the suffix: .jsonl, .csv/.tsv, anything else is text)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptFileError(f"prompt file {str(p)!r} does not exist") from None
    except UnicodeDecodeError as e:
        raise PromptFileError(f"{p}: not UTF-8 text ({e})") from None
    return parse_prompts(text, fmt or detect_format(p), base_seed=base_seed, source=str(p))
