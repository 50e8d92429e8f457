"""What the web app does, without the web: load the model once, generate, render a word, open a record.

Kept free of gradio so it can be tested (and reused) on its own; :mod:`daamkit.ui.app` only wires these
methods to widgets. Every failure a user can cause is raised as :class:`UIError` with a message meant
for the page; anything else is turned into one by :func:`readable_error` (the traceback goes to the
server log, never to the page).
"""

from __future__ import annotations

import io
import ipaddress
import json
import logging
import math
import os
import random
import re
import shutil
import sys
import tempfile
import threading
import time
import weakref
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import PIL.Image

from daamkit.errors import DaamkitError, user_message
from daamkit.heatmap import GlobalHeatMap, WordHeatMap
from daamkit.io.record import RunRecord, record_paths
from daamkit.jobs.generate import slug
from daamkit.metrics import DEFAULT_THRESHOLD

log = logging.getLogger("daamkit.ui")

#: Small images (the shapes world draws 64 px) are shown enlarged to at least this many pixels.
DISPLAY_MIN_SIDE = 320
MAX_SIDE = 2048
MAX_STEPS = 200
#: The text encoder reads 77 tokens (a few hundred characters); anything far longer is refused unread.
MAX_PROMPT_CHARS = 2000
MAX_RECORD_BYTES = 512 * 1024 * 1024  # refuse to unpack more than this from an uploaded zip
#: Frames a video model may be asked for (LTX's longest default, 257, and some room).
MAX_FRAMES = 512

Progress = Callable[[float, str], None]


class UIError(DaamkitError):
    """A problem the user can act on; ``str(e)`` is shown on the page as it is."""


def readable_error(exc: BaseException) -> str:
    """One readable line for the page. Expected errors give their own message; unexpected ones their
    type and message, and the full traceback is logged on the server."""
    message = user_message(exc)
    if message is not None:
        return message
    if isinstance(exc, FileNotFoundError):
        return str(exc)
    if isinstance(exc, ValueError):  # diffusers' own input checks (sizes, steps, ...)
        return f"the pipeline refused these settings: {exc}"
    log.error("unexpected error in the daamkit web app", exc_info=exc)
    return f"unexpected {type(exc).__name__}: {exc} (details are in the server's log)"


# -- exposure ------------------------------------------------------------------------------------------------
def is_loopback(host: str | None) -> bool:
    """True when ``host`` only accepts connections from this computer (127.0.0.0/8, ::1, localhost)."""
    h = (host or "").strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def exposure_warning(host: str | None, allowed_dir: str | os.PathLike[str] | None = None) -> str | None:
    """The one line to print when the app listens beyond this computer, or None on loopback."""
    if is_loopback(host):
        return None
    paths = (f"open records from paths under {allowed_dir} on this server" if allowed_dir is not None
             else "upload record files (opening paths on this server is off)")
    return (f"daamkit ui: warning: listening on {host}, not only this computer: the app has no login, so anyone "
            f"who can reach this port can generate images with the model and {paths}")


def warn_if_exposed(host: str | None, allowed_dir: str | os.PathLike[str] | None = None,
                    file: TextIO | None = None) -> bool:
    """Print :func:`exposure_warning` (to stderr by default); True if it printed."""
    line = exposure_warning(host, allowed_dir)
    if line is None:
        return False
    print(line, file=file if file is not None else sys.stderr, flush=True)
    return True


# -- model ---------------------------------------------------------------------------------------------------
def resolve_model_path(model_path: str | os.PathLike[str] | None) -> Path:
    """The folder to load: ``model_path``, or the embedded shapes-world model when it is None."""
    if model_path is not None:
        return Path(model_path).expanduser()
    try:
        from daamkit.world import default_model_path

        return Path(default_model_path())
    except Exception as e:  # not shipped in this install (yet), or the package is incomplete
        raise UIError(
            f"the embedded shapes-world model cannot be used: {e} Or start the app with --model PATH, a "
            "local diffusers pipeline folder."
        ) from None


