"""``daamkit generate`` on a tiny Wan pipeline saved to disk: the video outputs and the video options."""

from __future__ import annotations

import json

import numpy as np
import pytest

from daamkit.cli import main
from daamkit.io.record import RunRecord

iio = pytest.importorskip("imageio.v3")  # the video extra


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    from daamkit.testing.families.wan import tiny_wan, wan_tokenizer

    tok = tmp_path_factory.mktemp("wan_tokenizer")
    wan_tokenizer(tok)
    d = tmp_path_factory.mktemp("tiny_wan")
    tiny_wan(tok).save_pretrained(d)
    return str(d)


def test_generate_on_a_video_pipeline_writes_videos_grids_scores_and_record(wan_dir, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["generate", "a red dog", "--model", wan_dir, "--steps", "2", "--size", "64x48", "--num-frames", "5",
               "--fps", "10", "--guidance", "5", "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    for name in ("video.mp4", "overlays/red.mp4", "overlays/dog.mp4", "overlays/red_frames.png",
                 "overlays/dog_frames.png", "frame_scores.png", "record.json", "record.safetensors", "summary.json"):
        assert (out / name).is_file(), name
    assert not (out / "image.png").exists()
    video = iio.imread(out / "video.mp4", index=None)
    assert video.shape == (5, 48, 64, 3) and iio.immeta(out / "video.mp4")["fps"] == 10
    assert iio.imread(out / "overlays" / "dog.mp4", index=None).shape == (5, 48, 64, 3)
    rec = RunRecord.load(out / "record")
    assert rec.is_video and rec.frames.shape == (5, 48, 64, 3) and rec.settings["fps"] == 10.0
    # the written video is the record's frames (up to H.264's loss)
    assert np.abs(video.mean(axis=(1, 2)) - rec.frames.mean(axis=(1, 2))).max() < 6
    (summary,) = json.loads((out / "summary.json").read_text())
    assert summary["num_frames"] == 5 and len(summary["words"]["dog"]["frame_scores"]) == 5
    printed = capsys.readouterr().out
    assert "video of 5 frames" in printed


@pytest.mark.parametrize("args, message", [
    (["--fps", "0"], "argument --fps: must lie in (0, 240]"),
    (["--num-frames", "0"], "argument --num-frames: must be at least 1"),
])
def test_bad_video_options_are_one_line(args, message, tmp_path, capsys):
    assert main(["generate", "a dog", "--model", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_video_options_on_an_image_model_are_refused(tmp_path, capsys, clip_tokenizer_dir):
    from daamkit.testing.pipelines import tiny_sd

    tiny_sd(clip_tokenizer_dir).save_pretrained(tmp_path / "sd")
    rc = main(["generate", "a dog", "--model", str(tmp_path / "sd"), "--steps", "1", "--size", "32",
               "--num-frames", "9", "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "--num-frames applies to video pipelines" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
