"""The command line on a tiny SD pipeline saved to disk."""

from __future__ import annotations

import json

import pytest

from daamkit.cli import main
from daamkit.errors import InputError
from daamkit.io.record import RunRecord
from daamkit.jobs.generate import parse_size, parse_steps
from daamkit.testing.pipelines import tiny_sd


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory, clip_tokenizer_dir):
    d = tmp_path_factory.mktemp("tiny_sd")
    tiny_sd(clip_tokenizer_dir).save_pretrained(d)
    return str(d)


def test_generate_writes_image_maps_overlays_grid_and_record(sd_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["generate", "a red dog on a bench", "--model", sd_dir, "--steps", "2", "--size", "48x32",
               "--seed", "3", "--out", str(out), "--no-progress", "--steps-range", "0:2", "--layers", "up", "down"])
    assert rc == 0
    for name in ("image.png", "grid.png", "record.json", "record.safetensors", "summary.json",
                 "maps/dog.png", "overlays/dog.png", "overlays/bench.png"):
        assert (out / name).is_file(), name
    rec = RunRecord.load(out / "record")
    assert rec.prompt == "a red dog on a bench" and rec.seed == 3
    assert rec.image.size == (48, 32)  # width x height
    assert rec.heat_maps.image_size == (32, 48)
    assert rec.settings["trace"]["layers"] == ["up", "down"] and rec.settings["trace"]["steps"] == [0, 1]
    assert "wrote" in capsys.readouterr().out


def test_generate_open_vocabulary_writes_ovam_maps_beside_daam(sd_dir, tmp_path, capsys):
    out = tmp_path / "ovam"
    rc = main(["generate", "a red dog on a bench", "--model", sd_dir, "--steps", "2", "--size", "48x32",
               "--out", str(out), "--no-progress", "--open-vocabulary", "cat, traffic light"])
    assert rc == 0
    for name in ("maps/dog.png", "ovam/maps/cat.png", "ovam/overlays/traffic.png", "ovam/masks/light.png",
                 "ovam/grid.png", "ovam/record.json"):
        assert (out / name).is_file(), name
    rec = RunRecord.load(out / "ovam" / "record")
    assert rec.heat_maps.words == ["cat", "traffic", "light"] and rec.heat_maps.meta["method"] == "ovam"
    assert rec.settings["open_vocabulary"] == ["cat", "traffic light"]
    assert RunRecord.load(out / "record").heat_maps.words[:3] == ["a", "red", "dog"]
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary[0]["methods"]["ovam"]["words"]) == {"cat", "traffic", "light"}
    assert "open vocabulary (ovam/): cat, traffic, light" in capsys.readouterr().out
    assert main(["generate", "a dog", "--model", sd_dir, "--open-vocabulary", "cat,,dog",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "--open-vocabulary holds an empty word" in capsys.readouterr().err


def test_generate_selected_words_and_unknown_word(sd_dir, tmp_path, capsys):
    out = tmp_path / "w"
    assert main(["generate", "a red dog", "--model", sd_dir, "--steps", "1", "--size", "32",
                 "--words", "dog", "--out", str(out), "--no-progress"]) == 0
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["dog.png"]
    rc = main(["generate", "a red dog", "--model", sd_dir, "--steps", "1", "--size", "32",
               "--words", "cat", "--out", str(tmp_path / "x"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "'cat'" in err and "red" in err and "dog" in err and "Traceback" not in err


def test_model_path_errors_are_clear(tmp_path, capsys):
    assert main(["generate", "a dog", "--model", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate", "a dog", "--model", str(tmp_path)]) == 2
    assert "no model_index.json" in capsys.readouterr().err
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"")
    assert main(["generate", "a dog", "--model", str(ckpt)]) == 2
    assert "--config" in capsys.readouterr().err


def test_unsupported_pipeline_folder_names_supported_families(tmp_path, capsys):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    unet = UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 32),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    assert main(["generate", "a dog", "--model", str(tmp_path / "ddpm")]) == 2
    err = capsys.readouterr().err
    assert "DDPMPipeline" in err and "Stable Diffusion 1.x/2.x, SDXL" in err and "daamkit families" in err


def test_argument_parsing():
    assert parse_size("512") == (512, 512)
    assert parse_size("768x512") == (512, 768)
    assert parse_steps("2:5") == range(2, 5) and parse_steps("0,3") == [0, 3]
    for bad in ("12x", "0", "30"):
        with pytest.raises(InputError, match="--size"):
            parse_size(bad)
    with pytest.raises(InputError, match="--steps-range"):
        parse_steps("a:b")
    json.dumps(list(parse_steps("0:3")))
