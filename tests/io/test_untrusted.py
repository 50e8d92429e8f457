"""Records and runs folders are untrusted input: whatever is changed in them, loading gives back the
original, another valid record, or the library's error -- never another exception, never slowly."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import PIL.Image
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daamkit.errors import DaamkitError
from daamkit.heatmap import GlobalHeatMap
from daamkit.io.record import MAX_IMAGE_PIXELS, MAX_IMAGE_SIDE, RecordError, RunRecord, load_record
from daamkit.io.runs import INDEX_NAME, index_entry, index_line, load_runs
from daamkit.tokens import TokenAlignment, Word

# Each load must answer well within the deadline; the example counts keep the file near 30 s on 2 cores.
FAST = settings(max_examples=60, deadline=2000, suppress_health_check=[HealthCheck.too_slow])


def _record() -> RunRecord:
    tokens = ("<|startoftext|>", "a</w>", "red</w>", "dog</w>", "<|endoftext|>", "<|endoftext|>")
    words = (Word("a", 0, 0, (1,), False, False), Word("red", 1, 0, (2,), False, False),
             Word("dog", 2, 0, (3,), False, False))
    maps = torch.rand(6, 2, 3, generator=torch.Generator().manual_seed(0))
    image = PIL.Image.new("RGB", (24, 16), (200, 10, 10))
    return RunRecord(prompt="a red dog", image=image,
                     heat_maps=GlobalHeatMap(maps, TokenAlignment(tokens, words, 6, "a red dog"), (16, 24),
                                             meta={"layers": ["up"]}),
                     seed=7, settings={"steps": 2, "trace": {"mode": "daam"}}, negative_prompt=None,
                     meta={"item": {"k": [1, 2]}})


ORIGINAL = _record()
with tempfile.TemporaryDirectory() as _d:
    ORIGINAL.save(Path(_d) / "r")
    DOC: dict[str, Any] = json.loads((Path(_d) / "r.json").read_text())
    TENSORS: bytes = (Path(_d) / "r.safetensors").read_bytes()


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


PATHS = _paths(DOC)[1:]


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"x": value} if depth % 2 else [value]
    return value


VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.sampled_from([-1, 0, 1, 10**6, 2**31, 2**64]),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
    st.lists(st.integers(-5, 100), max_size=4), st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
    st.integers(0, 300).map(_nested),
)
RAW_VALUES = st.sampled_from(["NaN", "Infinity", "-Infinity", "1e999", "9" * 5000, "[" * 5000 + "]" * 5000,
                              '"\\ud800"', "true"])


def _check(stem: Path, verify: bool = True) -> None:
    """Loading gives the original, or a valid record that round-trips, or a RecordError."""
    try:
        rec = load_record(stem, verify=verify)
    except RecordError:
        return
    if rec == ORIGINAL:
        return
    gm = rec.heat_maps
    h, w = gm.image_size
    assert h <= MAX_IMAGE_SIDE and w <= MAX_IMAGE_SIDE and h * w <= MAX_IMAGE_PIXELS
    for word in gm.alignment.words:
        assert all(0 <= p < gm.num_tokens for p in word.positions)
    gm.items(include_punctuation=True)  # every word's grid map can be computed
    rec.save(stem.with_name("again"))
    assert load_record(stem.with_name("again")) == rec


def _write(d: Path, doc_text: str | bytes, tensors: bytes = TENSORS) -> Path:
    (d / "r.safetensors").write_bytes(tensors)
    (d / "r.json").write_bytes(doc_text.encode() if isinstance(doc_text, str) else doc_text)
    return d / "r"


def _set(doc: Any, path: tuple, value: Any, delete: bool = False) -> Any:
    doc = json.loads(json.dumps(doc))
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


@FAST
@given(path=st.sampled_from(PATHS), value=VALUES, delete=st.booleans())
def test_json_field_replaced_or_deleted(path: tuple, value: Any, delete: bool) -> None:
    with tempfile.TemporaryDirectory() as d:
        _check(_write(Path(d), json.dumps(_set(DOC, path, value, delete))))


@FAST
@given(path=st.sampled_from(PATHS), raw=RAW_VALUES)
def test_json_field_replaced_by_hostile_text(path: tuple, raw: str) -> None:
    marker = "__MARKER__"
    text = json.dumps(_set(DOC, path, marker)).replace(json.dumps(marker), raw)
    with tempfile.TemporaryDirectory() as d:
        _check(_write(Path(d), text))


@FAST
@given(data=st.data())
def test_json_text_cut_or_spliced(data: st.DataObject) -> None:
    text = json.dumps(DOC).encode()
    at = data.draw(st.integers(0, len(text)))
    junk = data.draw(st.binary(max_size=20))
    keep = data.draw(st.booleans())
    with tempfile.TemporaryDirectory() as d:
        _check(_write(Path(d), text[:at] + junk + (text[at:] if keep else b"")))


@FAST
@given(data=st.data(), fix_checksum=st.booleans(), verify=st.booleans())
def test_safetensors_bytes_changed(data: st.DataObject, fix_checksum: bool, verify: bool) -> None:
    n = int.from_bytes(TENSORS[:8], "little")
    # mostly in the header (the structure), sometimes in the length prefix or the body
    where = data.draw(st.one_of(st.integers(8, 8 + n - 1), st.integers(0, len(TENSORS) - 1)))
    junk = data.draw(st.binary(min_size=1, max_size=8))
    tensors = TENSORS[:where] + junk + TENSORS[where + len(junk):]
    doc = DOC if not fix_checksum else {**DOC, "safetensors_sha256": hashlib.sha256(tensors).hexdigest()}
    with tempfile.TemporaryDirectory() as d:
        _check(_write(Path(d), json.dumps(doc), tensors), verify=verify)


@FAST
@given(header=st.dictionaries(st.sampled_from(["maps", "image", "__metadata__", "x"]),
                              st.one_of(VALUES, st.fixed_dictionaries({
                                  "dtype": st.sampled_from(["F32", "U8", "F64", "I64", "x"]),
                                  "shape": st.lists(st.integers(-1, 2**40), max_size=4),
                                  "data_offsets": st.lists(st.integers(-1, 2**40), max_size=3)})),
                              max_size=3))
def test_safetensors_header_crafted(header: dict) -> None:
    head = json.dumps(header).encode()
    tensors = len(head).to_bytes(8, "little") + head + bytes(64)
    doc = {**DOC, "safetensors_sha256": hashlib.sha256(tensors).hexdigest()}
    with tempfile.TemporaryDirectory() as d:
        _check(_write(Path(d), json.dumps(doc), tensors))


# -- runs folders --------------------------------------------------------------------------------------------
def _runs_folder(root: Path) -> list[dict[str, Any]]:
    (root / "records").mkdir(parents=True)
    entries = []
    for i in range(2):
        ORIGINAL.save(root / "records" / f"r{i}")
        entries.append(index_entry(f"r{i}", i, f"records/r{i}", prompt=ORIGINAL.prompt, seed=7, negative_prompt=None,
                                   words=None, meta={}, settings=ORIGINAL.settings, image_size=[16, 24]))
    (root.parent / "outside").mkdir()
    ORIGINAL.save(root.parent / "outside" / "x")
    return entries


ENTRY_PATHS = st.one_of(
    st.sampled_from(["../outside/x", "records/../../outside/x", "/tmp/x", "records/r1", "records//r0",
                     "./records/r0", "records/missing", "records", "C:/x", "records\\r0"]),
    st.text(max_size=12),
)


@FAST
@given(data=st.data())
def test_index_lines_mutated(data: st.DataObject) -> None:
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "runs"
        entries = _runs_folder(root)
        lines = [index_line(e) for e in entries]
        i = data.draw(st.integers(0, len(lines) - 1))
        action = data.draw(st.sampled_from(["path", "field", "delete", "line", "symlink"]))
        e = json.loads(lines[i])
        if action == "path":
            stem = data.draw(ENTRY_PATHS)
            e["paths"] = {"json": f"{stem}.json", "safetensors": f"{stem}.safetensors"}
        elif action == "field":
            e[data.draw(st.sampled_from(sorted(e)))] = data.draw(VALUES)
        elif action == "delete":
            del e[data.draw(st.sampled_from(sorted(e)))]
        elif action == "symlink":
            for suffix in (".json", ".safetensors"):
                (root / "records" / f"r{i}{suffix}").unlink()
                os.symlink(root.parent / "outside" / f"x{suffix}", root / "records" / f"r{i}{suffix}")
        lines[i] = (data.draw(st.text(max_size=30)) + "\n") if action == "line" else index_line(e)
        (root / INDEX_NAME).write_text("".join(lines), encoding="utf-8")
        outside = (root.parent / "outside").resolve()
        try:
            runs = load_runs(root)
            for entry, rec, err in runs.items_or_errors():
                if err is None:
                    assert rec == ORIGINAL
                    assert not runs.path(entry).resolve().is_relative_to(outside)
        except DaamkitError:
            pass


def test_symlink_out_of_the_folder_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    entries = _runs_folder(root)
    (root / INDEX_NAME).write_text("".join(index_line(e) for e in entries))
    for suffix in (".json", ".safetensors"):
        (root / "records" / f"r0{suffix}").unlink()
        os.symlink(tmp_path / "outside" / f"x{suffix}", root / "records" / f"r0{suffix}")
    runs = load_runs(root)
    with pytest.raises(RecordError, match="leads out of the runs directory"):
        runs.load("r0")
    assert runs.load("r1") == ORIGINAL
