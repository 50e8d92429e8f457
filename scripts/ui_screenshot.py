"""Refresh docs/ui.png: the web page on the embedded shapes-world model, one prompt generated and one
word clicked, in headless chromium (the system's; never `playwright install`).

    python scripts/ui_screenshot.py [--out docs/ui.png] [--prompt ...] [--word ...] [--seed 0]

Needs `pip install 'daamkit[ui,e2e]'` and a chromium binary (see docs/ui.md). The browser test
(tests/e2e/test_ui_browser.py) checks the page's behaviour on a tiny random pipeline; this script
only takes the picture, with the model a user actually gets.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="docs/ui.png")
    p.add_argument("--prompt", default="a red circle and a blue square")
    p.add_argument("--word", default="circle", help="the word to click")
    p.add_argument("--seed", default="0")
    p.add_argument("--chromium", default=os.environ.get("DAAMKIT_CHROMIUM") or shutil.which("chromium"))
    args = p.parse_args()
    if not args.chromium:
        sys.exit("no chromium binary: install one (Debian: apt-get install chromium) or pass --chromium")
    from playwright.sync_api import expect, sync_playwright

    port = _free_port()
    tmp = Path(tempfile.mkdtemp(prefix="daamkit_ui_shot_"))
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", GRADIO_TEMP_DIR=str(tmp),
               NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    log = open(tmp / "server.log", "w")
    server = subprocess.Popen([sys.executable, "-m", "daamkit", "ui", "--port", str(port)], stdout=log,
                              stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 90
        while True:
            if server.poll() is not None:
                sys.exit(f"the UI server exited with {server.returncode}; see {tmp / 'server.log'}")
            try:
                with urllib.request.urlopen(url, timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    sys.exit(f"the UI server did not answer on {url}; see {tmp / 'server.log'}")
                time.sleep(0.25)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
            page.set_default_timeout(120_000)
            page.goto(url)
            page.locator("#daam-prompt textarea").fill(args.prompt)
            seed = page.locator("#daam-seed input").first
            seed.fill(args.seed)
            seed.press("Enter")
            page.locator("#daam-generate").click()
            expect(page.locator("#daam-status")).to_contain_text("Generated", timeout=120_000)
            page.locator("#daam-words").get_by_text(args.word, exact=True).click()
            expect(page.locator("#daam-word-info")).to_contain_text(args.word)
            page.wait_for_function(
                "() => { const i = document.querySelector('#daam-overlay img');"
                " return i && i.complete && i.naturalWidth > 0; }"
            )
            time.sleep(1)  # let the mask image settle as well
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out, full_page=True)
            browser.close()
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
