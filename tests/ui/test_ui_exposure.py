"""What the web app exposes to whoever reaches its port: the warning off loopback, opening server paths
(off unless allowed, then only inside one folder), the prompt limit, Gradio's cache folder (removed on
close, also on SIGTERM) and bad values sent straight to the API (the page's readable line, no traceback).
"""

from __future__ import annotations

import io
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from daamkit.cli.ui import add_arguments
from daamkit.ui.session import (
    MAX_PROMPT_CHARS,
    UIError,
    UISession,
    exposure_warning,
    is_loopback,
    readable_error,
    warn_if_exposed,
)

gr = pytest.importorskip("gradio")  # the [ui] extra

from daamkit.ui import app as ui_app  # noqa: E402

GEN = {"prompt": "a red dog", "negative": "", "seed": 0, "steps": 2, "width": 64, "height": 64,
       "guidance": 5.0, "word": None, "alpha": 0.5, "threshold": 0.4}


@pytest.fixture()
def make_session(pipe, tmp_path):
    made = []

    def make(**kw):
        s = UISession("unused-path", work_dir=tmp_path / f"work{len(made)}", loader=lambda *a, **k: pipe, **kw)
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plain(markdown: str) -> str:
    return markdown.replace("\\", "")


# -- host -----------------------------------------------------------------------------------------------------
def test_loopback_hosts_are_quiet_other_hosts_warn_once():
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost", "LocalHost"):
        assert is_loopback(host), host
        assert exposure_warning(host) is None
        buf = io.StringIO()
        assert not warn_if_exposed(host, file=buf) and buf.getvalue() == ""
    for host in ("0.0.0.0", "::", "192.168.1.20", "my-server.example", ""):
        assert not is_loopback(host), host
        buf = io.StringIO()
        assert warn_if_exposed(host, file=buf)
        out = buf.getvalue()
        assert out.count("\n") == 1 and "warning" in out and host in out
        assert "anyone who can reach this port" in out and "generate images" in out
        assert "opening paths on this server is off" in out
    assert "open records from paths under /srv/runs" in exposure_warning("0.0.0.0", "/srv/runs")


