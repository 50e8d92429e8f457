"""Hostile and careless inputs to ``daamkit batch`` and ``daamkit eval --runs``: one line on stderr, exit 2,
nothing lost, nothing left behind. Uses the shipped shapes-world model (64 px, 2 steps)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from daamkit.cli import main
from daamkit.world import default_model_path

MODEL = str(default_model_path())


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """A finished batch folder of two prompts (p.txt) next to the prompt files the cases use."""
    d = tmp_path_factory.mktemp("bad_inputs")
    (d / "p.txt").write_text("a red circle\na blue square\n")
    (d / "q.txt").write_text("a green triangle\n")
    (d / "p1.txt").write_text("a red circle\n")
    (d / "bad.jsonl").write_text('{"prompt": 1}\n')
    (d / "emptymodel").mkdir()
    assert main(["batch", str(d / "p.txt"), "--model", MODEL, "--steps", "2", "--out", str(d / "base"),
                 "--no-progress"]) == 0
    return d


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _crafted_positions(out: Path) -> None:
    for js in (out / "records").glob("*.json"):
        doc = json.loads(js.read_text())
        doc["heat_maps"]["alignment"]["words"][1]["positions"] = [-1]  # the padding token's map
        js.write_text(json.dumps(doc))


def _index_outside(out: Path) -> None:
    lines = (out / "index.jsonl").read_text().splitlines()
    entry = json.loads(lines[0])
    entry["paths"] = {"json": "../outside/x.json", "safetensors": "../outside/x.safetensors"}
    (out / "index.jsonl").write_text("\n".join([json.dumps(entry), *lines[1:]]) + "\n")


def _damage_one(out: Path) -> None:
    (out / "records" / "000001.safetensors").write_bytes(b"garbage")


# argv ({d}: the fixture folder; {o}: a copy of the finished batch), prepare(o), exit status, phrase of the
# one stderr error line, paths that must not exist afterwards, whether {o} must be byte-for-byte unchanged
BATCH = ["--model", MODEL, "--steps", "2", "--no-progress", "--out", "{o}"]
CASES = {
    "batch into a foreign out": (["batch", "{d}/q.txt", *BATCH], None, 2, "belongs to another batch", [], True),
    "batch with other settings": (["batch", "{d}/p.txt", *BATCH, "--steps", "3"], None, 2,
                                  "other settings (steps: 2 in the record, 3 now)", [], True),
    "batch with a shorter prompt file": (["batch", "{d}/p1.txt", *BATCH], None, 2,
                                         "would drop out of the index", [], True),
    "batch with a bad model leaves nothing": (
        ["batch", "{d}/p.txt", "--model", "{d}/emptymodel", "--out", "{d}/new-b"], None, 2,
        "not a diffusers pipeline folder", ["{d}/new-b"], False),
    "batch with a missing model leaves nothing": (
        ["batch", "{d}/p.txt", "--model", "{d}/nomodel", "--out", "{d}/new-c"], None, 2, "does not exist",
        ["{d}/new-c"], False),
    "batch with a bad prompt file leaves nothing": (
        ["batch", "{d}/bad.jsonl", "--model", MODEL, "--out", "{d}/new-d"], None, 2, "bad.jsonl:1:",
        ["{d}/new-d"], False),
    "eval on an empty folder": (["eval", "--runs", "{d}/empty", "--out", "{d}/ev-empty"], None, 2,
                                "nothing to evaluate: no runs", ["{d}/ev-empty"], False),
    "eval on a missing folder": (["eval", "--runs", "{d}/nope", "--out", "{d}/ev-nope"], None, 2,
                                 "no runs directory", ["{d}/ev-nope"], False),
    "eval on crafted records": (["eval", "--runs", "{o}", "--out", "{d}/ev-crafted"], _crafted_positions, 2,
                                "outside the 77 token positions", ["{d}/ev-crafted"], True),
    "eval on an index with ../ paths": (["eval", "--runs", "{o}", "--out", "{d}/ev-outside"], _index_outside, 2,
                                        "index.jsonl:1: paths.json '../outside/x.json' leads out",
                                        ["{d}/ev-outside"], True),
    "eval skips a damaged record": (["eval", "--runs", "{o}", "--out", "{d}/ev-damaged"], _damage_one, 0,
                                    "skipped 1 run(s)", [], True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name: str, made: Path, tmp_path: Path, capsys) -> None:
    argv, prepare, status, phrase, absent, unchanged = CASES[name]
    (made / "empty").mkdir(exist_ok=True)
    out = tmp_path / "out"
    shutil.copytree(made / "base", out)
    if prepare is not None:
        prepare(out)
    before = _snapshot(out)
    capsys.readouterr()
    rc = main([a.format(d=made, o=out) for a in argv])
    err = capsys.readouterr().err
    assert rc == status, err
    assert phrase in err and "Traceback" not in err, err
    if status == 2:
        errors = [line for line in err.splitlines() if line.startswith("daamkit: error:")]
        assert len(errors) == 1 and phrase in errors[0], err
    for p in absent:
        assert not Path(p.format(d=made, o=out)).exists(), p
    if unchanged:
        assert _snapshot(out) == before


def test_eval_lists_the_skipped_record_in_its_json(made: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shutil.copytree(made / "base", out)
    _damage_one(out)
    assert main(["eval", "--runs", str(out), "--out", str(tmp_path / "ev")]) == 0
    doc = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert doc["summary"]["skipped"] == 1 and doc["summary"]["images"] == 1
    assert [s["id"] for s in doc["skipped"]] == ["000001"] and "truncated safetensors" in doc["skipped"][0]["reason"]


def test_overwrite_takes_the_folder_over_without_orphans(made: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    shutil.copytree(made / "base", out)
    kept = (out / "records" / "000000.safetensors").read_bytes()
    assert main(["batch", str(made / "q.txt"), *[a.format(o=out) for a in BATCH], "--overwrite"]) == 0
    err = capsys.readouterr().err
    assert "deleted the records of 1 id(s)" in err and "regenerated: 000000" in err
    assert sorted(p.name for p in (out / "records").iterdir()) == ["000000.json", "000000.safetensors"]
    index = [json.loads(line) for line in (out / "index.jsonl").read_text().splitlines()]
    assert [(e["id"], e["prompt"]) for e in index] == [("000000", "a green triangle")]
    assert (out / "records" / "000000.safetensors").read_bytes() != kept
    assert json.loads((out / "batch.json").read_text())["prompts"] == str((made / "q.txt").resolve())
    # now the folder is q.txt's: the same command resumes without touching anything, p.txt is refused
    before = _snapshot(out)
    assert main(["batch", str(made / "q.txt"), *[a.format(o=out) for a in BATCH]]) == 0
    assert _snapshot(out) == before
    assert main(["batch", str(made / "p.txt"), *[a.format(o=out) for a in BATCH]]) == 2
    assert "it was made from the prompt file" in capsys.readouterr().err and _snapshot(out) == before


def test_editing_the_same_prompt_file_regenerates_that_line(made: Path, tmp_path: Path, capsys) -> None:
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "out"
    args = ["batch", str(prompts), *[a.format(o=out) for a in BATCH]]
    assert main(args) == 0
    first = (out / "records" / "000000.safetensors").read_bytes()
    prompts.write_text("a red circle\na yellow star\n")
    capsys.readouterr()
    assert main(args) == 0
    assert "1 record(s) made from other prompts" in capsys.readouterr().err
    assert (out / "records" / "000000.safetensors").read_bytes() == first


@pytest.mark.parametrize("command", [["eval", "--runs"], ["syntax", "--parser", "world"], ["pos", "--parser", "world"]])
def test_reports_refuse_to_overwrite_and_replace_whole_with_overwrite(made: Path, tmp_path: Path, capsys,
                                                                      command: list[str]) -> None:
    name, *opts = command
    argv = [name, *opts, str(made / "base")] if name == "eval" else [name, str(made / "base"), *opts]
    out = tmp_path / "report"
    # a folder of someone else's files is refused, before any work, and left as it was
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main([*argv, "--out", str(out)]) == 2
    assert "already holds files" in capsys.readouterr().err and _snapshot(out) == {"notes.txt": b"mine"}
    (out / "notes.txt").unlink()
    assert main([*argv, "--out", str(out)]) == 0
    capsys.readouterr()
    first = _snapshot(out)
    summary = json.loads(first["summary.json"])
    assert summary["command"] == name and all((out / f).is_file() for f in summary["files"].values())
    # an earlier result: refused without --overwrite, replaced whole with it (no stray file survives)
    assert main([*argv, "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and _snapshot(out) == first
    (out / "stray.txt").write_text("old")
    assert main([*argv, "--out", str(out), "--overwrite"]) == 0
    assert not (out / "stray.txt").exists() and set(_snapshot(out)) == set(first)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging folder left behind
