"""Video pipelines through the jobs: generate's records and outputs, the batch runner, load_runs (tiny Wan)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from daamkit.errors import InputError
from daamkit.io.record import RunRecord
from daamkit.io.runs import load_runs
from daamkit.jobs.batch import BatchConfig, parse_prompts, run_batch
from daamkit.jobs.generate import (
    GenerateOptions,
    check_against_pipeline,
    generate,
    is_video_pipeline,
    write_outputs,
)

iio = pytest.importorskip("imageio.v3")  # the video extra


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    from daamkit.testing.families.wan import tiny_wan, wan_tokenizer

    d = tmp_path_factory.mktemp("wan_tokenizer")
    wan_tokenizer(d)
    return tiny_wan(d)


OPTS = {"steps": 2, "height": 48, "width": 64, "guidance_scale": 5.0, "progress": False}


def test_generate_makes_a_video_record_and_its_outputs(wan, tmp_path):
    assert is_video_pipeline(wan)
    (rec,) = generate(wan, "a red dog", GenerateOptions(num_frames=9, fps=8.0, **OPTS))
    hm = rec.heat_maps
    assert rec.is_video and rec.image is None and hm.num_frames == 9 and hm.maps.shape[1] == 3
    assert rec.frames.shape == (9, 48, 64, 3) and rec.frames.dtype == np.uint8
    assert rec.settings["num_frames"] == 9 and rec.settings["fps"] == 8.0

    paths = write_outputs(rec, tmp_path / "out")
    out = tmp_path / "out"
    assert paths["video"] == str(out / "video.mp4") and paths["fps"] == 8.0
    assert iio.imread(out / "video.mp4", index=None).shape == (9, 48, 64, 3)
    assert iio.immeta(out / "video.mp4")["fps"] == 8.0
    for word in ("red", "dog"):
        entry = paths["words"][word]
        assert iio.imread(entry["overlay_video"], index=None).shape == (9, 48, 64, 3)
        assert entry["frames"].endswith(f"{word}_frames.png")
        assert np.allclose(entry["frame_scores"], hm.word(word).frame_scores().numpy())
    assert (out / "frame_scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "image.png").exists() and not (out / "grid.png").exists()
    back = RunRecord.load(out / "record")
    assert back == rec and np.array_equal(back.frames, rec.frames)


def test_video_options_are_refused_for_an_image_pipeline(wan):
    from types import SimpleNamespace

    class ImagePipe:  # an image pipeline's call: no num_frames
        def __call__(self, prompt, num_inference_steps=1):
            return SimpleNamespace(images=[])

    with pytest.raises(InputError, match="--num-frames applies to video pipelines; ImagePipe makes images"):
        check_against_pipeline(ImagePipe(), GenerateOptions(num_frames=9))
    with pytest.raises(InputError, match="fps"):
        GenerateOptions(fps=0).check()
    with pytest.raises(InputError, match="num_frames"):
        GenerateOptions(num_frames=0).check()
    # image settings keep the keys they always had
    assert "num_frames" not in GenerateOptions().settings() and "fps" not in GenerateOptions().settings()


def test_batch_of_videos_indexes_frames_and_tabulates_frame_scores(wan, tmp_path):
    items = parse_prompts("a red dog\na blue cat\n", "text", base_seed=0)
    config = BatchConfig(model="tiny-wan", steps=2, height=48, width=64, guidance_scale=5.0, progress=False,
                         num_frames=5)
    summary = run_batch(items, tmp_path, config, pipe=wan, log=lambda m: None)
    assert summary["generated"] == 2
    lines = [json.loads(x) for x in (tmp_path / "index.jsonl").read_text().splitlines()]
    assert [e["num_frames"] for e in lines] == [5, 5]
    runs = load_runs(tmp_path)
    rec = runs.load("000000")
    assert rec.frames.shape == (5, 48, 64, 3) and rec.heat_maps.num_frames == 5
    rows = list(runs.frame_scores())
    words = {"000000": ["a", "red", "dog"], "000001": ["a", "blue", "cat"]}
    assert len(rows) == sum(len(w) for w in words.values()) * 5
    dog = [r["score"] for r in rows if r["id"] == "000000" and r["word"] == "dog"]
    assert np.allclose(dog, rec.heat_maps.word("dog").frame_scores().numpy())
    assert {r["word"] for r in runs.frame_scores(words=["cat"])} == {"cat"}
    # a folder of records without its index is scanned to the same entries
    (tmp_path / "index.jsonl").unlink()
    assert [e["num_frames"] for e in load_runs(tmp_path).entries] == [5, 5]
    # resuming finds both records done
    assert run_batch(items, tmp_path, config, pipe=wan, log=lambda m: None)["generated"] == 0
