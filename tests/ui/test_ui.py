"""The web app's logic (daamkit.ui.session) and wiring (daamkit.ui.app) without a browser.

The browser test is tests/ui/test_ui_browser.py; what the app exposes is tests/ui/test_ui_exposure.py.
"""

from __future__ import annotations

import argparse
import json
import zipfile

import numpy as np
import pytest

from daamkit.cli.ui import add_arguments
from daamkit.io.record import RunRecord
from daamkit.ui.session import UIError, UISession, default_size, display_size, readable_error


@pytest.fixture()
def session(pipe, tmp_path):
    calls = []

    def loader(path, device, dtype):
        calls.append(path)
        return pipe

    s = UISession("unused-path", work_dir=tmp_path / "work", loader=loader, allowed_dir=tmp_path)
    s.loads = calls
    yield s
    s.close()


def _gen(session, prompt="a red dog on a bench", **kw):
    kw = {"seed": 0, "steps": 2, "width": 64, "height": 64, "guidance": 5.0} | kw
    return session.generate(prompt, **kw)


def test_generate_loads_once_and_writes_downloads(session):
    assert session.loads == []  # lazy: nothing loaded before the first Generate
    run = _gen(session)
    run2 = _gen(session, "a blue cat", seed=1)
    assert len(session.loads) == 1
    assert run.words == ["a", "red", "dog", "on", "bench"] and run2.words == ["a", "blue", "cat"]
    assert run.record.seed == 0 and run.record.settings["steps"] == 2
    assert run.record.image.size == (64, 64)
    # the record zip holds the core's record pair (and opens again, exactly)
    with zipfile.ZipFile(run.record_zip) as z:
        assert {"record.json", "record.safetensors", "grid.png", "image.png"} <= set(z.namelist())
        assert json.loads(z.read("record.json"))["format"] == "daamkit.run"
    assert run.grid_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert RunRecord.load(run.folder / "record").heat_maps == run.heat_maps
    assert "Generated" in session.summary(run) and "seed 0" in session.summary(run)


def test_overlay_and_mask_follow_word_opacity_and_threshold(session):
    run = _gen(session)
    a = np.asarray(session.overlay(run, "dog", 0.5))
    b = np.asarray(session.overlay(run, "bench", 0.5))
    c = np.asarray(session.overlay(run, "dog", 0.9))
    assert a.shape == (display_size(64, 64)[0], display_size(64, 64)[1], 3)
    assert not np.array_equal(a, b) and not np.array_equal(a, c)
    lo, cov_lo = session.mask(run, "dog", 0.1)
    hi, cov_hi = session.mask(run, "dog", 0.95)
    assert cov_lo >= cov_hi and 0 < cov_hi <= 1  # threshold 0.95 still keeps the peak
    assert np.asarray(lo).sum() >= np.asarray(hi).sum()
    assert cov_lo == pytest.approx(run.heat_maps.word("dog").mask(0.1).mean())


def test_readable_errors(session, tmp_path):
    with pytest.raises(UIError, match="prompt is empty"):
        session.generate("   ")
    with pytest.raises(UIError, match="multiples of 8"):
        _gen(session, width=60)
    with pytest.raises(UIError, match="steps"):
        _gen(session, steps=0)
    # a model folder that does not exist: the message names it, and nothing is cached
    missing = UISession(tmp_path / "no_model", work_dir=tmp_path / "w2")
    for _ in range(2):
        with pytest.raises(Exception) as e:
            missing.generate("a dog", steps=1, width=64, height=64)
        msg = readable_error(e.value)
        assert "does not exist" in msg and "no_model" in msg and "Traceback" not in msg
    # unexpected errors are one line with their type, the traceback goes to the log only
    assert readable_error(RuntimeError("boom")).startswith("unexpected RuntimeError: boom")


def test_embedded_model_missing_is_readable(monkeypatch, tmp_path):
    import daamkit.world as world

    def missing():
        raise FileNotFoundError("the shipped shapes-world model is missing")

    monkeypatch.setattr(world, "default_model_path", missing, raising=False)
    s = UISession(None, work_dir=tmp_path)
    with pytest.raises(UIError, match="--model PATH") as e:
        s.generate("a red circle", steps=1, width=64, height=64)
    assert "shapes-world model is missing" in str(e.value)
    assert default_size(None) == (512, 512)


