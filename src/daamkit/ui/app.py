"""The Gradio page of ``daamkit ui``: widgets wired to :class:`daamkit.ui.session.UISession`.

``build_app(model_path, device)`` returns the ``gr.Blocks``; :func:`launch` serves it (127.0.0.1 unless
told otherwise). The pipeline is loaded on the first Generate and kept by the session object that this
function's closures share. The only process-wide state is Gradio's own cache folder (see
:class:`GradioCache`): the session's ``close()`` gives it back.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
import time
import weakref
from pathlib import Path
from typing import Any

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no telemetry, no version check
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gradio as gr  # noqa: E402

from daamkit.metrics import DEFAULT_THRESHOLD  # noqa: E402
from daamkit.ui.session import (  # noqa: E402
    MAX_SIDE,
    MAX_STEPS,
    Run,
    UISession,
    default_size,
    md_escape,
    readable_error,
    resolve_model_path,
    view_settings,
    warn_if_exposed,
)

TITLE = "daamkit: which word shaped which pixels"

CSS = """
#daam-words .wrap { gap: 6px; }
#daam-words label { cursor: pointer; }
#daam-words label.selected { border-color: var(--color-accent); font-weight: 600; }
#daam-status p, #daam-word-info p { margin: 0.2em 0; }
"""

INTRO = (
    "# daamkit\n"
    "Type a prompt and press **Generate**, then click a word: its DAAM heat map (the text-to-image "
    "cross-attention of that word, summed over the denoising steps) is drawn over the image. The "
    "threshold slider shows the binarised mask (the paper uses 0.4). With a video model the page shows the "
    "video, the word's map over every frame as a second video, and each word's score per frame."
)


class GradioCache:
    """Gradio's cache folder (``GRADIO_TEMP_DIR``), pointed at a fresh folder while apps are open.

    Gradio copies every image and download it serves, and every upload it receives, into that folder
    and by default never removes them (``<tmp>/gradio``, shared by all Gradio apps of the user). Gradio
    reads the variable both when a component is made and on each request, so it can only be set for the
    whole process: apps built while one is open share the folder, and the last ``release()`` removes it
    and restores the variable. A folder left at interpreter exit is removed then. When the user set
    ``GRADIO_TEMP_DIR``, the folder is made inside it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._users = 0
        self._path: Path | None = None
        self._previous: str | None = None
        self._remove: weakref.finalize | None = None

    @property
    def path(self) -> Path | None:
        return self._path

    def acquire(self) -> Path:
        with self._lock:
            if self._path is None:
                self._previous = os.environ.get("GRADIO_TEMP_DIR")
                parent = self._previous or None
                if parent:
                    os.makedirs(parent, exist_ok=True)
                self._path = Path(tempfile.mkdtemp(prefix="daamkit-ui-gradio-", dir=parent))
                os.environ["GRADIO_TEMP_DIR"] = str(self._path)
                self._remove = weakref.finalize(self, shutil.rmtree, str(self._path), True)
            self._users += 1
            return self._path

    def release(self) -> None:
        with self._lock:
            if self._users == 0:
                return
            self._users -= 1
            if self._users or self._path is None:
                return
            if os.environ.get("GRADIO_TEMP_DIR") == str(self._path):  # unless someone has set it since
                if self._previous is None:
                    os.environ.pop("GRADIO_TEMP_DIR", None)
                else:
                    os.environ["GRADIO_TEMP_DIR"] = self._previous
            if self._remove is not None:
                self._remove()
            self._path = self._remove = self._previous = None


GRADIO_CACHE = GradioCache()


def _error(message: str) -> str:
    return f"⚠️ **Error:** {md_escape(message)}"


