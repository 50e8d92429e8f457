"""daamkit.video and plot_frame_scores on synthetic video maps and frames (no pipeline)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from daamkit import plot, video
from daamkit.frames import TimeAxis
from daamkit.testing.video import hot_cell, video_frames, video_heat_maps

AXES = [
    TimeAxis(frames=3, compression=4, causal=True),  # Wan-like: 1 + 2 x 4 = 9 frames
    TimeAxis(frames=3, patch=2, skip=1, compression=2),  # padded, patched, non-causal: 10 frames
]


# -- reading frames -------------------------------------------------------------------------------------------
def test_as_frames_reads_every_pipeline_output_type():
    u8 = video_frames(3, (8, 10))
    as_float = u8.astype(np.float32) / 255.0
    pils = [PIL.Image.fromarray(f) for f in u8]
    tensor = torch.from_numpy(as_float).permute(0, 3, 1, 2)  # output_type="pt": (F, C, H, W)
    for given_ in (u8, as_float, pils, tensor):
        out = video.as_frames(given_)
        assert out.dtype == np.uint8 and out.shape == (3, 8, 10, 3)
        assert np.array_equal(out, u8)
    grey = video.as_frames(u8[..., :1])
    assert grey.shape == (3, 8, 10, 3) and np.array_equal(grey[..., 2], u8[..., 0])
    rgba = np.concatenate([u8, np.zeros_like(u8[..., :1])], axis=-1)
    assert np.array_equal(video.as_frames(rgba), u8)
    out = SimpleNamespace(frames=[pils, pils[:2]])
    assert video.output_frames(out, 1).shape == (2, 8, 10, 3)


@pytest.mark.parametrize("bad, message", [
    ([], "no frames"),
    ([PIL.Image.new("RGB", (4, 4)), PIL.Image.new("RGB", (4, 5))], "one size"),
    (["x"], "PIL images"),
    (np.zeros((2, 4, 4, 2), np.uint8), "1, 3 or 4 channels"),
    (np.full((2, 4, 4, 3), np.nan, np.float32), "NaN"),
    (np.zeros((2, 4, 4, 3), np.int32), "uint8 or floats"),
    ("video.mp4", "list of PIL images"),
])
def test_as_frames_refuses_bad_input_in_one_line(bad, message):
    with pytest.raises(ValueError, match=message) as e:
        video.as_frames(bad)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="no 'frames'"):
        video.output_frames(SimpleNamespace(images=[]))


# -- overlays -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("time", AXES)
def test_overlay_frame_i_uses_the_plane_on_frame_i(time):
    hm = video_heat_maps(time, grid=(8, 8), image_size=(32, 32))
    wm = hm.word("cat")
    black = np.zeros((time.num_frames, 32, 32, 3), np.uint8)
    # alpha 1 over black with a grey scale: each pixel is the normalised heat x 255
    over = video.overlay_frames(wm, black, alpha=1.0, cmap="gray")
    assert over.shape == black.shape and over.dtype == np.uint8
    for i in range(time.num_frames):
        plane = time.token_frame(i)
        y, x = np.unravel_index(np.argmax(over[i, :, :, 0]), (32, 32))
        assert (y // 4, x // 4) == hot_cell(plane), f"frame {i} should show token frame {plane}"
        # normalised over the whole video: the plane valued p + 1 peaks at (p + 1) / frames of the maximum
        assert over[i].max() == pytest.approx(255 * (plane + 1) / time.frames, abs=2)


def test_overlay_blends_over_each_frame_and_checks_the_map():
    hm = video_heat_maps()
    frames = video_frames(hm.num_frames)
    a = video.overlay_frames(hm.word("cat"), frames, alpha=0.5)
    b = video.overlay_frames(hm.word("cat"), frames, alpha=0.0)
    assert np.array_equal(b, frames)  # alpha 0 leaves the video untouched
    assert not np.array_equal(a, frames)
    with pytest.raises(ValueError, match="9 frames but 4 frames were given"):
        video.overlay_frames(hm.word("cat"), frames[:4])
    with pytest.raises(ValueError, match="image's map"):
        video.overlay_frames(hm.frame(0).word("cat"), frames)


@given(st.integers(1, 200), st.integers(1, 20))
def test_frame_indices_are_evenly_spread_from_first_to_last(num_frames, n):
    picks = video.frame_indices(num_frames, n)
    assert len(picks) == min(n, num_frames)
    assert picks == sorted(set(picks)) and picks[0] == 0
    assert picks[-1] == (num_frames - 1 if n > 1 else 0)


def test_frame_grid_has_frames_on_top_and_overlays_below():
    hm = video_heat_maps()  # 9 frames of 32 x 32
    frames = video_frames(hm.num_frames)
    grid = video.frame_grid(hm.word("dog"), frames, n=4, min_side=64)
    picks = video.frame_indices(hm.num_frames, 4)
    assert picks == [0, 3, 5, 8]
    k = 2  # 32 px enlarged to 64
    band = grid.height - 2 * 32 * k
    assert grid.size == (4 * 32 * k, band + 2 * 32 * k) and band >= 16
    arr = np.asarray(grid)
    over = video.overlay_frames(hm.word("dog"), frames)
    for col, i in enumerate(picks):
        x = col * 32 * k
        assert np.array_equal(arr[band : band + 32 * k : k, x : x + 32 * k : k], frames[i])
        assert np.array_equal(arr[band + 32 * k :: k, x : x + 32 * k : k], over[i])
    assert (arr[:band] < 128).any()  # the labels are drawn
    with pytest.raises(ValueError, match="at least 1"):
        video.frame_grid(hm.word("dog"), frames, n=0)


# -- writing --------------------------------------------------------------------------------------------------
def _flat_frames(n, size):
    """Frames of one grey level each (compress well, so the levels read back)."""
    levels = np.linspace(20, 230, n).astype(np.uint8)
    return np.broadcast_to(levels[:, None, None, None], (n, *size, 3)).copy(), levels


def test_mp4_reads_back_with_frame_count_size_and_order(tmp_path):
    iio = pytest.importorskip("imageio.v3")
    if not video.ffmpeg_available():
        pytest.skip("no ffmpeg (the video extra)")
    frames, levels = _flat_frames(7, (24, 40))
    path = video.write_video(frames, tmp_path / "sub" / "v.mp4", fps=8)
    assert path == tmp_path / "sub" / "v.mp4"
    back = iio.imread(path, index=None)
    assert back.shape == (7, 24, 40, 3)
    assert np.abs(back.mean(axis=(1, 2, 3)) - levels).max() < 4
    assert iio.immeta(path)["fps"] == 8
    # odd sides are padded to even (yuv420p), not cropped
    odd = video.write_video(video_frames(3, (17, 33)), tmp_path / "odd.mp4")
    assert iio.imread(odd, index=None).shape == (3, 18, 34, 3)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_gif_by_suffix_and_as_fallback_without_ffmpeg(tmp_path, monkeypatch):
    frames = video_frames(5, (12, 20))
    gif = video.write_video(frames, tmp_path / "a.gif", fps=10)
    with PIL.Image.open(gif) as im:
        assert im.format == "GIF" and im.n_frames == 5 and im.size == (20, 12)
        assert im.info["duration"] == 100
    monkeypatch.setattr(video, "ffmpeg_available", lambda: False)
    out = video.write_video(frames, tmp_path / "b.mp4")
    assert out == tmp_path / "b.gif" and out.is_file() and not (tmp_path / "b.mp4").exists()
    with PIL.Image.open(out) as im:
        assert im.n_frames == 5


def test_write_video_refuses_bad_input_and_leaves_nothing_half_written(tmp_path, monkeypatch):
    frames = video_frames(2, (8, 8))
    with pytest.raises(ValueError, match=r"end in \.mp4 or \.gif"):
        video.write_video(frames, tmp_path / "v.avi")
    for fps in (0, -1, float("nan"), 1e6, "fast"):
        with pytest.raises(ValueError, match="fps"):
            video.write_video(frames, tmp_path / "v.gif", fps=fps)

    def broken(arr, path, fps):
        path.write_bytes(b"half a video")
        raise OSError("disk full")

    monkeypatch.setattr(video, "_write_gif", broken)
    (tmp_path / "keep.gif").write_bytes(b"earlier")
    with pytest.raises(OSError, match="disk full"):
        video.write_video(frames, tmp_path / "keep.gif")
    assert (tmp_path / "keep.gif").read_bytes() == b"earlier"
    assert sorted(os.listdir(tmp_path)) == ["keep.gif"]


# -- frame scores ---------------------------------------------------------------------------------------------
def test_plot_frame_scores_draws_one_line_per_word_over_video_frames():
    hm = video_heat_maps()
    ax = plot.plot_frame_scores(hm, fps=16)
    lines = ax.get_lines()
    scores = hm.frame_scores()
    assert [ln.get_label() for ln in lines] == list(scores) == hm.words
    for ln, s in zip(lines, scores.values(), strict=True):
        assert np.array_equal(ln.get_xdata(), np.arange(hm.num_frames))
        assert np.allclose(ln.get_ydata(), s.numpy())
    assert ax.get_xlabel() == "video frame" and ax.get_legend() is not None
    two = plot.plot_frame_scores(hm, words=["cat", "dog"])
    assert [ln.get_label() for ln in two.get_lines()] == ["cat", "dog"]
    with pytest.raises(ValueError, match="video"):
        plot.plot_frame_scores(hm.frame(0))
    with pytest.raises(ValueError, match="fps"):
        plot.plot_frame_scores(hm, fps=0)
