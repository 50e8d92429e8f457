"""End to end: ``daamkit ui`` driven in a real headless browser (Debian's chromium through Playwright).

Starts the server as a subprocess on a free loopback port with a tiny random SD pipeline saved to disk,
types a prompt, clicks Generate, clicks a word, checks that the overlay appears and changes when another
word is clicked, checks that a readable error reaches the page and the server keeps serving, and saves
screenshots under the test's tmp dir.

Skips only when the browser side is missing (the Python package ``playwright`` or a chromium binary);
nothing here downloads a browser (``playwright install`` is never run). Set ``DAAMKIT_UI_SCREENSHOT``
to a path to also copy the main screenshot there (used to refresh docs/ui.png).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

from daamkit.testing.pipelines import tiny_sd

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]
TIMEOUT_MS = 60_000


def _chromium() -> str | None:
    env = os.environ.get("DAAMKIT_CHROMIUM")
    for c in ([env] if env else []) + list(CHROMIUM_CANDIDATES) + [shutil.which("chromium") or ""]:
        if c and os.access(c, os.X_OK):
            return c
    return None


try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # pragma: no cover - depends on the machine
    sync_playwright = None

CHROMIUM = _chromium()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sync_playwright is None,
                       reason="the Python package playwright is not installed (pip install playwright; "
                              "never `playwright install`: the test uses the system chromium)"),
    pytest.mark.skipif(CHROMIUM is None,
                       reason="no chromium binary (Debian: apt-get install chromium; or set DAAMKIT_CHROMIUM)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory, clip_tokenizer_dir) -> str:
    d = tmp_path_factory.mktemp("tiny_sd_ui")
    tiny_sd(clip_tokenizer_dir).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """``python -m daamkit ui`` on a free 127.0.0.1 port, allowed to open records under ``records``."""
    port = _free_port()
    logdir = tmp_path_factory.mktemp("ui_server")
    records = tmp_path_factory.mktemp("ui_records")
    log = logdir / "server.log"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", OMP_WAIT_POLICY="PASSIVE",
               GRADIO_TEMP_DIR=str(logdir / "gradio"), NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    cmd = [sys.executable, "-m", "daamkit", "ui", "--model", tiny_model_dir, "--port", str(port),
           "--allow-paths", str(records)]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the UI server exited with {proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the UI server did not answer on {url} within 60 s:\n{log.read_text()}")
                time.sleep(0.25)
        yield {"url": url, "log": log, "proc": proc, "records": records}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture()
def page(tmp_path):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        context.set_default_timeout(TIMEOUT_MS)
        pg = context.new_page()
        try:
            yield pg
        finally:
            context.close()
            browser.close()


def _overlay_src(page) -> str | None:
    img = page.locator("#daam-overlay img")
    return img.first.get_attribute("src") if img.count() else None


def _wait_src_changes(page, selector: str, previous: str | None) -> None:
    page.wait_for_function(
        "([sel, prev]) => { const i = document.querySelector(sel); return i && i.src && i.src !== prev; }",
        arg=[selector, previous],
    )


def _set_number(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(value)
    box.press("Enter")
    box.blur()


def test_generate_click_words_see_overlay_change(server, page, tmp_path):
    t0 = time.monotonic()
    page.goto(server["url"])
    page.locator("#daam-prompt textarea").fill("a red circle and a blue square")
    _set_number(page, "daam-steps", "2")
    _set_number(page, "daam-width", "64")
    _set_number(page, "daam-height", "64")
    page.locator("#daam-generate").click()

    status = page.locator("#daam-status")
    expect(status).to_contain_text("Generated", timeout=TIMEOUT_MS)
    expect(status).to_contain_text("2 steps")
    expect(page.locator("#daam-image img")).to_be_visible()
    words = page.locator("#daam-words")
    for w in ("red", "circle", "blue", "square"):
        expect(words.get_by_label(w, exact=True)).to_have_count(1)
    assert _overlay_src(page) is None  # no word chosen yet

    words.get_by_text("circle", exact=True).click()
    overlay = page.locator("#daam-overlay img")
    expect(overlay).to_be_visible()
    expect(page.locator("#daam-mask img")).to_be_visible()
    expect(page.locator("#daam-word-info")).to_contain_text("circle")
    first_src = _overlay_src(page)
    first_png = overlay.screenshot()

    words.get_by_text("square", exact=True).click()
    expect(page.locator("#daam-word-info")).to_contain_text("square")
    _wait_src_changes(page, "#daam-overlay img", first_src)
    page.wait_for_function(
        "() => { const i = document.querySelector('#daam-overlay img'); return i && i.complete && i.naturalWidth > 0; }"
    )
    assert overlay.screenshot() != first_png, "the overlay did not change when another word was clicked"

    # the opacity slider redraws the overlay, the threshold slider the binarised mask
    src = _overlay_src(page)
    _set_number(page, "daam-alpha", "0.75")
    _wait_src_changes(page, "#daam-overlay img", src)
    mask_src = page.locator("#daam-mask img").first.get_attribute("src")
    _set_number(page, "daam-threshold", "0.8")
    expect(page.locator("#daam-word-info")).to_contain_text("0.80")
    _wait_src_changes(page, "#daam-mask img", mask_src)

    shot = tmp_path / "ui.png"
    page.screenshot(path=str(shot), full_page=True)

    # downloads: the record (a zip of the core's safetensors + JSON) and the grid PNG
    expect(page.locator("#daam-download-record")).to_be_enabled()
    with page.expect_download() as dl:
        page.locator("#daam-download-record").click()
    zip_path = tmp_path / "download" / dl.value.suggested_filename
    dl.value.save_as(zip_path)
    with zipfile.ZipFile(zip_path) as z:
        assert {"record.json", "record.safetensors"} <= set(z.namelist())
        assert json.loads(z.read("record.json"))["prompt"] == "a red circle and a blue square"
    with page.expect_download() as dl:
        page.locator("#daam-download-grid").click()
    grid_path = tmp_path / "download" / "grid.png"
    dl.value.save_as(grid_path)
    assert grid_path.read_bytes()[:4] == b"\x89PNG"

    # open the downloaded record again: uploaded, then by its path in the allowed folder
    page.get_by_text("Open a saved record").click()
    page.locator("#daam-upload input[type=file]").set_input_files(str(zip_path))
    expect(status).to_contain_text("Opened")
    shutil.copyfile(zip_path, server["records"] / "circle.zip")
    page.locator("#daam-open-path textarea, #daam-open-path input").first.fill("circle.zip")
    page.locator("#daam-open").click()
    expect(status).to_contain_text("Opened circle.zip")
    expect(page.locator("#daam-word-info")).to_contain_text("square")  # the chosen word stays chosen
    page.get_by_role("tab", name="Grid").click()
    expect(page.locator("#daam-grid img")).to_be_visible()
    page.screenshot(path=str(tmp_path / "ui_grid.png"), full_page=True)
    assert shot.stat().st_size > 10_000
    if target := os.environ.get("DAAMKIT_UI_SCREENSHOT"):
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)
    assert time.monotonic() - t0 < 60


def test_errors_reach_the_page_and_the_server_keeps_serving(server, page, tmp_path):
    page.goto(server["url"])
    status = page.locator("#daam-status")
    page.locator("#daam-generate").click()  # empty prompt
    expect(status).to_contain_text("Error")
    expect(status).to_contain_text("prompt is empty")

    page.get_by_text("Open a saved record").click()
    path_box = page.locator("#daam-open-path textarea, #daam-open-path input").first
    path_box.fill(str(tmp_path / "nope.json"))  # not in the --allow-paths folder
    page.locator("#daam-open").click()
    expect(status).to_contain_text("outside the folder this app may open records from")
    path_box.fill("nope.json")
    page.locator("#daam-open").click()
    expect(status).to_contain_text("no daamkit record")
    assert "Traceback" not in page.content()
    page.screenshot(path=str(tmp_path / "ui_error.png"), full_page=True)

    # still serving: a generation works after the errors; a prompt past the 77-token limit names the
    # words the model never saw
    page.locator("#daam-prompt textarea").fill(" ".join(["red"] * 80) + " zebra giraffe")
    _set_number(page, "daam-steps", "1")
    page.locator("#daam-generate").click()
    expect(status).to_contain_text("Generated", timeout=TIMEOUT_MS)
    expect(status).to_contain_text("77-token limit")
    expect(status).to_contain_text("zebra giraffe")
    assert server["proc"].poll() is None


def test_missing_model_folder_is_a_message_on_the_page(page, tmp_path):
    from daamkit.ui.app import build_app, launch

    app = build_app(str(tmp_path / "no_such_model"))
    port = _free_port()
    launch(app, port=port, block=False, quiet=True)
    try:
        page.goto(f"http://127.0.0.1:{port}/")
        # started without allow_paths: no path box, a line saying how to get one
        page.get_by_text("Open a saved record").click()
        expect(page.locator("#daam-open-path-off")).to_contain_text("--allow-paths DIR")
        assert page.locator("#daam-open-path").count() == 0
        page.locator("#daam-prompt textarea").fill("a red circle")
        page.locator("#daam-generate").click()
        status = page.locator("#daam-status")
        expect(status).to_contain_text("does not exist")
        expect(status).to_contain_text("no_such_model")
        # and again: a failed load is not cached, the server still answers
        page.locator("#daam-generate").click()
        expect(status).to_contain_text("does not exist")
    finally:
        app.close()
        app.daamkit_session.close()
