"""RunRecord save/load: exact round trip, atomic writes, clear errors for damaged or foreign files."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from safetensors.torch import save as st_save

from daamkit.heatmap import GlobalHeatMap
from daamkit.io import record as record_mod
from daamkit.io.record import FORMAT_VERSION, RecordError, RunRecord, load_record, record_paths
from daamkit.tokens import TokenAlignment, Word


def make_alignment() -> TokenAlignment:
    # "a giraffe and a dog": BOS, a, gir+affe, and, a, dog, EOS, padding to 12.
    tokens = ("<|startoftext|>", "a</w>", "gir", "affe</w>", "and</w>", "a</w>", "dog</w>", "<|endoftext|>")
    tokens += ("<|endoftext|>",) * 4
    words = (
        Word("a", 0, 0, (1,), False, False),
        Word("giraffe", 1, 0, (2, 3), False, False),
        Word("and", 2, 0, (4,), False, False),
        Word("a", 3, 1, (5,), False, False),
        Word("dog", 4, 0, (6,), False, False),
    )
    return TokenAlignment(tokens, words, 12, "A giraffe and a dog")


def make_record(image: bool = True, mode: str = "RGB") -> RunRecord:
    g = torch.Generator().manual_seed(1)
    maps = torch.rand(12, 3, 5, generator=g) * 1e-3  # non-square grid, awkward float values
    gm = GlobalHeatMap(
        maps, make_alignment(), (24, 40), meta={"layers": ["up.0", "up.1"], "steps": [0, 1, 2]}
    )
    img = None
    if image:
        channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[mode]
        arr = np.random.default_rng(0).integers(0, 256, (24, 40, channels), dtype=np.uint8)
        img = PIL.Image.fromarray(arr[:, :, 0] if channels == 1 else arr)
        assert img.mode == mode
    return RunRecord(
        prompt="A giraffe and a dog",
        image=img,
        heat_maps=gm,
        seed=1234,
        settings={
            "steps": 3,
            "guidance_scale": 7.5,
            "size": [24, 40],
            "model": "tiny",
            "nested": {"x": None},
        },
        negative_prompt="blurry",
        meta={"note": "ünïcode ✓", "pi": 3.141592653589793},
    )


@pytest.fixture
def saved(tmp_path: Path) -> tuple[RunRecord, Path]:
    rec = make_record()
    stem = tmp_path / "run.v1"  # a dot in the stem must survive
    rec.save(stem)
    return rec, stem


def test_round_trip_exact(saved) -> None:
    rec, stem = saved
    st, js = record_paths(stem)
    assert st.name == "run.v1.safetensors" and js.name == "run.v1.json"
    for path in (stem, js, st, str(stem)):
        back = RunRecord.load(path)
        assert torch.equal(back.heat_maps.maps, rec.heat_maps.maps)
        assert back.heat_maps.maps.dtype == torch.float32
        assert back.image.mode == rec.image.mode and back.image.tobytes() == rec.image.tobytes()
        assert back.settings == rec.settings and back.meta == rec.meta
        assert back.heat_maps.meta == rec.heat_maps.meta
        assert back.heat_maps.alignment == rec.heat_maps.alignment
        assert back.heat_maps.image_size == (24, 40)
        assert (back.prompt, back.seed, back.negative_prompt) == (rec.prompt, 1234, "blurry")
        assert back == rec
    # The loaded maps behave like the originals.
    assert torch.equal(back.heat_maps.word("giraffe").value, rec.heat_maps.word("giraffe").value)


def test_json_sidecar_contents(saved) -> None:
    _, stem = saved
    st, js = record_paths(stem)
    doc = json.loads(js.read_text(encoding="utf-8"))
    assert doc["format"] == "daamkit.run" and doc["format_version"] == 1
    assert doc["safetensors_sha256"] == hashlib.sha256(st.read_bytes()).hexdigest()
    assert doc["tensors"]["maps"] == {"dtype": "float32", "shape": [12, 3, 5]}
    assert doc["tensors"]["image"] == {"dtype": "uint8", "shape": [24, 40, 3]}
    assert doc["heat_maps"]["image_size"] == [24, 40]
    umask = os.umask(0)
    os.umask(umask)
    assert st.stat().st_mode & 0o777 == 0o666 & ~umask  # not tempfile's 0600


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA"])
def test_round_trip_image_modes(tmp_path: Path, mode: str) -> None:
    rec = make_record(mode=mode)
    rec.save(tmp_path / "r")
    back = load_record(tmp_path / "r")
    assert back.image.mode == mode and back.image.tobytes() == rec.image.tobytes()


def test_round_trip_without_image_and_overwrite(tmp_path: Path) -> None:
    make_record().save(tmp_path / "r")
    rec = make_record(image=False)
    rec.seed = None
    rec.save(tmp_path / "r.json")  # overwrite the same record by naming its JSON
    back = load_record(tmp_path / "r")
    assert back.image is None and back.seed is None and back == rec
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.safetensors"]  # no temp files left


def test_save_refuses_what_would_not_round_trip(tmp_path: Path) -> None:
    rec = make_record()
    rec.settings = {"size": (24, 40)}
    with pytest.raises(ValueError, match="tuple"):
        rec.save(tmp_path / "a")
    rec.settings = {1: "x"}
    with pytest.raises(ValueError, match="non-string key"):
        rec.save(tmp_path / "a")
    rec.settings = {"g": float("nan")}
    with pytest.raises(ValueError, match="NaN"):
        rec.save(tmp_path / "a")
    rec = make_record()
    rec.image = rec.image.resize((20, 24))
    with pytest.raises(ValueError, match="image is"):
        rec.save(tmp_path / "a")
    assert list(tmp_path.iterdir()) == []  # nothing written on refusal


def test_crash_between_renames_is_not_taken_as_complete(tmp_path: Path, monkeypatch) -> None:
    real_replace = os.replace
    calls = []

    def flaky_replace(src, dst):
        calls.append(dst)
        if str(dst).endswith(".json"):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(record_mod.os, "replace", flaky_replace)
    with pytest.raises(OSError, match="disk full"):
        make_record().save(tmp_path / "r")
    monkeypatch.setattr(record_mod.os, "replace", real_replace)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.safetensors"]  # temp JSON cleaned up
    with pytest.raises(RecordError, match="missing sidecar"):
        load_record(tmp_path / "r")


# -- damage ------------------------------------------------------------------------------------------------
def rewrite_tensors(stem: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Replace the tensor file and fix the checksum, so only the structural check can catch it."""
    st, js = record_paths(stem)
    data = st_save(tensors)
    st.write_bytes(data)
    doc = json.loads(js.read_text())
    doc["safetensors_sha256"] = hashlib.sha256(data).hexdigest()
    js.write_text(json.dumps(doc))


