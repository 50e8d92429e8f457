"""Videos in and out: a pipeline's frames as uint8 arrays, MP4/GIF files, per-frame overlays, frame grids.

Frames are handled as one uint8 array ``(F, H, W, 3)`` (RGB). :func:`as_frames` reads what a diffusers
video pipeline returns in ``out.frames[i]`` (a list of PIL images, a float array in [0, 1] or a uint8
array) into that form.

Overlays put frame ``i``'s map on video frame ``i``: a word's map has one plane per token frame and its
:class:`~daamkit.frames.TimeAxis` says which plane lies on which video frame (the VAE's temporal
compression, the causal first frame), so :meth:`WordHeatMap.expand` already returns one map per video
frame. The map is normalised over the whole video, not frame by frame, so that colours compare across
frames: a frame where the word barely acts stays cold.

Writing is atomic (a temporary file in the same folder, then ``os.replace``), so a failed or interrupted
write never leaves a half-written video under the final name. MP4 is H.264 in yuv420p (what browsers and
slide software play) through the ffmpeg that imageio-ffmpeg bundles; yuv420p needs even sides, so an odd
height or width is padded by repeating the last row or column. Without ffmpeg, or for a ``.gif`` path, a
GIF is written with Pillow.
"""

from __future__ import annotations

import contextlib
import math
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

if TYPE_CHECKING:
    from matplotlib.colors import Colormap

    from daamkit.heatmap import WordHeatMap

__all__ = [
    "DEFAULT_FPS",
    "VIDEO_SUFFIXES",
    "as_frames",
    "default_fps",
    "ffmpeg_available",
    "frame_grid",
    "frame_indices",
    "output_frames",
    "overlay_frames",
    "write_video",
]

DEFAULT_FPS = 16.0  # Wan's and most recent video models' rate
MAX_FPS = 240.0
VIDEO_SUFFIXES = (".mp4", ".gif")
# The rate each family's examples export at (diffusers' docs, export_to_video(..., fps=N)), by the start
# of the pipeline's class name; longest prefix wins.
_FAMILY_FPS = {"Wan": 16.0, "CogVideoX": 8.0, "HunyuanVideo": 15.0, "LTX": 24.0, "AnimateDiff": 8.0,
               "SanaVideo": 16.0, "Mochi": 30.0, "Allegro": 15.0}


def default_fps(pipeline: str) -> float:
    """The frame rate a pipeline class's videos are meant to play at (:data:`DEFAULT_FPS` if unknown)."""
    hits = [k for k in _FAMILY_FPS if pipeline.startswith(k)]
    return _FAMILY_FPS[max(hits, key=len)] if hits else DEFAULT_FPS


# -- reading a pipeline's frames ------------------------------------------------------------------------------
def as_frames(frames: Any) -> np.ndarray:
    """``frames`` as a uint8 RGB array ``(F, H, W, 3)``.

    Accepts a list of PIL images (``output_type="pil"``), a numpy array ``(F, H, W, C)`` of floats in
    [0, 1] (``output_type="np"``; rounded as diffusers does) or of uint8, or a torch tensor ``(F, C, H, W)``
    of floats in [0, 1] (``output_type="pt"``). C may be 1 (grey), 3 or 4 (alpha is dropped).
    """
    if isinstance(frames, np.ndarray):
        arr = frames
    elif type(frames).__module__.startswith("torch"):
        t = frames.detach().cpu()
        if t.ndim != 4:
            raise ValueError(f"video frames as a tensor must be (frames, channels, height, width), got {tuple(t.shape)}")
        arr = t.permute(0, 2, 3, 1).float().numpy()
    elif isinstance(frames, Sequence) and not isinstance(frames, (str, bytes)):
        if not frames:
            raise ValueError("the video has no frames")
        if not all(isinstance(f, PIL.Image.Image) for f in frames):
            kinds = sorted({type(f).__name__ for f in frames})
            raise ValueError(f"video frames as a list must be PIL images, got {', '.join(kinds)}")
        sizes = {f.size for f in frames}
        if len(sizes) != 1:
            raise ValueError(f"video frames must all have one size, got (width, height) {sorted(sizes)}")
        arr = np.stack([np.asarray(f.convert("RGB"), dtype=np.uint8) for f in frames])
    else:
        raise ValueError(f"video frames must be a list of PIL images, a (frames, height, width, channels) numpy "
                         f"array or a (frames, channels, height, width) torch tensor, got {type(frames).__name__}")
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3, 4) or min(arr.shape) < 1:
        raise ValueError(f"video frames must be (frames, height, width, channels) with 1, 3 or 4 channels, got "
                         f"shape {arr.shape}")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating):
            raise ValueError(f"video frames must be uint8 or floats in [0, 1], got {arr.dtype}")
        if not np.isfinite(arr).all():
            raise ValueError("video frames hold NaN or inf values")
        arr = np.round(np.clip(arr, 0.0, 1.0) * 255).astype(np.uint8)
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    elif arr.shape[-1] == 4:
        arr = arr[..., :3]
    return np.ascontiguousarray(arr)