def default_size(model_path: str | os.PathLike[str] | None, fallback: int = 512) -> tuple[int, int]:
    """(height, width) the model was trained at, read from its config files without loading it."""
    try:
        p = resolve_model_path(model_path)
        unet = json.loads((p / "unet" / "config.json").read_text())
        vae = json.loads((p / "vae" / "config.json").read_text())
        factor = 2 ** (len(vae.get("block_out_channels", [0, 0, 0, 0])) - 1)
        s = unet["sample_size"]
        h, w = (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))
        return h * factor, w * factor
    except Exception:
        return fallback, fallback


class ModelHolder:
    """Loads the pipeline on first use and keeps it; one generation at a time (a trace hooks the pipe)."""

    def __init__(self, model_path: str | os.PathLike[str] | None, device: str = "cpu",
                 dtype: str | None = None, loader: Callable[..., Any] | None = None) -> None:
        self.model_path = model_path
        self.device = device
        self.dtype = dtype
        self._loader = loader
        self._pipe: Any = None
        self.lock = threading.RLock()
        self.load_seconds: float | None = None

    @property
    def loaded(self) -> bool:
        return self._pipe is not None

    @property
    def label(self) -> str:
        if self.model_path is None:
            return "the embedded shapes-world model"
        return str(self.model_path)

    def get(self) -> Any:
        with self.lock:
            if self._pipe is None:  # a failed load is not cached: fix the folder and try again
                path = resolve_model_path(self.model_path)
                loader = self._loader
                if loader is None:
                    from daamkit.jobs.pipeline import load_pipeline as loader
                t0 = time.perf_counter()
                self._pipe = loader(path, device=self.device, dtype=self.dtype)
                self.load_seconds = time.perf_counter() - t0
            return self._pipe


# -- runs ----------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """One generated (or opened) image with its maps, and the files offered for download."""

    record: RunRecord
    folder: Path
    record_zip: Path
    grid_png: Path
    source: str = "generated"
    video: Path | None = None  # a video's record: the video file (MP4, or GIF without ffmpeg)
    frame_scores_png: Path | None = None  # a video's record: each word's score per frame
    fps: float | None = None
    _word_cache: dict[str, WordHeatMap] = field(default_factory=dict, repr=False)
    _overlay_videos: dict[tuple[str, float], Path] = field(default_factory=dict, repr=False)

    @property
    def heat_maps(self) -> GlobalHeatMap:
        return self.record.heat_maps

    @property
    def is_video(self) -> bool:
        return self.heat_maps.is_video

    @property
    def words(self) -> list[str]:
        return self.heat_maps.words

    def word(self, word: str) -> WordHeatMap:
        if word not in self._word_cache:
            self._word_cache[word] = self.heat_maps.word(word)
        return self._word_cache[word]


def md_escape(text: str) -> str:
    """Escape Markdown so that prompt words are shown as typed."""
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|<>~])", r"\\\1", text)


def display_size(height: int, width: int, min_side: int = DISPLAY_MIN_SIDE) -> tuple[int, int]:
    k = max(1, math.ceil(min_side / max(1, min(height, width))))
    return height * k, width * k


def _placeholder(height: int, width: int) -> PIL.Image.Image:
    return PIL.Image.new("RGB", (width, height), (128, 128, 128))


