"""Hostile and careless command lines: each ends in one clear line, the right exit status, and leaves
the file system as it was.

Every case runs ``daamkit.cli.main`` in this process (fast: the shipped 64 px model, 1-2 steps, or a
failure before the model loads); a few slow cases run the real ``daamkit`` process to see the whole
stderr, library noise included.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from daamkit.cli import main

MODEL = str(Path(__file__).resolve().parents[2] / "src" / "daamkit" / "world" / "model")
FAST = ["--size", "64", "--steps", "1", "--no-progress"]


@dataclass
class Case:
    id: str
    argv: list[str]
    status: int
    phrase: str  # must occur in the one error line (case-insensitive)
    absent: tuple[str, ...] = ()  # paths ({t}: the test's folder) that must not exist afterwards
    unchanged: tuple[str, ...] = ()  # folders/files made by the setup that must be exactly as before
    marks: tuple = field(default_factory=tuple)


def gen(*extra: str, out: str = "{t}/out") -> list[str]:
    return ["generate", "a red circle", "--model", MODEL, "--out", out, *FAST, *extra]


OUT = ("{t}/out",)
CASES = [
    # ---- the prompt, numbers and names: decided before the model loads
    Case("empty prompt", ["generate", "", "--model", MODEL, "--out", "{t}/out"], 2, "prompt", OUT),
    Case("blank prompt", ["generate", "   ", "--model", MODEL, "--out", "{t}/out"], 2, "prompt", OUT),
    Case("steps negative", gen("--steps", "-3"), 2, "--steps", OUT),
    Case("steps zero", gen("--steps", "0"), 2, "--steps", OUT),
    Case("steps not a number", gen("--steps", "many"), 2, "--steps", OUT),
    Case("demo num-images 0", ["demo", "--num-images", "0", "--out", "{t}/out", *FAST], 2, "--num-images", OUT),
    Case("model empty", ["generate", "a dog", "--model", "", "--out", "{t}/out"], 2, "model", OUT),
    Case("model missing", ["generate", "a dog", "--model", "{t}/nope", "--out", "{t}/out"], 2, "does not exist", OUT),
    Case("model is a plain folder", ["generate", "a dog", "--model", "{t}/empty", "--out", "{t}/out"], 2,
         "model_index.json", OUT),
    Case("device cuda", gen("--device", "cuda"), 2, "available", OUT),
    Case("device cuda:3", gen("--device", "cuda:3"), 2, "available", OUT),
    Case("device mps", gen("--device", "mps"), 2, "available", OUT),
    Case("device bogus", gen("--device", "gpu0"), 2, "device", OUT),
    Case("dtype float8", gen("--dtype", "float8"), 2, "float8", OUT),
    Case("guidance nan", gen("--guidance", "nan"), 2, "--guidance", OUT),
    Case("guidance inf", gen("--guidance", "inf"), 2, "--guidance", OUT),
    Case("size 63", gen("--size", "63"), 2, "--size", OUT),
    Case("size 0x64", gen("--size", "0x64"), 2, "--size", OUT),
    Case("size abc", gen("--size", "abc"), 2, "--size", OUT),
    Case("seed negative", gen("--seed", "-1"), 2, "--seed", OUT),
    Case("threshold -1", gen("--threshold", "-1"), 2, "--threshold", OUT),
    Case("threshold 5", gen("--threshold", "5"), 2, "--threshold", OUT),
    Case("threshold nan", gen("--threshold", "nan"), 2, "--threshold", OUT),
    Case("steps-range letters", gen("--steps-range", "a:b"), 2, "--steps-range", OUT),
    Case("steps-range negative", gen("--steps-range=-1:2"), 2, "--steps-range", OUT),
    Case("steps-range like an option", gen("--steps-range", "-1:2"), 2, "--steps-range", OUT),
    Case("steps-range empty", gen("--steps-range", "3:1"), 2, "--steps-range", OUT),
    Case("words blank", gen("--words", " "), 2, "--words", OUT),
    # ---- argparse's own errors
    Case("no command", [], 2, "command"),
    Case("unknown command", ["frobnicate"], 2, "frobnicate"),
    Case("generate without prompt", ["generate", "--model", MODEL], 2, "prompt"),
    Case("generate without model", ["generate", "a dog"], 2, "--model"),
    Case("unknown option", gen("--bogus"), 2, "--bogus", OUT),
    Case("mode bad choice", gen("--mode", "fancy"), 2, "--mode", OUT),
    # ---- --out: decided before the model loads
    Case("out is a file", gen(out="{t}/file"), 2, "--out", unchanged=("{t}/file",)),
    Case("out inside a file", gen(out="{t}/file/sub"), 2, "--out", unchanged=("{t}/file",)),
    Case("out under /proc", gen(out="/proc/daamkit-x"), 2, "--out", ("/proc/daamkit-x",)),
    Case("out read-only", gen(out="/sys/kernel/daamkit-x"), 2, "--out", ("/sys/kernel/daamkit-x",)),
    Case("out holds an earlier run", gen(out="{t}/old"), 2, "--overwrite", unchanged=("{t}/old",)),
    Case("overwrite a folder that is no run", gen("--overwrite", out="{t}/other"), 2, "--out",
         unchanged=("{t}/other",)),
    # ---- decided by the model, after it loads and before anything is generated
    Case("heads 99", gen("--heads", "99"), 2, "heads", OUT),
    Case("layers bogus", gen("--layers", "bogus"), 2, "bogus", OUT),
    Case("factors 16", gen("--factors", "16"), 2, "factors", OUT),
    Case("steps-range past the steps", gen("--steps-range", "5:10", "--steps", "2"), 2, "5:10", OUT),
    Case("words unknown", gen("--words", "zebra"), 2, "zebra", OUT),
    Case("damaged model file", ["generate", "a dog", "--model", "{t}/damaged", "--out", "{t}/out", *FAST], 2,
         "text_encoder/model.safetensors", OUT),
    Case("garbage model file", ["generate", "a dog", "--model", "{t}/garbage", "--out", "{t}/out", *FAST], 2,
         "unet/diffusion_pytorch_model.safetensors", OUT),
    # ---- other commands
    Case("eval n 0", ["eval", "--n", "0", "--out", "{t}/out"], 2, "--n", OUT),
    Case("eval taus 2", ["eval", "--taus", "2", "--out", "{t}/out"], 2, "--taus", OUT),
    Case("eval threshold nan", ["eval", "--threshold", "nan", "--out", "{t}/out"], 2, "--threshold", OUT),
    Case("eval steps 0", ["eval", "--steps", "0", "--out", "{t}/out"], 2, "--steps", OUT),
    Case("eval device cuda", ["eval", "--device", "cuda", "--out", "{t}/out"], 2, "available", OUT),
    Case("syntax missing folder", ["syntax", "{t}/nope", "--parser", "world", "--out", "{t}/out"], 2,
         "does not exist", OUT),
    Case("syntax empty folder", ["syntax", "{t}/empty", "--parser", "world", "--out", "{t}/out"], 2,
         "no run records", OUT),
    Case("pos missing folder", ["pos", "{t}/nope", "--parser", "world", "--out", "{t}/out"], 2, "does not exist", OUT),
    Case("pos empty folder", ["pos", "{t}/empty", "--parser", "world", "--out", "{t}/out"], 2, "no run records", OUT),
    Case("pos threshold 2", ["pos", "{t}/empty", "--threshold", "2"], 2, "--threshold"),
    Case("entangle pairs bad", ["entangle", "--pairs", "bad", "--out", "{t}/out"], 2, "X,Y", OUT),
    Case("entangle n 0", ["entangle", "--n", "0", "--out", "{t}/out"], 2, "--n", OUT),
    Case("world train batch 0", ["world", "train", "--batch", "0", "--out", "{t}/out"], 2, "--batch", OUT),
    Case("world train channels", ["world", "train", "--vae-channels", "16,x", "--out", "{t}/out"], 2,
         "--vae-channels", OUT),
    Case("world train count weights", ["world", "train", "--object-count-weights", "1,2", "--out", "{t}/out"], 2,
         "--object-count-weights", OUT),
    Case("world quality n 0", ["world", "quality", "--n", "0", "--out", "{t}/out"], 2, "--n", OUT),
    Case("world quality batch 0", ["world", "quality", "--batch", "0", "--out", "{t}/out"], 2, "--batch", OUT),
]


def _snapshot(path: Path) -> dict[str, bytes] | None:
    if not path.exists():
        return None
    if path.is_file():
        return {"": path.read_bytes()}
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(path.rglob("*"))}


@pytest.fixture(scope="module")
def damaged_models(tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("models")
    damaged = base / "damaged"
    shutil.copytree(MODEL, damaged)
    te = damaged / "text_encoder" / "model.safetensors"
    te.write_bytes(te.read_bytes()[: te.stat().st_size // 2])  # truncated mid-file
    garbage = base / "garbage"
    shutil.copytree(MODEL, garbage)
    (garbage / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"this is not a tensor file\n" * 50)
    return {"damaged": damaged, "garbage": garbage}


def _setup(t: Path, models: dict[str, Path]) -> None:
    (t / "empty").mkdir()
    (t / "file").write_text("keep me\n")
    old = t / "old"
    (old / "maps").mkdir(parents=True)
    (old / "maps" / "zebra.png").write_bytes(b"old map")
    (old / "summary.json").write_text("[]")
    other = t / "other"
    other.mkdir()
    (other / "notes.txt").write_text("not a daamkit run\n")
    for name, path in models.items():
        (t / name).symlink_to(path)


CASE_SECONDS = int(os.environ.get("DAAMKIT_CASE_SECONDS", "120"))


class _RanOn(Exception):
    pass


def _ran_on(signum, frame):
    raise _RanOn


def run_cli(argv: list[str], capfd) -> tuple[int, str]:
    """Exit status and stderr of ``daamkit argv``; an exception that escapes ``main`` counts as the
    traceback a user would see. A bad value must fail at once: a case still working after
    ``CASE_SECONDS`` is stopped (status -1)."""
    previous = signal.signal(signal.SIGALRM, _ran_on)
    signal.alarm(CASE_SECONDS)
    try:
        status = main(argv)
    except _RanOn:
        status = -1
        print(f"still running after {CASE_SECONDS} s: the bad value was not caught", file=sys.stderr)
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else 1
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - the point is to see it
        traceback.print_exc()
        status = 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    return status, capfd.readouterr().err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, capfd, damaged_models) -> None:
    if case.id == "out read-only" and os.access("/sys/kernel", os.W_OK) and _can_mkdir("/sys/kernel/daamkit-x"):
        pytest.skip("/sys/kernel is writable here")
    _setup(tmp_path, damaged_models)
    fill = {"t": str(tmp_path)}
    argv = [a.format(**fill) for a in case.argv]
    before = {p: _snapshot(Path(p.format(**fill))) for p in case.unchanged}
    cwd = os.getcwd()
    os.chdir(tmp_path)  # a default --out lands in the test's folder
    try:
        status, err = run_cli(argv, capfd)
    finally:
        os.chdir(cwd)
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == case.status, err
    assert len(lines) == 1, err
    assert lines[0].startswith("daamkit: error:"), err
    assert case.phrase.lower() in lines[0].lower(), err
    for p in case.absent:
        assert not Path(p.format(**fill)).exists(), f"{p} was left behind"
    for p, snap in before.items():
        assert _snapshot(Path(p.format(**fill))) == snap, f"{p} changed"
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not leftovers, leftovers


def _can_mkdir(path: str) -> bool:
    try:
        os.mkdir(path)
    except OSError:
        return False
    os.rmdir(path)
    return True


# ---- what works: --threshold is used, --overwrite replaces the whole result

def test_threshold_writes_masks_and_areas(tmp_path: Path, capfd) -> None:
    out = tmp_path / "run"
    assert main(gen("--threshold", "0.5", out=str(out))) == 0
    summary = json.loads((out / "summary.json").read_text())
    words = summary[0]["words"]
    assert set(words) == {"a", "red", "circle"}
    for w, entry in words.items():
        assert Path(entry["mask"]).is_file() and Path(entry["mask"]).parent == out / "masks", w
        assert 0.0 < entry["mask_area"] <= 1.0
    assert summary[0]["threshold"] == 0.5
    low = tmp_path / "low"
    assert main(gen("--threshold", "0.1", out=str(low))) == 0
    low_words = json.loads((low / "summary.json").read_text())[0]["words"]
    assert all(low_words[w]["mask_area"] >= words[w]["mask_area"] for w in words)
    assert any(low_words[w]["mask_area"] > words[w]["mask_area"] for w in words)


def test_existing_run_is_refused_and_overwrite_replaces_it(tmp_path: Path, capfd) -> None:
    out = tmp_path / "run"
    assert main(gen("--words", "circle", out=str(out))) == 0
    (out / "maps" / "zebra.png").write_bytes(b"a map of another word")
    status, err = run_cli(gen("--words", "red", out=str(out)), capfd)
    assert status == 2 and "--overwrite" in err
    assert (out / "maps" / "circle.png").is_file() and (out / "maps" / "zebra.png").is_file()
    assert main(gen("--words", "red", "--overwrite", out=str(out))) == 0
    assert sorted(p.name for p in (out / "maps").iterdir()) == ["red.png"]
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no staging folder left beside it


def test_empty_existing_folder_is_used(tmp_path: Path, capfd) -> None:
    out = tmp_path / "run"
    out.mkdir()
    assert main(gen(out=str(out))) == 0
    assert (out / "summary.json").is_file()


def test_a_failure_during_generation_leaves_nothing(tmp_path: Path, capfd, monkeypatch) -> None:
    import daamkit.jobs.generate as job

    def broken(*a, **k):
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(job, "write_outputs", broken)
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)
    status, err = run_cli(gen(out=str(tmp_path / "out")), capfd)
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("daamkit: internal error:") and "simulated bug" in lines[0]
    logs = list((tmp_path / "tmp").glob("daamkit-*.log"))
    assert len(logs) == 1 and str(logs[0]) in lines[0]
    assert "Traceback" in logs[0].read_text() and "simulated bug" in logs[0].read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tmp"]


# ---- the real process: library noise must not bury the one line

@pytest.mark.slow
@pytest.mark.parametrize("argv", [
    ["generate", "", "--model", MODEL],
    ["generate", "a red circle", "--model", MODEL, "--heads", "99", *FAST],
], ids=["empty prompt", "heads 99"])
def test_process_prints_one_line(argv: list[str], tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src")}
    proc = subprocess.run([sys.executable, "-m", "daamkit", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("daamkit: error:"), proc.stderr
    assert list(tmp_path.iterdir()) == []
