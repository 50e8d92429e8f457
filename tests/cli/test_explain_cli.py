"""``daamkit explain``: the outputs of ``daamkit generate`` for an image given, the image untouched, and
every bad input one line, exit 2 and nothing written."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from daamkit.cli import main
from daamkit.io.record import load_record

MODEL = str(Path(__file__).resolve().parents[2] / "src" / "daamkit" / "world" / "model")
FAST = ["--steps", "4", "--no-progress"]


@pytest.fixture(scope="module")
def scene_png(tmp_path_factory) -> Path:
    """A rendered shapes-world scene: an image the model never made."""
    from daamkit.world import make_scene

    path = tmp_path_factory.mktemp("explain_in") / "scene.png"
    make_scene(1, "test").image.save(path)
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def explain_args(image, out, *extra) -> list[str]:
    return ["explain", str(image), "--prompt", "a large red triangle and a blue circle", "--model", MODEL,
            "--out", str(out), *FAST, *extra]


@pytest.mark.parametrize("inversion", [[], ["--inversion", "ddim"]])
def test_explain_writes_what_generate_writes(scene_png, tmp_path, capsys, inversion):
    before = digest(scene_png)
    out = tmp_path / "out"
    assert main(explain_args(scene_png, out, "--strength", "0.5", "--open-vocabulary", "heart", *inversion)) == 0
    assert digest(scene_png) == before
    for name in ("image.png", "regenerated.png", "grid.png", "record.json", "record.safetensors", "summary.json",
                 "maps/triangle.png", "overlays/triangle.png", "masks/circle.png", "ovam/maps/heart.png"):
        assert (out / name).is_file(), name
    rec = load_record(out / "record")
    from PIL import Image

    with Image.open(scene_png) as original:
        assert np.array_equal(np.asarray(rec.image), np.asarray(original.convert("RGB")))
    assert rec.settings["strength"] == 0.5 and rec.settings["traced_steps"] == 2
    assert rec.settings["inversion"] == ("ddim" if inversion else None)
    assert rec.settings["source"] == str(scene_png) and rec.meta["explained"] is True
    summary = json.loads((out / "summary.json").read_text())
    assert summary[0]["regenerated"] == str(out / "regenerated.png") and Path(summary[0]["image"]).is_file()
    text = capsys.readouterr().out
    assert "2 traced steps" in text and "wrote" in text


def _one_line_exit_2(argv, capsys, phrase) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("daamkit: error:"), err
    assert phrase.lower() in err[0].lower(), err[0]


@pytest.mark.parametrize("strength", ["0", "-0.5", "1.5", "nan", "half"])
def test_strength_outside_0_1(scene_png, tmp_path, capsys, strength):
    _one_line_exit_2(explain_args(scene_png, tmp_path / "out", "--strength", strength), capsys, "--strength")
    assert not (tmp_path / "out").exists()


def test_bad_images(tmp_path, capsys):
    from PIL import Image

    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    odd = tmp_path / "odd.png"
    Image.new("RGB", (60, 64)).save(odd)
    for image, phrase in ((tmp_path / "missing.png", "does not exist"), (bad, "cannot be read as an image"),
                          (tmp_path, "not a file"), (odd, "60x64 pixels")):
        _one_line_exit_2(explain_args(image, tmp_path / "out"), capsys, phrase)
        assert not (tmp_path / "out").exists()
    assert odd.is_file() and bad.read_bytes().startswith(b"\x89PNG")


def test_no_step_left(scene_png, tmp_path, capsys):
    _one_line_exit_2(explain_args(scene_png, tmp_path / "out", "--strength", "0.1"), capsys, "no denoising step")
    assert not (tmp_path / "out").exists()


def test_unknown_inversion(scene_png, tmp_path, capsys):
    _one_line_exit_2(explain_args(scene_png, tmp_path / "out", "--inversion", "null"), capsys, "--inversion")


def test_inversion_on_an_unsupported_scheduler_leaves_nothing(scene_png, tmp_path, capsys):
    """A model whose scheduler DDIM cannot stand in for: refused after loading, and the staging folder
    is gone with it."""
    import shutil

    model = tmp_path / "flowmodel"
    shutil.copytree(MODEL, model)
    (model / "scheduler" / "scheduler_config.json").write_text(json.dumps(
        {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000}))
    index = json.loads((model / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    (model / "model_index.json").write_text(json.dumps(index))
    argv = explain_args(scene_png, tmp_path / "out", "--inversion", "ddim")
    argv[argv.index(MODEL)] = str(model)
    _one_line_exit_2(argv, capsys, "DDIM inversion needs a scheduler")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["flowmodel"]


def test_words_not_in_the_prompt(scene_png, tmp_path, capsys):
    _one_line_exit_2(explain_args(scene_png, tmp_path / "out", "--words", "dog"), capsys, "dog")
    assert not (tmp_path / "out").exists()