class UISession:
    """The app's state that outlives a request: the model and a scratch folder for downloads.

    Per-browser state (the current :class:`Run`) is passed in and out of the methods, never kept here.
    ``allowed_dir`` is the one folder of the server whose records :meth:`open_path` may open; None (the
    default) refuses every path, since whoever reaches the page is not necessarily this computer's user.
    """

    def __init__(self, model_path: str | os.PathLike[str] | None = None, device: str = "cpu",
                 dtype: str | None = None, work_dir: str | os.PathLike[str] | None = None,
                 loader: Callable[..., Any] | None = None,
                 allowed_dir: str | os.PathLike[str] | None = None,
                 num_frames: int | None = None, fps: float | None = None) -> None:
        self.model = ModelHolder(model_path, device, dtype, loader)
        # video models: the server's choice, not a page control (a long video is the costliest request)
        if num_frames is not None and not (isinstance(num_frames, int) and 1 <= num_frames <= MAX_FRAMES):
            raise UIError(f"num_frames must be a whole number in 1..{MAX_FRAMES}, got {num_frames!r}")
        if fps is not None and not (isinstance(fps, (int, float)) and 0 < fps <= 240):
            raise UIError(f"fps must lie in (0, 240] frames per second, got {fps!r}")
        self.num_frames = num_frames
        self.fps = fps
        self.allowed_dir: Path | None = None
        if allowed_dir is not None:
            d = Path(allowed_dir).expanduser().resolve()
            if not d.is_dir():
                raise UIError(f"the folder allowed for opening records, {allowed_dir}, is not a folder")
            self.allowed_dir = d
        self._own_dir = work_dir is None
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="daamkit-ui-"))
        self.work_dir.mkdir(parents=True, exist_ok=True)
        # scratch files go with the session (close(), garbage collection or interpreter exit)
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.work_dir), True) if self._own_dir else None
        self._counter = 0
        self._counter_lock = threading.Lock()
        self._on_close: list[Callable[[], None]] = []

    def add_cleanup(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` on :meth:`close` (the web layer releases what it made for this session)."""
        self._on_close.append(fn)

    def close(self) -> None:
        """Remove the scratch folder (downloads of this session) if the session made it, and run the
        cleanups added with :meth:`add_cleanup`. Safe to call twice."""
        while self._on_close:
            fn = self._on_close.pop()
            try:
                fn()
            except Exception:  # one failing cleanup must not keep the others (or the scratch folder)
                log.exception("cleanup of the daamkit web app failed")
        if self._cleanup is not None:
            self._cleanup()

    def _new_folder(self, label: str) -> Path:
        with self._counter_lock:
            self._counter += 1
            n = self._counter
        d = self.work_dir / f"{n:04d}_{slug(label, fallback='run')}"
        d.mkdir(parents=True, exist_ok=True)
        return d

    # -- generate --------------------------------------------------------------------------------------------
    def generate(self, prompt: str | None, seed: float | int | None = 0, steps: float | int = 20,
                 width: float | int = 512, height: float | int = 512, guidance: float = 5.0,
                 negative_prompt: str | None = None, progress: Progress | None = None) -> Run:
        """Validate the controls, load the model if needed, generate one traced image.

        Every value may come straight from an API client (any JSON), so each is checked here and a bad
        one is a :class:`UIError` naming it, before the model is touched."""
        prompt = _text(prompt, "the prompt")
        if not prompt:
            raise UIError("the prompt is empty: type what the image should show")
        negative = _text(negative_prompt, "the negative prompt")
        steps_i = _int_in(steps, "steps", 1, MAX_STEPS)
        w = _int_in(width, "width", 8, MAX_SIDE)
        h = _int_in(height, "height", 8, MAX_SIDE)
        if w % 8 or h % 8:
            raise UIError(f"width and height must be multiples of 8, got {w}x{h}")
        guidance_f = _number(guidance, "guidance")
        if guidance_f < 0:
            raise UIError(f"guidance must be a number >= 0, got {guidance!r}")
        seed_i = 0 if seed is None or seed == "" else _whole(seed, "seed")
        if seed_i < 0:
            seed_i = random.SystemRandom().randrange(2**31)
        if seed_i >= 2**63:
            raise UIError(f"seed must be below 2**63, got {seed_i}")

        from daamkit.jobs.generate import GenerateOptions, is_video_pipeline
        from daamkit.jobs.generate import generate as run_generate

        with self.model.lock:
            if not self.model.loaded and progress is not None:
                progress(0.0, f"loading {self.model.label} (once)")
            pipe = self.model.get()
            video = is_video_pipeline(pipe)
            opts = GenerateOptions(steps=steps_i, seed=seed_i, height=h, width=w, guidance_scale=guidance_f,
                                   negative_prompt=negative or None, progress=True,
                                   num_frames=self.num_frames if video else None, fps=self.fps if video else None)
            if progress is not None:
                progress(0.0, "generating")
            t0 = time.perf_counter()
            records = run_generate(pipe, prompt, opts, model=str(resolve_model_path(self.model.model_path)))
            seconds = time.perf_counter() - t0
        record = records[0]
        record.meta["seconds"] = round(seconds, 3)
        return self._finish(record, source="generated")

    # -- open --------------------------------------------------------------------------------------------------
    def open_path(self, path: str | os.PathLike[str] | None) -> Run:
        """Open a record from the server's disk: a stem, either file of the pair, a folder holding one
        record (``record.json``), or a zip of the pair; only under :attr:`allowed_dir` (relative paths
        are taken from there), and refused when it is None."""
        root = self.allowed_dir
        if root is None:
            raise UIError("opening records by their path on the server is off; upload the record instead, or "
                          "start the app with --allow-paths DIR to allow the records in one folder")
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise UIError(f"the path must be text, got {type(path).__name__}")
        text = str(path or "").strip().strip('"').strip("'")
        if not text:
            raise UIError("type the path of a saved record (.json, .safetensors, its stem, a run folder or a .zip)")
        if len(text) > 4096 or "\0" in text:
            raise UIError("that is not a path")
        typed = root / Path(text).expanduser()
        p = self._inside(typed, text)
        if p.is_dir():
            jsons = sorted(p.glob("*.json"))
            candidates = [j for j in jsons if record_paths(j)[0].exists()]
            if not candidates:
                raise UIError(f"{text} holds no record (no <name>.json next to a <name>.safetensors)")
            typed = next((c for c in candidates if c.stem == "record"), candidates[0])
        elif typed.suffix.lower() == ".zip" or p.suffix.lower() == ".zip":
            if not p.is_file():
                raise FileNotFoundError(f"no file at {text}")
            folder = self._open_folder()
            _extract_record_zip(p, folder)
            return self._open_folder_record(folder, source=text)
        st, js = record_paths(typed)
        if not js.exists() or not st.exists():
            raise FileNotFoundError(f"no daamkit record at {text} (it needs {js.name} and {st.name})")
        # Each file of the pair may be a link of its own: check both, then copy what was checked, so the
        # files read are the ones that passed (not whatever a link points to a moment later).
        js, st = self._inside(js, text), self._inside(st, text)
        if not (js.is_file() and st.is_file()):
            raise UIError(f"{text} is not a record: its .json and .safetensors must be files")
        if js.stat().st_size + st.stat().st_size > MAX_RECORD_BYTES:
            raise UIError(f"{text} is too large to be a record")
        folder = self._open_folder()
        shutil.copyfile(js, folder / "record.json")
        shutil.copyfile(st, folder / "record.safetensors")
        return self._open_folder_record(folder, source=text)

    def _inside(self, p: Path, shown: str) -> Path:
        """``p`` with links and ``..`` resolved, if that lies in the allowed folder."""
        assert self.allowed_dir is not None
        real = p.resolve()
        if not real.is_relative_to(self.allowed_dir):
            # the folder itself is not named: the page may be seen by people who should not learn it
            raise UIError(f"{shown} is outside the folder this app may open records from (--allow-paths)")
        return real

    def open_files(self, files: list[str | os.PathLike[str]] | None) -> Run:
        """Open uploaded files: one .zip holding a record, or the .json and .safetensors of one record."""
        paths = [Path(f) for f in (files or []) if f]
        if not paths:
            raise UIError("choose a record to open: a .zip, or its .json and .safetensors files")
        folder = self._open_folder()
        zips = [p for p in paths if p.suffix.lower() == ".zip"]
        if zips:
            if len(paths) != 1:
                raise UIError("open one .zip at a time (or the .json and .safetensors of one record)")
            _extract_record_zip(zips[0], folder)
        else:
            jsons = [p for p in paths if p.suffix.lower() == ".json"]
            tensors = [p for p in paths if p.suffix.lower() == ".safetensors"]
            if len(jsons) != 1 or len(tensors) != 1 or len(paths) != 2:
                names = ", ".join(p.name for p in paths)
                raise UIError(f"a record is one .json and one .safetensors file (or a .zip of them); got: {names}")
            shutil.copyfile(jsons[0], folder / "record.json")
            shutil.copyfile(tensors[0], folder / "record.safetensors")
        return self._open_folder_record(folder, source=", ".join(p.name for p in paths))

    def _open_folder(self) -> Path:
        return Path(tempfile.mkdtemp(prefix="open_", dir=self.work_dir))

    def _open_folder_record(self, folder: Path, source: str) -> Run:
        return self._finish(RunRecord.load(folder / "record"), source=source)

    # -- outputs -----------------------------------------------------------------------------------------------
    def _finish(self, record: RunRecord, source: str) -> Run:
        """Write the downloads (record pair + zip, grid PNG) for a generated or opened record; for a
        video's also the video file and the frame-score plot."""
        from daamkit import plot

        hm = record.heat_maps
        if not hm.words:
            raise UIError("the prompt has no words with a heat map (only punctuation, or all past the token limit)")
        folder = self._new_folder(record.prompt)
        st, js = record.save(folder / "record")
        title = record.prompt if len(record.prompt) <= 80 else record.prompt[:77] + "..."
        video_path = scores_png = fps = None
        if hm.is_video:
            from daamkit import video

            fps = record.settings.get("fps") if isinstance(record.settings.get("fps"), (int, float)) else None
            fps = fps or self.fps or video.default_fps(str(record.settings.get("pipeline") or ""))
            if record.frames is not None:
                video_path = video.write_video(record.frames, folder / "video.mp4", fps)
            ax = plot.plot_frame_scores(hm, fps=fps, title=title)
            scores_png = plot.save_figure(ax.figure, folder / "frame_scores.png", dpi=110)
            # the grid shows every word on the middle frame, where a video's motion is under way
            mid = hm.num_frames // 2
            image = PIL.Image.fromarray(video.as_frames(record.frames)[mid]) if record.frames is not None else None
            fig = plot.plot_grid(hm.frame(mid), image=image, include_image=image is not None,
                                 title=f"{title} (frame {mid})")
        else:
            fig = plot.plot_grid(hm, image=record.image, include_image=record.image is not None, title=title)
        grid = plot.save_figure(fig, folder / "grid.png", dpi=110)
        zpath = folder / f"{slug(record.prompt, fallback='run')}_record.zip"
        with zipfile.ZipFile(zpath, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.write(st, "record.safetensors")
            z.write(js, "record.json")
            if record.image is not None:
                buf = io.BytesIO()
                record.image.save(buf, format="PNG")
                z.writestr("image.png", buf.getvalue())
            z.write(grid, "grid.png")
            if video_path is not None:
                z.write(video_path, video_path.name)
            if scores_png is not None:
                z.write(scores_png, "frame_scores.png")
        return Run(record=record, folder=folder, record_zip=zpath, grid_png=grid, source=source, video=video_path,
                   frame_scores_png=scores_png, fps=fps)

    # -- pictures ----------------------------------------------------------------------------------------------
    def image(self, run: Run) -> PIL.Image.Image:
        """The generated image, enlarged (nearest neighbour) if small."""
        hm = run.heat_maps
        H, W = display_size(*hm.image_size)
        if run.record.image is None:
            return _placeholder(H, W)
        return run.record.image.convert("RGB").resize((W, H), PIL.Image.NEAREST)

    def overlay(self, run: Run, word: str, alpha: float = 0.5) -> PIL.Image.Image:
        """``word``'s normalised map over the image at display size (the map alone without an image)."""
        from daamkit import plot

        alpha = _fraction(alpha, "opacity")
        wm = run.word(_word(word))
        _image_only(run, "its overlay video")
        H, W = display_size(*wm.image_size)
        heat = wm.normalized((H, W))
        if run.record.image is None:
            return plot.heat_image(heat)
        return plot.overlay(self.image(run), heat, alpha=alpha)

    def overlay_video(self, run: Run, word: str, alpha: float = 0.5) -> Path | None:
        """A video's overlay video for ``word`` (the map over each frame, normalised over the whole
        video), written once per word and opacity; None for a record saved without its frames."""
        from daamkit import video

        alpha = _fraction(alpha, "opacity")
        wm = run.word(_word(word))
        if not run.is_video:
            raise UIError("overlay videos belong to a video's record; this one is an image's")
        if run.record.frames is None:
            return None
        key = (word, round(alpha, 3))
        if key not in run._overlay_videos:
            name = f"{slug(word)}_{round(alpha * 100):03d}_{len(run._overlay_videos)}.mp4"
            frames = video.overlay_frames(wm, run.record.frames, alpha=alpha)
            run._overlay_videos[key] = video.write_video(frames, run.folder / "overlays" / name, run.fps or 16.0)
        return run._overlay_videos[key]

    def frame_info(self, run: Run, word: str) -> str:
        """Markdown: where in the video ``word`` acts most (its frame scores)."""
        scores = run.word(_word(word)).frame_scores()
        peak = int(scores.argmax())
        return (f"**{md_escape(word)}**: strongest on frame {peak} of {len(scores)} (mean attribution "
                f"{float(scores[peak]):.3g}; weakest {float(scores.min()):.3g}). The overlay is normalised over "
                "the whole video, so colours compare across frames.")

    def mask(self, run: Run, word: str, threshold: float = DEFAULT_THRESHOLD) -> tuple[PIL.Image.Image, float]:
        """The image where ``word``'s normalised map is >= ``threshold``, darkened elsewhere; and the
        fraction of the image the mask covers (at the image's own size)."""
        t = _fraction(threshold, "threshold")
        wm = run.word(_word(word))
        _image_only(run, "its overlay video and frame scores")
        H, W = display_size(*wm.image_size)
        m = wm.mask(t, size=(H, W))
        base = np.asarray(self.image(run), dtype=np.float32)
        if run.record.image is None:
            base = np.full_like(base, 255.0)
        out = np.where(m[..., None], base, base * 0.2 + 20.0)
        coverage = float(wm.mask(t).mean())
        return PIL.Image.fromarray(np.clip(out, 0, 255).astype(np.uint8)), coverage

    # -- text --------------------------------------------------------------------------------------------------
    def summary(self, run: Run) -> str:
        """Markdown status after a run: what was made, and any truncated words."""
        r = run.record
        hm = r.heat_maps
        s = r.settings or {}
        H, W = hm.image_size
        size = f"{W}x{H} px" + (f", {hm.num_frames} frames" if hm.is_video else "")
        if run.source == "generated":
            secs = r.meta.get("seconds")
            took = f" in {secs:.1f} s" if isinstance(secs, (int, float)) else ""
            head = (f"Generated{took}: seed {r.seed}, {s.get('steps')} steps, {size}, "
                    f"guidance {s.get('guidance_scale')}.")
        else:
            head = f"Opened {md_escape(run.source)}: seed {r.seed}, {size}."
        lines = [head + " Click a word to see its heat map."]
        if hm.truncated_words:
            cut = " ".join(hm.truncated_words)
            if len(cut) > 300:
                cut = cut[:297] + "..."
            lines.append(
                f"⚠️ **The prompt is longer than the model's {hm.alignment.max_length}-token limit.** "
                f"The model never saw these {len(hm.truncated_words)} words at its end, so they have no "
                f"map: “{md_escape(cut)}”"
            )
        return "\n\n".join(lines)


def _image_only(run: Run, instead: str) -> None:
    if run.is_video:
        raise UIError(f"this record is a video's: its maps are shown as {instead}")


def view_settings(alpha: Any, threshold: Any) -> tuple[float, float]:
    """The opacity and threshold controls as floats in [0, 1]; a :class:`UIError` names a bad one."""
    return _fraction(alpha, "opacity"), _fraction(threshold, "threshold")


def _shown(value: Any) -> str:
    """``repr`` short enough for one line (an API client may send anything, of any size)."""
    r = repr(value)
    return r if len(r) <= 60 else r[:57] + "..."


def _text(value: Any, name: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UIError(f"{name} must be text, got {type(value).__name__}")
    if len(value) > MAX_PROMPT_CHARS:
        raise UIError(f"{name} is {len(value):,} characters long; the limit is {MAX_PROMPT_CHARS:,} (the model "
                      "reads only its first 77 tokens)")
    return value.strip()


def _number(value: Any, name: str) -> float:
    """A finite float from a number or numeric text; bools and everything else are refused."""
    f = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        f = float(value)
    elif isinstance(value, str) and len(value) <= 40:
        try:
            f = float(value)
        except ValueError:
            pass
    if f is None or not math.isfinite(f):
        raise UIError(f"{name} must be a number, got {_shown(value)}")
    return f


def _whole(value: Any, name: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and re.fullmatch(r"\s*[-+]?\d{1,40}\s*", value):
        return int(value)
    try:
        f = _number(value, name)
    except UIError:
        raise UIError(f"{name} must be a whole number, got {_shown(value)}") from None
    if f != int(f):
        raise UIError(f"{name} must be a whole number, got {_shown(value)}")
    return int(f)


def _fraction(value: Any, name: str) -> float:
    return min(max(_number(value, name), 0.0), 1.0)


def _word(value: Any) -> str:
    if not isinstance(value, str) or len(value) > MAX_PROMPT_CHARS:
        raise UIError(f"the word must be one of the prompt's words, got {_shown(value)}")
    return value


def _int_in(value: Any, name: str, lo: int, hi: int) -> int:
    i = _whole(value, name)
    if not lo <= i <= hi:
        raise UIError(f"{name} must lie between {lo} and {hi}, got {i}")
    return i


def _extract_record_zip(zpath: Path, folder: Path) -> None:
    """Copy the one record pair of a zip into ``folder`` as record.json/.safetensors (names only, no paths
    from the archive are used, so nothing can be written outside ``folder``)."""
    try:
        with zipfile.ZipFile(zpath) as z:
            infos = [i for i in z.infolist() if not i.is_dir()]
            jsons = [i for i in infos if i.filename.lower().endswith(".json")]
            tensors = [i for i in infos if i.filename.lower().endswith(".safetensors")]
            if len(jsons) != 1 or len(tensors) != 1:
                raise UIError(f"{zpath.name} must hold exactly one .json and one .safetensors (a daamkit record); "
                              f"it holds {len(jsons)} and {len(tensors)}")
            if jsons[0].file_size + tensors[0].file_size > MAX_RECORD_BYTES:
                raise UIError(f"{zpath.name} is too large to be a record")
            for info, name in ((jsons[0], "record.json"), (tensors[0], "record.safetensors")):
                with z.open(info) as src, open(folder / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except zipfile.BadZipFile:
        raise UIError(f"{zpath.name} is not a valid zip file") from None