def test_launch_and_cli_warn_on_stderr_without_binding(model_dir, monkeypatch, capsys, tmp_path):
    seen = []

    def fake_launch(self, **kw):  # nothing is bound: the decision and the line are what is tested
        seen.append(kw["server_name"])
        self.local_url = f"http://{kw['server_name']}:1/"

    monkeypatch.setattr(gr.Blocks, "launch", fake_launch)
    monkeypatch.setattr(gr.Blocks, "block_thread", lambda self: None)
    app = ui_app.build_app(str(model_dir))
    try:
        ui_app.launch(app)
        assert capsys.readouterr().err == ""
        ui_app.launch(app, host="0.0.0.0")
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "listening on 0.0.0.0" in err
    finally:
        app.daamkit_session.close()

    from daamkit.cli.ui import main

    assert main(["--model", str(model_dir), "--host", "0.0.0.0", "--allow-paths", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert err.count("warning") == 1 and f"paths under {tmp_path.resolve()}" in err
    assert seen == ["127.0.0.1", "0.0.0.0", "0.0.0.0"]
    assert main(["--model", str(model_dir)]) == 0
    assert "warning" not in capsys.readouterr().err
    assert ui_app.GRADIO_CACHE.path is None  # main() closed what it built
    assert main(["--model", str(model_dir), "--allow-paths", str(tmp_path / "missing")]) == 2
    assert "--allow-paths must name an existing folder" in capsys.readouterr().err


# -- paths ----------------------------------------------------------------------------------------------------
def test_opening_paths_is_off_by_default(make_session, model_dir, tmp_path):
    p = argparse_defaults()
    assert p.allow_paths is None
    ses = make_session()
    run = ses.generate(GEN["prompt"], steps=1, width=64, height=64)
    with pytest.raises(UIError, match="--allow-paths DIR") as e:
        ses.open_path(run.folder / "record.json")  # even a file the app itself wrote
    assert "upload" in str(e.value)
    assert ses.open_files([run.record_zip]).heat_maps == run.heat_maps  # uploads keep working

    app = ui_app.build_app(str(model_dir))
    try:
        ids = {getattr(b, "elem_id", None) for b in app.blocks.values()}
        assert "daam-open-path" not in ids and "daam-open" not in ids and "daam-open-path-off" in ids
        note = next(b for b in app.blocks.values() if getattr(b, "elem_id", None) == "daam-open-path-off")
        assert "--allow-paths DIR" in note.value
        apis = {fn.api_name for fn in app.fns.values()}
        assert "open_path" not in apis and "open_files" in apis and "generate" in apis
    finally:
        app.daamkit_session.close()
    app = ui_app.build_app(str(model_dir), allow_paths=tmp_path)
    try:
        ids = {getattr(b, "elem_id", None) for b in app.blocks.values()}
        assert "daam-open-path" in ids and "daam-open-path-off" not in ids
        assert "open_path" in {fn.api_name for fn in app.fns.values()}
    finally:
        app.daamkit_session.close()


def argparse_defaults():
    import argparse

    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args([])


def test_paths_are_limited_to_the_allowed_folder(make_session, tmp_path):
    allowed = tmp_path / "allowed"
    outside = tmp_path / "outside"
    (allowed / "runs" / "dog").mkdir(parents=True)
    outside.mkdir()
    run = make_session().generate(GEN["prompt"], steps=1, width=64, height=64)
    for folder in (allowed / "runs" / "dog", outside):
        for name in ("record.json", "record.safetensors"):
            shutil.copyfile(run.folder / name, folder / name)
    shutil.copyfile(run.record_zip, allowed / "dog.zip")
    shutil.copyfile(run.record_zip, outside / "dog.zip")
    (allowed / "inner_link").symlink_to(allowed / "runs", target_is_directory=True)
    (allowed / "escape").symlink_to(outside, target_is_directory=True)
    (allowed / "escape.zip").symlink_to(outside / "dog.zip")
    half = allowed / "half"  # the .json is inside, its .safetensors a link to a file outside
    half.mkdir()
    shutil.copyfile(run.folder / "record.json", half / "record.json")
    (half / "record.safetensors").symlink_to(outside / "record.safetensors")

    ses = make_session(allowed_dir=allowed)
    for ok in ("runs/dog", "runs/dog/record.json", "runs/dog/record", str(allowed / "runs/dog/record.safetensors"),
               "dog.zip", "inner_link/dog/record.json", "runs/../runs/dog"):
        opened = ses.open_path(ok)
        assert opened.heat_maps == run.heat_maps, ok
        assert "Opened" in ses.summary(opened)
    for bad in ("../outside/record.json", "runs/../../outside", "../outside/dog.zip", str(outside / "record.json"),
                str(outside), "escape/record.json", "escape", "escape.zip", "half/record.json", "half", "/etc/passwd",
                "~"):
        with pytest.raises(UIError, match="outside the folder this app may open records from") as e:
            ses.open_path(bad)
        msg = readable_error(e.value)
        assert "\n" not in msg and str(allowed) not in msg, bad  # the page does not learn the folder
        assert bad.startswith("/") or str(outside) not in msg, bad  # nor where a link points
    with pytest.raises(FileNotFoundError, match="no daamkit record"):
        ses.open_path("runs/nope.json")
    with pytest.raises(UIError, match="must be text"):
        ses.open_path(["record.json"])  # an API client may send anything
    with pytest.raises(UIError, match="is not a folder"):
        UISession("unused", work_dir=tmp_path / "w", allowed_dir=tmp_path / "missing")


# -- prompt ---------------------------------------------------------------------------------------------------
def test_prompt_length_is_limited_before_any_work(tmp_path):
    class Loaded(Exception):
        pass

    def loader(*a, **k):
        raise Loaded

    ses = UISession("unused", work_dir=tmp_path / "w", loader=loader)
    try:
        with pytest.raises(Loaded):  # the longest allowed prompt passes the checks and reaches the model
            ses.generate("a" * MAX_PROMPT_CHARS, steps=1, width=64, height=64)
        t0 = time.perf_counter()
        for prompt, negative in (("a dog " * 200_000, None), ("a dog", "x" * (MAX_PROMPT_CHARS + 1))):
            with pytest.raises(UIError, match=f"the limit is {MAX_PROMPT_CHARS:,}") as e:
                ses.generate(prompt, steps=1, width=64, height=64, negative_prompt=negative)
            assert "\n" not in readable_error(e.value)
        assert time.perf_counter() - t0 < 1.0
        assert not ses.model.loaded
        with pytest.raises(UIError, match="the prompt must be text"):
            ses.generate(["a", "dog"], steps=1, width=64, height=64)
    finally:
        ses.close()


# -- Gradio's cache -------------------------------------------------------------------------------------------
def test_gradio_cache_is_the_apps_own_and_removed_on_close(model_dir, tmp_path, monkeypatch):
    from gradio_client import Client, handle_file

    assert ui_app.GRADIO_CACHE.path is None, "an earlier test left an app open"
    monkeypatch.delenv("GRADIO_TEMP_DIR", raising=False)
    app = ui_app.build_app(str(model_dir))
    cache = Path(app.daamkit_cache_dir)
    assert os.environ["GRADIO_TEMP_DIR"] == str(cache) and cache.is_dir()
    second = ui_app.build_app(str(model_dir))  # Gradio reads one variable: open apps share the folder
    assert second.daamkit_cache_dir == cache
    second.daamkit_session.close()
    assert cache.is_dir()  # still used by the first app
    port = _free_port()
    ui_app.launch(app, port=port, block=False, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False)
        out = client.predict(*GEN.values(), api_name="/generate")
        assert out[0].startswith("Generated"), out[0]
        served = [p for p in cache.rglob("*_record.zip")]  # the record download, as Gradio serves it
        assert len(served) == 1, sorted(cache.rglob("*"))
        upload = tmp_path / "sent.zip"
        shutil.copyfile(served[0], upload)
        out = client.predict([handle_file(str(upload))], None, 0.5, 0.4, api_name="/open_files")
        assert _plain(out[0]).startswith("Opened sent.zip"), out[0]
        names = [p.name for p in cache.rglob("*") if p.is_file()]
        assert "sent.zip" in names and any(n.endswith(".png") for n in names)  # the upload and the images
    finally:
        app.close()
        app.daamkit_session.close()
    assert not cache.exists() and "GRADIO_TEMP_DIR" not in os.environ
    assert not app.daamkit_session.work_dir.exists()


def test_sigterm_removes_the_cache_and_scratch_folders(model_dir, tmp_path):
    from gradio_client import Client

    tmp = tmp_path / "tmp"  # the server's temporary folder: everything it makes goes here
    tmp.mkdir()
    port = _free_port()
    env = dict(os.environ, TMPDIR=str(tmp), GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1",
               OMP_WAIT_POLICY="PASSIVE", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    env.pop("GRADIO_TEMP_DIR", None)
    log = tmp_path / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "daamkit", "ui", "--model", str(model_dir), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.25)
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False)
        out = client.predict(*GEN.values(), api_name="/generate")
        assert out[0].startswith("Generated"), out[0]
        made = {p.name for p in tmp.iterdir()}
        assert any(n.startswith("daamkit-ui-gradio-") for n in made), made
        assert any(n.startswith("daamkit-ui-") and "gradio" not in n for n in made), made
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    left = {p.name for p in tmp.iterdir()}
    assert not any(n.startswith("daamkit-ui") for n in left), (left, log.read_text())
    # Gradio makes an empty <tmp>/gradio/vibe_edit_history from a path it fixed at import; no file goes there
    assert not [p for p in (tmp / "gradio").rglob("*") if not p.is_dir()]


# -- bad values through the API -------------------------------------------------------------------------------
def test_bad_api_values_get_the_pages_readable_line(model_dir, make_session):
    from gradio_client import Client

    ses = make_session()
    bad = [
        {"seed": "abc"}, {"steps": "x"}, {"width": None}, {"height": 12.5}, {"guidance": "much"},
        {"seed": [1]}, {"prompt": 123}, {"prompt": "x" * 1_000_000}, {"negative": {"a": 1}},
        {"alpha": "x"}, {"threshold": None},
    ]
    expected = []
    for kw in bad:  # what the page would say: the session's error through the same readable_error
        g = GEN | kw
        with pytest.raises(UIError) as e:
            ui_app.view_settings(g["alpha"], g["threshold"])
            ses.generate(g["prompt"], seed=g["seed"], steps=g["steps"], width=g["width"], height=g["height"],
                         guidance=g["guidance"], negative_prompt=g["negative"])
        expected.append(ui_app._error(readable_error(e.value)))
    assert not ses.model.loaded  # every one was refused before the model was needed

    app = ui_app.build_app(str(model_dir), allow_paths=model_dir)
    port = _free_port()
    ui_app.launch(app, port=port, block=False, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False)
        for kw, want in zip(bad, expected, strict=True):
            status = client.predict(*(GEN | kw).values(), api_name="/generate")[0]
            assert status == want, (kw, status)
            assert "Traceback" not in status and "\n" not in status
        assert "seed must be a whole number, got 'abc'" in _plain(expected[0])
        assert "the prompt is 1,000,000 characters long" in _plain(expected[7])
        assert not app.daamkit_session.model.loaded
        status = client.predict(["a"], None, 0.5, 0.4, api_name="/open_path")[0]
        assert "the path must be text" in _plain(status)
        # a good request afterwards: the server kept serving
        assert client.predict(*GEN.values(), api_name="/generate")[0].startswith("Generated")
    finally:
        app.close()
        app.daamkit_session.close()