def test_prompt_past_the_token_limit_names_the_truncated_words(session):
    prompt = " ".join(["red"] * 80) + " zebra giraffe"
    run = _gen(session, prompt, steps=1)
    assert run.heat_maps.truncated_words[-2:] == ["zebra", "giraffe"]
    text = session.summary(run)
    assert "77-token limit" in text and "zebra giraffe" in text


def test_open_record_from_zip_pair_path_and_folder(session, tmp_path):
    run = _gen(session)
    for opened in (
        session.open_files([run.record_zip]),
        session.open_files([run.folder / "record.safetensors", run.folder / "record.json"]),
        session.open_path(run.folder / "record.json"),
        session.open_path(run.folder),
        session.open_path(str(run.record_zip)),
    ):
        assert opened.heat_maps == run.heat_maps and opened.record.prompt == run.record.prompt
        assert opened.record_zip.is_file() and opened.grid_png.is_file()
        assert "Opened" in session.summary(opened)


def test_open_record_errors_are_readable(session, tmp_path):
    with pytest.raises(UIError, match="type the path"):
        session.open_path("")
    with pytest.raises(FileNotFoundError, match="no daamkit record"):
        session.open_path(tmp_path / "nope.json")
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    with pytest.raises(UIError, match="not a valid zip"):
        session.open_files([bad])
    empty = tmp_path / "empty.zip"
    with zipfile.ZipFile(empty, "w") as z:
        z.writestr("readme.txt", "hi")
    with pytest.raises(UIError, match="exactly one .json and one .safetensors"):
        session.open_files([empty])
    foreign = tmp_path / "x.json"
    foreign.write_text("{}")
    (tmp_path / "x.safetensors").write_bytes(b"")
    with pytest.raises(Exception) as e:
        session.open_files([foreign, tmp_path / "x.safetensors"])
    assert "daamkit run record" in readable_error(e.value)
    with pytest.raises(UIError, match="one .json and one .safetensors"):
        session.open_files([foreign])


def test_arguments_default_to_loopback():
    p = argparse.ArgumentParser()
    add_arguments(p)
    a = p.parse_args([])
    assert a.host == "127.0.0.1" and a.port is None and a.model is None
    a = p.parse_args(["--host", "0.0.0.0", "--port", "8000", "--model", "m"])
    assert (a.host, a.port, a.model) == ("0.0.0.0", 8000, "m")


def test_build_app_and_launch_binds_loopback(model_dir, monkeypatch):
    gr = pytest.importorskip("gradio")  # the [ui] extra
    from daamkit.ui import app as ui_app

    app = ui_app.build_app(str(model_dir))
    assert isinstance(app, gr.Blocks)
    ids = {getattr(b, "elem_id", None) for b in app.blocks.values()}
    for needed in ("daam-prompt", "daam-seed", "daam-steps", "daam-width", "daam-height", "daam-guidance",
                   "daam-generate", "daam-words", "daam-image", "daam-overlay", "daam-mask", "daam-alpha",
                   "daam-threshold", "daam-grid", "daam-download-record", "daam-download-grid",
                   "daam-upload", "daam-open-path-off"):
        assert needed in ids, needed
    assert "daam-open-path" not in ids  # opening server paths is off unless --allow-paths
    assert not app.daamkit_session.model.loaded  # building the page loads nothing
    width = next(b for b in app.blocks.values() if getattr(b, "elem_id", None) == "daam-width")
    assert width.value == 64  # the model's own size, read from its config

    seen = {}

    def fake_launch(self, **kw):
        seen.update(kw)

    monkeypatch.setattr(gr.Blocks, "launch", fake_launch)
    ui_app.launch(app)
    assert seen["server_name"] == "127.0.0.1" and seen["share"] is False and seen["show_error"] is False
    assert seen["run_history"] is False
    app.daamkit_session.close()


# -- a video's record -----------------------------------------------------------------------------------------
def _video_record_files(tmp_path):
    from daamkit.testing.video import video_frames, video_heat_maps

    hm = video_heat_maps()  # 9 frames of 32 x 32, a distinct hot cell per token frame
    rec = RunRecord(prompt=hm.prompt, image=None, heat_maps=hm, seed=5,
                    settings={"steps": 2, "fps": 8.0, "pipeline": "WanPipeline"},
                    frames=video_frames(hm.num_frames))
    st, js = rec.save(tmp_path / "video_record")
    return rec, [js, st]