def build_app(model_path: str | os.PathLike[str] | None = None, device: str = "cpu",
              dtype: str | None = None, session: UISession | None = None,
              steps: int = 20, guidance: float = 5.0,
              allow_paths: str | os.PathLike[str] | None = None,
              num_frames: int | None = None, fps: float | None = None) -> gr.Blocks:
    """The web app as a ``gr.Blocks`` (not launched). ``model_path=None`` uses the embedded shapes-world
    model. The model is loaded on the first Generate, once, and kept. ``allow_paths``: the one server
    folder whose records may be opened by path (None: no path box, uploads only); a given ``session``
    brings its own. ``num_frames``/``fps``: what a video model is asked for and played at (None: the
    model's own). ``app.daamkit_session.close()`` removes every file the app made or was sent."""
    ses = session or UISession(model_path, device=device, dtype=dtype, allowed_dir=allow_paths,
                               num_frames=num_frames, fps=fps)
    cache_dir = GRADIO_CACHE.acquire()  # before any component exists: each one keeps the folder it saw
    ses.add_cleanup(GRADIO_CACHE.release)
    h0, w0 = default_size(ses.model.model_path)
    side_max = min(MAX_SIDE, max(256, 4 * max(h0, w0)))
    warning = ""
    try:  # say at once if the model cannot be there; Generate repeats the message
        folder = str(resolve_model_path(ses.model.model_path)).replace("`", "'")
        if not os.path.exists(folder):
            warning = f"\n\n⚠️ The model folder `{folder}` does not exist."
    except Exception as e:
        folder = None
        warning = "\n\n" + _error(readable_error(e))
    shown = f"`{folder}`" if folder else "none"
    if ses.model.model_path is None:
        shown = "the embedded shapes-world model" + (f" (`{folder}`)" if folder else "")
    model_note = (
        f"Model: {shown} on {md_escape(ses.model.device)} (loaded on the first Generate, then kept)." + warning
    )

    # -- handlers: every one returns a readable message instead of raising ----------------------------------
    def _outputs_for(run: Run, keep_word: str | None, alpha: float, threshold: float) -> tuple:
        word = keep_word if keep_word in run.words else None
        overlay = mask = overlay_video = None
        info = "Click a word above."
        if word is not None and run.is_video:
            overlay_video = _path(ses.overlay_video(run, word, alpha))
            info = ses.frame_info(run, word)
        elif word is not None:
            overlay = ses.overlay(run, word, alpha)
            mask, coverage = ses.mask(run, word, threshold)
            info = _word_info(word, threshold, coverage)
        return (
            run,
            ses.summary(run),
            ses.image(run),
            gr.Radio(choices=run.words, value=word, interactive=True),
            overlay,
            mask,
            info,
            str(run.grid_png),
            gr.DownloadButton(value=str(run.record_zip), interactive=True),
            gr.DownloadButton(value=str(run.grid_png), interactive=True),
            gr.Column(visible=not run.is_video),
            gr.Column(visible=run.is_video),
            _path(run.video),
            overlay_video,
            _path(run.frame_scores_png),
        )

    n_outputs = 15

    def _failed(exc: BaseException) -> tuple:
        return (gr.skip(), _error(readable_error(exc))) + (gr.skip(),) * (n_outputs - 2)

    def on_generate(prompt, negative, seed, steps_, width, height, guidance_, word, alpha, threshold,
                    progress=gr.Progress(track_tqdm=True)):  # noqa: B008 (gradio's documented pattern)
        try:
            view_settings(alpha, threshold)  # a bad one is refused before the model runs
            run = ses.generate(prompt, seed=seed, steps=steps_, width=width, height=height,
                               guidance=guidance_, negative_prompt=negative,
                               progress=lambda f, d: progress(f, desc=d))
            return _outputs_for(run, word, alpha, threshold)
        except Exception as e:
            return _failed(e)

    def on_open_path(path, word, alpha, threshold):
        try:
            view_settings(alpha, threshold)
            return _outputs_for(ses.open_path(path), word, alpha, threshold)
        except Exception as e:
            return _failed(e)

    def on_upload(files, word, alpha, threshold):
        if not files:
            return (gr.skip(),) * n_outputs
        try:
            view_settings(alpha, threshold)
            paths = [f if isinstance(f, str) else getattr(f, "name", str(f)) for f in files]
            return _outputs_for(ses.open_files(paths), word, alpha, threshold)
        except Exception as e:
            return _failed(e)

    def on_word(run, word, alpha, threshold):
        if run is None or not word:
            return None, None, "Click a word above.", None
        try:
            if run.is_video:
                return gr.skip(), gr.skip(), ses.frame_info(run, word), _path(ses.overlay_video(run, word, alpha))
            mask, coverage = ses.mask(run, word, threshold)
            return ses.overlay(run, word, alpha), mask, _word_info(word, threshold, coverage), gr.skip()
        except Exception as e:
            return gr.skip(), gr.skip(), _error(readable_error(e)), gr.skip()

    def on_alpha(run, word, alpha):
        if run is None or not word:
            return gr.skip(), gr.skip(), gr.skip()
        try:
            if run.is_video:
                return gr.skip(), gr.skip(), _path(ses.overlay_video(run, word, alpha))
            return ses.overlay(run, word, alpha), gr.skip(), gr.skip()
        except Exception as e:
            return gr.skip(), _error(readable_error(e)), gr.skip()

    def on_threshold(run, word, threshold):
        if run is None or not word or run.is_video:  # a video's page has no mask
            return gr.skip(), gr.skip()
        try:
            mask, coverage = ses.mask(run, word, threshold)
            return mask, _word_info(word, threshold, coverage)
        except Exception as e:
            return gr.skip(), _error(readable_error(e))

    # -- layout -------------------------------------------------------------------------------------------------
    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        run_state = gr.State(None)
        gr.Markdown(INTRO)
        gr.Markdown(model_note, elem_id="daam-model")
        with gr.Row(equal_height=False):
            with gr.Column(scale=1, min_width=320):
                prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a red circle and a blue square",
                                    elem_id="daam-prompt")
                with gr.Row():
                    seed = gr.Number(label="Seed (-1: random)", value=0, precision=0, minimum=-1,
                                     elem_id="daam-seed")
                    steps_in = gr.Slider(1, MAX_STEPS, value=steps, step=1, label="Steps", elem_id="daam-steps")
                with gr.Row():
                    width = gr.Slider(8, side_max, value=w0, step=8, label="Width", elem_id="daam-width")
                    height = gr.Slider(8, side_max, value=h0, step=8, label="Height", elem_id="daam-height")
                guidance_in = gr.Slider(0, 20, value=guidance, step=0.5, label="Guidance scale",
                                        elem_id="daam-guidance")
                with gr.Accordion("Negative prompt", open=False):
                    negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="daam-negative")
                generate_btn = gr.Button("Generate", variant="primary", elem_id="daam-generate")
                status = gr.Markdown("", elem_id="daam-status")
                with gr.Row():
                    dl_record = gr.DownloadButton("Download record (.zip)", interactive=False, size="sm",
                                                  elem_id="daam-download-record")
                    dl_grid = gr.DownloadButton("Download grid (.png)", interactive=False, size="sm",
                                                elem_id="daam-download-grid")
                with gr.Accordion("Open a saved record", open=False):
                    upload = gr.File(label="A record .zip, or its .json and .safetensors", file_count="multiple",
                                     file_types=[".zip", ".json", ".safetensors"], elem_id="daam-upload")
                    open_path = open_btn = None
                    if ses.allowed_dir is not None:
                        with gr.Row():
                            open_path = gr.Textbox(label=f"…or a path under {ses.allowed_dir} on the server",
                                                   scale=4, placeholder="runs/dog/record.json",
                                                   elem_id="daam-open-path")
                            open_btn = gr.Button("Open", scale=1, elem_id="daam-open")
                    else:  # no widget and no endpoint: nothing to misuse
                        gr.Markdown("Opening a record by its path on the server is off; start the app with "
                                    "`--allow-paths DIR` to allow the records in one folder.",
                                    elem_id="daam-open-path-off")
            with gr.Column(scale=2):
                with gr.Tabs():
                    with gr.Tab("Words", id="words"):
                        words = gr.Radio(choices=[], label="Prompt words: click one", elem_id="daam-words",
                                         interactive=True)
                        with gr.Column(visible=True, elem_id="daam-image-view") as image_view, gr.Row():
                            image = gr.Image(label="Image", type="pil", format="png", interactive=False,
                                             elem_id="daam-image")
                            overlay = gr.Image(label="Heat map", type="pil", format="png", interactive=False,
                                               elem_id="daam-overlay")
                            mask = gr.Image(label="Mask", type="pil", format="png", interactive=False,
                                            elem_id="daam-mask")
                        # shown instead of the pictures when the record is a video's
                        with gr.Column(visible=False, elem_id="daam-video-view") as video_view:
                            with gr.Row():
                                video_out = gr.Video(label="Video", interactive=False, autoplay=True, loop=True,
                                                     elem_id="daam-video")
                                overlay_video = gr.Video(label="Heat map over each frame", interactive=False,
                                                         autoplay=True, loop=True, elem_id="daam-overlay-video")
                            frame_scores = gr.Image(label="Each word's score per frame", type="filepath",
                                                    format="png", interactive=False, elem_id="daam-frame-scores")
                        with gr.Row():
                            alpha = gr.Slider(0, 1, value=0.5, step=0.05, label="Opacity", elem_id="daam-alpha")
                            threshold = gr.Slider(0, 1, value=DEFAULT_THRESHOLD, step=0.05,
                                                  label="Threshold (mask)", elem_id="daam-threshold")
                        word_info = gr.Markdown("", elem_id="daam-word-info")
                    with gr.Tab("Grid", id="grid"):
                        grid = gr.Image(label="All words", type="filepath", format="png", interactive=False,
                                        elem_id="daam-grid")

        outputs = [run_state, status, image, words, overlay, mask, word_info, grid, dl_record, dl_grid,
                   image_view, video_view, video_out, overlay_video, frame_scores]
        assert len(outputs) == n_outputs
        gen_inputs = [prompt, negative, seed, steps_in, width, height, guidance_in, words, alpha, threshold]
        # preprocess=False: the handlers get the values as sent (an API client may send anything) and the
        # session checks them, so a bad one gives the page's own readable line, not a Gradio error
        raw: dict[str, Any] = {"preprocess": False}
        for trigger, api in ((generate_btn.click, {"api_name": "generate"}),
                             (prompt.submit, {"api_visibility": "undocumented"})):
            trigger(on_generate, gen_inputs, outputs, concurrency_limit=1, concurrency_id="daamkit-pipeline",
                    show_progress="full", **api, **raw)
        if open_path is not None and open_btn is not None:
            open_btn.click(on_open_path, [open_path, words, alpha, threshold], outputs, api_name="open_path", **raw)
            open_path.submit(on_open_path, [open_path, words, alpha, threshold], outputs,
                             api_visibility="undocumented", **raw)
        # uploads keep Gradio's preprocessing: it is what refuses file paths outside its upload folder
        upload.upload(on_upload, [upload, words, alpha, threshold], outputs, api_name="open_files")
        words.input(on_word, [run_state, words, alpha, threshold], [overlay, mask, word_info, overlay_video],
                    show_progress="minimal", api_name="word", **raw)
        alpha.change(on_alpha, [run_state, words, alpha], [overlay, word_info, overlay_video], show_progress="hidden",
                     trigger_mode="always_last", api_name="opacity", **raw)
        threshold.change(on_threshold, [run_state, words, threshold], [mask, word_info],
                         show_progress="hidden", trigger_mode="always_last", api_name="threshold", **raw)

    app.daamkit_session = ses  # for tests and for launch() to clean up
    app.daamkit_cache_dir = cache_dir
    return app