def edit_json(stem: Path, **changes) -> None:
    js = record_paths(stem)[1]
    doc = json.loads(js.read_text())
    doc.update(changes)
    js.write_text(json.dumps(doc))


def test_record_error_is_value_error() -> None:
    assert issubclass(RecordError, ValueError)


def test_nothing_there(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no daamkit record"):
        load_record(tmp_path / "nope")


def test_missing_sidecar(saved) -> None:
    _, stem = saved
    record_paths(stem)[1].unlink()
    with pytest.raises(RecordError, match="missing sidecar") as e:
        load_record(record_paths(stem)[0])
    assert "a daamkit run record is a pair" in str(e.value)


def test_missing_tensor_file(saved) -> None:
    _, stem = saved
    record_paths(stem)[0].unlink()
    with pytest.raises(RecordError, match="missing tensor file"):
        load_record(stem)


def test_wrong_format_name(saved) -> None:
    _, stem = saved
    edit_json(stem, format="something.else")
    with pytest.raises(RecordError, match="foreign file: format is 'something.else'"):
        load_record(stem)


def test_foreign_json(saved) -> None:
    _, stem = saved
    record_paths(stem)[1].write_text('{"name": "a package.json"}')
    with pytest.raises(RecordError, match="foreign JSON"):
        load_record(stem)
    record_paths(stem)[1].write_text("[1, 2")
    with pytest.raises(RecordError, match="not valid JSON"):
        load_record(stem)


def test_version_too_new(saved) -> None:
    _, stem = saved
    edit_json(stem, format_version=FORMAT_VERSION + 1)
    with pytest.raises(RecordError, match="newer than this daamkit reads"):
        load_record(stem)


def test_checksum_mismatch(saved) -> None:
    _, stem = saved
    st = record_paths(stem)[0]
    data = bytearray(st.read_bytes())
    data[-1] ^= 0xFF  # flip bits in the last tensor byte: still parseable, different content
    st.write_bytes(bytes(data))
    with pytest.raises(RecordError, match="checksum mismatch"):
        load_record(stem)
    assert load_record(stem, verify=False).prompt == "A giraffe and a dog"  # structure still fine


def test_truncated_safetensors(saved) -> None:
    _, stem = saved
    st = record_paths(stem)[0]
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(RecordError, match="truncated safetensors"):
        load_record(stem)
    st.write_bytes(data[:5])
    with pytest.raises(RecordError, match="truncated safetensors"):
        load_record(stem)


def test_missing_tensor(saved) -> None:
    rec, stem = saved
    rewrite_tensors(stem, {"image": torch.from_numpy(np.asarray(rec.image).copy())})
    with pytest.raises(RecordError, match="missing tensor 'maps'"):
        load_record(stem)


def test_shape_mismatch(saved) -> None:
    rec, stem = saved
    image = torch.from_numpy(np.asarray(rec.image).copy())
    rewrite_tensors(stem, {"maps": torch.zeros(12, 4, 5), "image": image})  # JSON says (12, 3, 5)
    with pytest.raises(RecordError, match="shape mismatch"):
        load_record(stem)
    # Consistent with the JSON's tensor table but not with the token alignment (12 tokens).
    rewrite_tensors(stem, {"maps": torch.zeros(11, 3, 5), "image": image})
    doc = json.loads(record_paths(stem)[1].read_text())
    doc["tensors"]["maps"]["shape"] = [11, 3, 5]
    record_paths(stem)[1].write_text(json.dumps(doc))
    with pytest.raises(RecordError, match="shape mismatch.*alignment has 12 tokens"):
        load_record(stem)
    rewrite_tensors(stem, {"maps": rec.heat_maps.maps, "image": image[:10]})
    with pytest.raises(RecordError, match="shape mismatch"):
        load_record(stem)


def test_wrong_dtype(saved) -> None:
    rec, stem = saved
    rewrite_tensors(
        stem, {"maps": rec.heat_maps.maps.double(), "image": torch.zeros(24, 40, 3, dtype=torch.uint8)}
    )
    with pytest.raises(RecordError, match="dtype"):
        load_record(stem)


@pytest.mark.slow  # ~1 s on its own; most of its wall time is importing diffusers, shared with test_trace
def test_round_trip_of_a_traced_run(tmp_path: Path, clip_tokenizer_dir: str) -> None:
    # End to end with the real pieces: trace a tiny SD pipeline (non-square), save, load, plot.
    from daamkit import trace
    from daamkit.testing.pipelines import tiny_sd

    pipe = tiny_sd(clip_tokenizer_dir)
    prompt = "a red dog, a dog on a bench"
    with trace(pipe) as tc:
        image = pipe(
            prompt, num_inference_steps=2, height=32, width=48, generator=torch.Generator().manual_seed(0)
        )
        image = image.images[0]
        maps = tc.heat_maps(0)
    assert maps.image_size == (image.height, image.width) == (32, 48)
    rec = RunRecord(prompt=prompt, image=image, heat_maps=maps, seed=0, settings={"steps": 2})
    rec.save(tmp_path / "run")
    back = load_record(tmp_path / "run.safetensors")
    assert back == rec
    assert torch.equal(back.heat_maps.word("dog", occurrence=1).value, maps.word("dog", occurrence=1).value)
    fig = back.heat_maps.plot_grid(back.image)
    assert [a.get_title() for a in fig.axes if getattr(a, "_colorbar", None) is None] == maps.words