def output_frames(output: Any, index: int = 0) -> np.ndarray:
    """Video ``index`` of a pipeline's output (``output.frames[index]``) as uint8 ``(F, H, W, 3)``."""
    frames = getattr(output, "frames", None)
    if frames is None:
        raise ValueError(f"{type(output).__name__} has no 'frames': not a video pipeline's output")
    if not 0 <= index < len(frames):
        raise IndexError(f"video {index} out of range: the output holds {len(frames)} videos")
    return as_frames(frames[index])


# -- writing --------------------------------------------------------------------------------------------------
def ffmpeg_available() -> bool:
    """Whether imageio-ffmpeg and its ffmpeg binary are there (the ``video`` extra)."""
    try:
        import imageio_ffmpeg

        imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError, OSError):
        return False
    return True


def _check_fps(fps: float) -> float:
    try:
        value = float(fps)
    except (TypeError, ValueError):
        raise ValueError(f"fps must be a number of frames per second, got {fps!r}") from None
    if not math.isfinite(value) or not 0 < value <= MAX_FPS:
        raise ValueError(f"fps must lie in (0, {MAX_FPS:g}] frames per second, got {fps!r}")
    return value


def _tmp_path(path: Path) -> Path:
    # same folder (os.replace is an atomic rename) and same suffix (the writers pick the format from it)
    return path.with_name(f".{path.stem}.{os.getpid()}.{secrets.token_hex(6)}.tmp{path.suffix}")


def _pad_even(arr: np.ndarray) -> np.ndarray:
    h, w = arr.shape[1:3]
    if h % 2 == 0 and w % 2 == 0:
        return arr
    return np.pad(arr, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _write_mp4(arr: np.ndarray, path: Path, fps: float) -> None:
    import imageio_ffmpeg

    arr = _pad_even(arr)
    h, w = arr.shape[1:3]
    # macro_block_size=1: the sides are already even; imageio would otherwise resize to multiples of 16.
    # +faststart puts the index first, so browsers start playing before the whole file has arrived.
    writer = imageio_ffmpeg.write_frames(
        str(path), (w, h), fps=fps, codec="libx264", pix_fmt_in="rgb24", pix_fmt_out="yuv420p", quality=None,
        macro_block_size=1, ffmpeg_log_level="error", output_params=["-crf", "18", "-movflags", "+faststart"],
    )
    writer.send(None)  # start ffmpeg
    try:
        for frame in arr:
            writer.send(np.ascontiguousarray(frame))
    finally:
        writer.close()


def _write_gif(arr: np.ndarray, path: Path, fps: float) -> None:
    images = [PIL.Image.fromarray(f) for f in arr]
    # GIF delays are in hundredths of a second; Pillow takes milliseconds and rounds them to that.
    duration = max(20, round(1000.0 / fps))
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=duration, loop=0)