def _path(p: Path | None) -> str | None:
    return None if p is None else str(p)


def _word_info(word: str, threshold: float, coverage: float) -> str:
    return (f"**{md_escape(word)}**: the mask (normalised map ≥ {float(threshold):.2f}) covers "
            f"{100 * coverage:.1f}% of the image.")


def launch(app: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, open_browser: bool = False,
           block: bool = True, **kwargs: Any) -> Any:
    """Serve ``app`` on ``host:port`` (gradio picks a free port from 7860 when ``port`` is None). A host
    other than loopback prints one warning line on stderr: the page has no login."""
    ses = getattr(app, "daamkit_session", None)
    warn_if_exposed(host, ses.allowed_dir if ses is not None else None)
    served = app.queue(default_concurrency_limit=4).launch(
        server_name=host, server_port=port, inbrowser=open_browser, share=False, show_error=False,
        prevent_thread_lock=True, css=CSS, ssr_mode=False,
        run_history=False,  # gradio 6's run-history page can sync runs to a Hub bucket: keep it off
        **kwargs,
    )
    if block:
        try:
            wait_until_interrupted(app)
        finally:
            app.close()
    return served


def wait_until_interrupted(app: gr.Blocks) -> None:
    """Return on Ctrl+C (KeyboardInterrupt) or when the app is closed; the caller then closes it.

    Not Gradio's ``block_thread``: on Ctrl+C it closes the server before the page heartbeats stop, so
    an open page held every shutdown for Gradio's 5-second join; ``app.close()`` stops them first."""
    try:
        while app.is_running:
            time.sleep(0.1)
    except KeyboardInterrupt:
        pass
