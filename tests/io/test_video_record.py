"""Video records: (T, F, h, w) maps, the time axis and the frames round-trip exactly; damaged or crafted
ones give a RecordError; the time axis's JSON is checked like the rest."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from daamkit.frames import TimeAxis
from daamkit.io.record import (
    FORMAT_VERSION,
    MAX_VIDEO_FRAMES,
    MAX_VIDEO_VOXELS,
    RecordError,
    RunRecord,
    load_record,
)
from daamkit.testing.video import video_frames, video_heat_maps

FAST = settings(max_examples=50, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
TIME = TimeAxis(frames=3, compression=4, causal=True)  # 9 video frames


def _record(frames: bool = True, channels: int = 3) -> RunRecord:
    hm = video_heat_maps(TIME, grid=(4, 6), image_size=(16, 24))
    hm.maps.add_(torch.rand(hm.maps.shape, generator=torch.Generator().manual_seed(0)) * 1e-3)
    arr = video_frames(TIME.num_frames, (16, 24))[..., :channels].copy() if frames else None
    return RunRecord(prompt=hm.prompt, image=None, heat_maps=hm, seed=3, settings={"num_frames": 9, "fps": 16.0},
                     meta={"k": 1}, frames=arr)


ORIGINAL = _record()
with tempfile.TemporaryDirectory() as _d:
    ORIGINAL.save(Path(_d) / "r")
    DOC: dict[str, Any] = json.loads((Path(_d) / "r.json").read_text())
    TENSORS: bytes = (Path(_d) / "r.safetensors").read_bytes()


def _write(d: Path, doc: dict[str, Any] | str, tensors: bytes = TENSORS, fix_checksum: bool = False) -> Path:
    text = doc if isinstance(doc, str) else json.dumps(doc)
    if fix_checksum:
        text = json.dumps({**json.loads(text), "safetensors_sha256": hashlib.sha256(tensors).hexdigest()})
    (d / "r.safetensors").write_bytes(tensors)
    (d / "r.json").write_text(text)
    return d / "r"


# -- round trip -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("frames, channels", [(True, 3), (True, 1), (True, 4), (False, 3)])
def test_video_record_round_trips_exactly(tmp_path, frames, channels):
    rec = _record(frames, channels)
    st_path, js = rec.save(tmp_path / "v")
    back = load_record(tmp_path / "v")
    assert torch.equal(back.heat_maps.maps, rec.heat_maps.maps) and back.heat_maps.maps.shape == (12, 3, 4, 6)
    assert back.heat_maps.time == TIME and back.heat_maps.meta == rec.heat_maps.meta
    assert back.image is None and back.is_video
    if frames:
        assert back.frames.dtype == np.uint8 and np.array_equal(back.frames, rec.frames)
    else:
        assert back.frames is None
    assert back == rec
    doc = json.loads(js.read_text())
    assert doc["format_version"] == FORMAT_VERSION == 2
    assert doc["video"] == ({"tensor": "frames"} if frames else None)
    # equal records compare equal, different frames do not
    if frames:
        other = _record(frames, channels)
        other.frames = other.frames.copy()
        other.frames[0, 0, 0, 0] ^= 1
        assert other != rec


def test_image_records_keep_format_version_1(tmp_path):
    import PIL.Image

    one = _record().heat_maps.frame(4)  # an image's maps
    _, js = RunRecord("p", PIL.Image.new("RGB", (24, 16)), one).save(tmp_path / "i")
    doc = json.loads(js.read_text())
    assert doc["format_version"] == 1 and "video" not in doc
    assert load_record(tmp_path / "i").frames is None


def test_save_refuses_what_would_not_be_a_video_record(tmp_path):
    rec = _record()
    with pytest.raises(ValueError, match="frames"):
        RunRecord(rec.prompt, None, rec.heat_maps, frames=rec.frames[:4]).save(tmp_path / "a")
    import PIL.Image

    img = PIL.Image.new("RGB", (24, 16))
    with pytest.raises(ValueError, match="not both"):
        RunRecord(rec.prompt, img, rec.heat_maps, frames=rec.frames).save(tmp_path / "b")
    with pytest.raises(ValueError, match="not an image"):
        RunRecord(rec.prompt, img, rec.heat_maps).save(tmp_path / "c")
    with pytest.raises(ValueError, match="image's"):
        RunRecord(rec.prompt, None, rec.heat_maps.frame(0), frames=rec.frames).save(tmp_path / "d")
    assert list(tmp_path.iterdir()) == []


# -- damaged or crafted ---------------------------------------------------------------------------------------
def _tensors_with(**changes: torch.Tensor | None) -> bytes:
    tensors = dict(st_load(TENSORS))
    for k, v in changes.items():
        if v is None:
            tensors.pop(k)
        else:
            tensors[k] = v
    return st_save(tensors, metadata={"format": "daamkit.run", "format_version": "2"})


def _declare(doc: dict[str, Any], tensors: bytes) -> dict[str, Any]:
    doc = json.loads(json.dumps(doc))
    doc["tensors"] = {k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
                      for k, v in st_load(tensors).items()}
    return doc


def _with_time(**time: Any) -> dict[str, Any]:
    doc = json.loads(json.dumps(DOC))
    doc["heat_maps"]["meta"]["time"] = {**doc["heat_maps"]["meta"]["time"], **time}
    return doc


@pytest.mark.parametrize("case, message", [
    ("maps_frames", "token frames"),
    ("too_many_frames", "more than"),
    ("too_long_output", "outside 1..4096"),
    ("huge_factor", "outside"),
    ("bad_time_type", "wrong type"),
    ("unknown_time_key", "unknown key"),
    ("frame_count", "shape mismatch: frames tensor"),
    ("frames_no_video", "holds a video's frames"),
    ("version_1", "format_version 2"),
    ("image_and_video", "video's record holds frames"),
    ("video_without_time", "no time axis"),
])
def test_damaged_video_records_are_refused_in_one_line(tmp_path, case, message):
    doc, tensors = DOC, TENSORS
    if case == "maps_frames":
        doc = _with_time(frames=4)
    elif case == "too_many_frames":
        doc = _with_time(frames=2000)  # 1 + 1999 x 4 video frames
    elif case == "too_long_output":
        doc = _with_time(output=MAX_VIDEO_FRAMES + 1)
    elif case == "huge_factor":
        doc = _with_time(compression=10**6)
    elif case == "bad_time_type":
        doc = _with_time(causal="yes")
    elif case == "unknown_time_key":
        doc = _with_time(speed=2)
    elif case == "frame_count":
        tensors = _tensors_with(frames=torch.zeros(8, 16, 24, 3, dtype=torch.uint8))
        doc = _declare(DOC, tensors)
    elif case == "frames_no_video":
        doc = {**DOC, "video": None}
    elif case == "version_1":
        doc = {**DOC, "format_version": 1}
    elif case == "image_and_video":
        doc = {**DOC, "image": {"tensor": "image", "mode": "RGB"}}
    elif case == "video_without_time":
        tensors = _tensors_with(maps=st_load(TENSORS)["maps"][:, 0].contiguous())
        doc = _declare(DOC, tensors)
        doc["heat_maps"]["meta"] = {"steps": [0, 1]}
    with pytest.raises(RecordError, match=message) as e:
        load_record(_write(tmp_path, doc, tensors, fix_checksum=True))
    assert "\n" not in str(e.value)


def test_video_size_is_bounded(tmp_path):
    # the most frames a record may have, each 448 x 672 (on the 4 x 6 grid): past the bound on frames x pixels
    doc = _with_time(output=MAX_VIDEO_FRAMES)
    doc["heat_maps"]["image_size"] = [448, 672]
    assert MAX_VIDEO_FRAMES * 448 * 672 > MAX_VIDEO_VOXELS
    with pytest.raises(RecordError, match="frames x pixels"):
        load_record(_write(tmp_path, doc, fix_checksum=True))


def _check(stem: Path, verify: bool = True) -> None:
    """Loading gives the original, or a valid record that round-trips, or a RecordError."""
    try:
        rec = load_record(stem, verify=verify)
    except RecordError:
        return
    if rec == ORIGINAL:
        return
    gm = rec.heat_maps
    if gm.is_video:
        assert gm.num_frames <= MAX_VIDEO_FRAMES
        assert gm.num_frames * gm.image_size[0] * gm.image_size[1] <= MAX_VIDEO_VOXELS
        assert rec.frames is None or rec.frames.shape[:3] == (gm.num_frames, *gm.image_size)
        gm.frame_scores()  # every word's score on every frame can be computed
    rec.save(stem.with_name("again"))
    assert load_record(stem.with_name("again")) == rec


def _paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            out += _paths(v, (*prefix, i))
    return out


# the fields a video record adds, and their parents
PATHS = [p for p in _paths(DOC)[1:] if p[:1] in (("video",), ("tensors",), ("format_version",))
         or p[:3] == ("heat_maps", "meta", "time") or p[:2] == ("heat_maps", "grid_size")]
VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.sampled_from([-1, 0, 1, 2, 9, 4096, 4097, 2**64]),
    st.floats(allow_nan=False), st.text(max_size=8), st.lists(st.integers(-2, 10), max_size=5),
    st.dictionaries(st.sampled_from(["frames", "patch", "skip", "compression", "causal", "output", "x"]),
                    st.integers(-2, 10), max_size=4),
)


@FAST
@given(path=st.sampled_from(PATHS), value=VALUES, delete=st.booleans())
def test_video_json_field_replaced_or_deleted(path: tuple, value: Any, delete: bool) -> None:
    doc = json.loads(json.dumps(DOC))
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    with tempfile.TemporaryDirectory() as d:
        _check(_write(Path(d), doc, fix_checksum=True))


@FAST
@given(shape=st.lists(st.integers(0, 12), min_size=1, max_size=5), channels_last=st.booleans())
def test_frames_tensor_of_any_shape(shape: list[int], channels_last: bool) -> None:
    tensors = _tensors_with(frames=torch.zeros(shape, dtype=torch.uint8))
    with tempfile.TemporaryDirectory() as d:
        _check(_write(Path(d), _declare(DOC, tensors), tensors, fix_checksum=True))


@FAST
@given(data=st.data(), fix_checksum=st.booleans())
def test_video_safetensors_bytes_changed(data: st.DataObject, fix_checksum: bool) -> None:
    n = int.from_bytes(TENSORS[:8], "little")
    where = data.draw(st.one_of(st.integers(8, 8 + n - 1), st.integers(0, len(TENSORS) - 1)))
    junk = data.draw(st.binary(min_size=1, max_size=8))
    tensors = TENSORS[:where] + junk + TENSORS[where + len(junk):]
    with tempfile.TemporaryDirectory() as d:
        _check(_write(Path(d), DOC, tensors, fix_checksum=fix_checksum))


# -- the time axis's JSON -------------------------------------------------------------------------------------
AXES = st.builds(
    lambda frames, patch, skip, compression, causal, output: TimeAxis(
        frames=frames, patch=patch, skip=skip % (frames * patch), compression=compression, causal=causal,
        output=output),
    st.integers(1, 64), st.integers(1, 4), st.integers(0, 1000), st.integers(1, 8), st.booleans(),
    st.none() | st.integers(1, 500),
)


@given(AXES)
def test_time_axis_json_round_trips(time: TimeAxis) -> None:
    text = json.dumps(time.to_json())
    assert TimeAxis.from_json(json.loads(text)) == time
    # every video frame lies on a plane the maps have
    assert all(0 <= p < time.frames for p in time.index())


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)


@given(st.one_of(JSONISH, st.dictionaries(
    st.sampled_from(["frames", "patch", "skip", "compression", "causal", "output", "extra"]),
    st.one_of(JSONISH, st.sampled_from([1e400, -1e400, "3", 2**80])), max_size=6)))
def test_time_axis_from_json_gives_an_axis_or_a_value_error(data: Any) -> None:
    try:
        time = TimeAxis.from_json(data)
    except ValueError as e:
        assert "\n" not in str(e)
        return
    assert time.frames >= 1 and time.patch >= 1 and time.compression >= 1 and 0 <= time.skip < time.frames * time.patch