def write_video(frames: Any, path: str | os.PathLike[str], fps: float = DEFAULT_FPS) -> Path:
    """Write ``frames`` (anything :func:`as_frames` reads) as a video; returns the path written.

    ``.mp4``: H.264, yuv420p (odd sides padded to even), through imageio-ffmpeg; when ffmpeg is not
    installed the video is written as a GIF next to it (``<stem>.gif``, the returned path) instead.
    ``.gif``: an animated GIF with Pillow (256 colours per frame; identical consecutive frames are merged
    into one longer frame by the format's writer). Written atomically; makes parent folders.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        raise ValueError(f"a video path must end in {' or '.join(VIDEO_SUFFIXES)}, got {str(path)!r}")
    fps = _check_fps(fps)
    arr = as_frames(frames)
    if suffix == ".mp4" and not ffmpeg_available():
        path = path.with_suffix(".gif")
        suffix = ".gif"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        (_write_mp4 if suffix == ".mp4" else _write_gif)(arr, tmp, fps)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


# -- overlays -------------------------------------------------------------------------------------------------
def _video_map(word_map: WordHeatMap, arr: np.ndarray) -> None:
    if not word_map.is_video:
        raise ValueError(f"{word_map.word!r} is an image's map, not a video's: use WordHeatMap.overlay(image)")
    if arr.shape[0] != word_map.num_frames:
        raise ValueError(f"{word_map.word!r} lies on a video of {word_map.num_frames} frames but {arr.shape[0]} "
                         "frames were given: pass the frames the pipeline returned with these maps")


def overlay_frames(
    word_map: WordHeatMap,
    frames: Any,
    alpha: float = 0.5,
    cmap: str | Colormap = "jet",
    weighted: bool = False,
) -> np.ndarray:
    """``word_map`` over each video frame: uint8 ``(F, H, W, 3)``, frame ``i`` coloured by the plane that
    lies on video frame ``i`` (``word_map.time.token_frame(i)``).

    The map is expanded to the frames' own size and normalised by its maximum over the whole video, so
    colours compare across frames. ``alpha``/``cmap``/``weighted`` as in :func:`daamkit.plot.overlay`.
    """
    arr = as_frames(frames)
    _video_map(word_map, arr)
    return _overlays(word_map, arr, range(arr.shape[0]), alpha, cmap, weighted)


def _overlays(word_map: WordHeatMap, arr: np.ndarray, picks: Sequence[int], alpha: float,
              cmap: str | Colormap, weighted: bool) -> np.ndarray:
    from daamkit import plot

    h, w = arr.shape[1:3]
    # normalised over every frame, whichever frames are drawn
    heat = word_map.normalized((h, w)).cpu().numpy()
    return np.stack([
        np.asarray(plot.overlay(PIL.Image.fromarray(arr[i]), heat[i], alpha, cmap, weighted)) for i in picks
    ])


def frame_indices(num_frames: int, n: int) -> list[int]:
    """``n`` evenly spaced frame numbers from the first to the last frame (all frames if fewer)."""
    if n < 1:
        raise ValueError(f"n must be at least 1 frame, got {n}")
    if num_frames < 1:
        raise ValueError(f"the video has no frames (num_frames={num_frames})")
    if n >= num_frames:
        return list(range(num_frames))
    if n == 1:
        return [0]
    # the step (num_frames - 1) / (n - 1) is at least 1 here, so rounding never repeats a frame
    return [round(k * (num_frames - 1) / (n - 1)) for k in range(n)]


def _font(size: int) -> PIL.ImageFont.ImageFont | PIL.ImageFont.FreeTypeFont:
    try:
        return PIL.ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return PIL.ImageFont.load_default()


def frame_grid(
    word_map: WordHeatMap,
    frames: Any,
    n: int = 8,
    alpha: float = 0.5,
    cmap: str | Colormap = "jet",
    min_side: int = 128,
) -> PIL.Image.Image:
    """One image: ``n`` evenly spaced video frames (top row) and ``word_map`` over each (bottom row),
    each column labelled with its frame number, the word in the corner.

    Frames smaller than ``min_side`` pixels are enlarged (nearest neighbour) so the labels fit. The
    overlays are normalised over the whole video, as in :func:`overlay_frames`.
    """
    arr = as_frames(frames)
    _video_map(word_map, arr)
    picks = frame_indices(arr.shape[0], n)
    over = _overlays(word_map, arr, picks, alpha, cmap, False)
    h, w = arr.shape[1:3]
    k = max(1, math.ceil(min_side / max(1, min(h, w))))
    H, W = h * k, w * k
    band = max(16, H // 8)
    font = _font(max(10, band * 2 // 3))
    grid = PIL.Image.new("RGB", (W * len(picks), band + 2 * H), "white")
    draw = PIL.ImageDraw.Draw(grid)
    for col, i in enumerate(picks):
        x = col * W
        grid.paste(PIL.Image.fromarray(arr[i]).resize((W, H), PIL.Image.NEAREST), (x, band))
        grid.paste(PIL.Image.fromarray(over[col]).resize((W, H), PIL.Image.NEAREST), (x, band + H))
        label = f"{word_map.word}: frame {i}" if col == 0 else f"frame {i}"
        top, bottom = draw.textbbox((0, 0), label, font=font)[1::2]
        draw.text((x + 4, (band - (bottom + top)) // 2), label, fill="black", font=font)
    return grid