def test_video_record_shows_videos_and_frame_scores(tmp_path):
    iio = pytest.importorskip("imageio.v3")
    from daamkit import video

    s = UISession(work_dir=tmp_path / "work")
    rec, files = _video_record_files(tmp_path)
    run = s.open_files(files)
    assert run.is_video and run.fps == 8.0
    assert np.array_equal(run.record.frames, rec.frames)
    shown = iio.imread(run.video, index=None)
    assert shown.shape[0] == 9 and shown.shape[1:3] == (32, 32)
    assert run.frame_scores_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with zipfile.ZipFile(run.record_zip) as z:
        assert {"record.json", "record.safetensors", "grid.png", run.video.name, "frame_scores.png"} <= set(z.namelist())
    # the word's overlay video: frame i is the map's plane on frame i over video frame i
    ov = s.overlay_video(run, "cat", 0.5)
    back = iio.imread(ov, index=None)
    want = video.overlay_frames(run.word("cat"), rec.frames, alpha=0.5)
    assert back.shape == want.shape
    if video.ffmpeg_available():  # H.264 in yuv420p is lossy on noise: compare each frame's mean colour
        assert np.abs(back.mean(axis=(1, 2)) - want.mean(axis=(1, 2))).max() < 6
    assert s.overlay_video(run, "cat", 0.5) == ov  # written once per word and opacity
    assert s.overlay_video(run, "cat", 0.8) != ov
    assert "9 frames" in s.summary(run) and "frame" in s.frame_info(run, "dog")
    with pytest.raises(UIError, match="video's"):
        s.overlay(run, "cat")
    with pytest.raises(UIError, match="video's"):
        s.mask(run, "cat")
    s.close()


def test_app_switches_to_the_video_view_for_a_video_record(tmp_path):
    gr = pytest.importorskip("gradio")
    from daamkit.ui import app as ui_app

    s = UISession(work_dir=tmp_path / "work")
    app = ui_app.build_app(session=s)
    ids = {getattr(b, "elem_id", None) for b in app.blocks.values()}
    assert {"daam-video", "daam-overlay-video", "daam-frame-scores", "daam-video-view", "daam-image-view"} <= ids
    fns = {fn.api_name: fn.fn for fn in app.fns.values()}
    _, files = _video_record_files(tmp_path)
    out = fns["open_files"]([str(f) for f in files], "cat", 0.5, 0.4)
    assert len(out) == 15
    run, image_view, video_view, shown_video, overlay_video, scores = out[0], *out[10:]
    assert run.is_video and image_view.visible is False and video_view.visible is True
    assert shown_video == str(run.video) and overlay_video and scores == str(run.frame_scores_png)
    assert "strongest on frame" in out[6]
    # clicking a word or moving the opacity gives a new overlay video, never an image overlay
    overlay, mask, info, ov = fns["word"](run, "dog", 0.5, 0.4)
    assert ov.endswith(".mp4") or ov.endswith(".gif")
    assert "dog" in info
    assert fns["opacity"](run, "dog", 0.9)[2] not in (ov, None)
    assert fns["threshold"](run, "dog", 0.7) == (gr.skip(), gr.skip())
    s.close()


def test_generate_with_a_video_model_gives_a_video_run(tmp_path):
    pytest.importorskip("imageio.v3")
    from daamkit.testing.families.wan import tiny_wan, wan_tokenizer

    wan_tokenizer(tmp_path / "tok")
    wan = tiny_wan(tmp_path / "tok")
    s = UISession("unused-path", work_dir=tmp_path / "work", loader=lambda *a, **k: wan, num_frames=5, fps=12)
    run = _gen(s, "a red dog", width=64, height=48)
    assert run.is_video and run.record.frames.shape == (5, 48, 64, 3)
    assert run.record.settings["num_frames"] == 5 and run.fps == 12
    assert run.video.is_file() and run.frame_scores_png.is_file()
    assert s.overlay_video(run, "dog").is_file()
    assert "5 frames" in s.summary(run)
    with pytest.raises(UIError, match="num_frames"):
        UISession(work_dir=tmp_path / "w2", num_frames=0)
    s.close()
