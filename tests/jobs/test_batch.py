"""daamkit batch: prompt files, sharding, resumability, batching, 2-process accelerate run, load_runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from daamkit.cli import main as cli_main
from daamkit.io.record import RunRecord
from daamkit.io.runs import load_runs
from daamkit.jobs import batch as batch_mod
from daamkit.jobs.batch import (
    BatchConfig,
    BatchError,
    PromptFileError,
    batches,
    parse_prompts,
    read_prompts,
    run_batch,
    shard,
)
from daamkit.testing.pipelines import tiny_sd

PROMPTS = ["a red dog", "a blue cat on a mat", "a green bird", "a yellow car"]


# -- prompt files ----------------------------------------------------------------------------------------
def test_text_prompts_skip_blank_and_comment_lines() -> None:
    items = parse_prompts("a red dog\n\n# a comment\n  a blue cat  \r\n", "text", base_seed=10)
    assert [(it.id, it.prompt, it.seed, it.line) for it in items] == [
        ("000000", "a red dog", 10, 1),
        ("000001", "a blue cat", 11, 4),
    ]
    assert items[0].height is None and items[0].words is None and items[0].negative_prompt is None


def test_jsonl_per_line_fields() -> None:
    text = "\n".join([
        json.dumps({"prompt": "a red dog", "seed": 7, "size": "48x32", "words": ["red", "dog"],
                    "negative_prompt": "blurry", "id": "dog-1", "meta": {"coco": 5}}),
        "",
        json.dumps({"prompt": "a cat", "width": 40, "height": 24, "words": "cat"}),
        json.dumps({"prompt": "a bird", "size": 32}),
    ])
    a, b, c = parse_prompts(text, "jsonl", base_seed=100)
    assert (a.id, a.seed, a.height, a.width, a.words, a.negative_prompt, a.meta) == (
        "dog-1", 7, 32, 48, ("red", "dog"), "blurry", {"coco": 5})
    assert (b.id, b.seed, b.height, b.width, b.words, b.line) == ("000001", 101, 24, 40, ("cat",), 3)
    assert (c.height, c.width, c.seed) == (32, 32, 102)


def test_csv_prompt_column_extra_columns_in_meta(tmp_path: Path) -> None:
    p = tmp_path / "caps.csv"
    p.write_text('image_id,prompt,seed,words\n42,"a dog, on a bench",3,"[""a dog"", ""bench""]"\n'
                 "43,a cat,,cat\n,,,\n", encoding="utf-8")
    a, b = read_prompts(p, base_seed=5)
    assert (a.prompt, a.seed, a.words, a.meta, a.line) == ("a dog, on a bench", 3, ("a dog", "bench"),
                                                            {"image_id": "42"}, 2)
    assert (b.prompt, b.seed, b.words, b.meta) == ("a cat", 6, ("cat",), {"image_id": "43"})


@pytest.mark.parametrize("fmt,text,message", [
    ("text", "\n# only a comment\n", "no prompts found"),
    ("jsonl", '{"prompt": "a"}\n{"prompt": "b",}\n', ":2: not valid JSON"),
    ("jsonl", '["a dog"]\n', ":1: each line must be a JSON object"),
    ("jsonl", '{"prompt": "a", "sede": 3}\n', "unknown key(s) 'sede'"),
    ("jsonl", '{"seed": 3}\n', ":1: missing 'prompt'"),
    ("jsonl", '{"prompt": "  "}\n', "empty prompt"),
    ("jsonl", '{"prompt": "a", "seed": "x"}\n', "'seed' must be an integer"),
    ("jsonl", '{"prompt": "a", "seed": -1}\n', "seed must be between"),
    ("jsonl", '{"prompt": "a", "size": "12x"}\n', "'size' must be N or WIDTHxHEIGHT"),
    ("jsonl", '{"prompt": "a", "width": 64}\n', "give both 'width' and 'height'"),
    ("jsonl", '{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}\n', ":2: duplicate id 'x' (first on line 1)"),
    ("jsonl", '{"prompt": "a", "id": "../evil"}\n', "not a safe file name"),
    ("jsonl", '{"prompt": "a", "words": [1]}\n', "'words' must be a list"),
    ("csv", "text,seed\na dog,1\n", "needs a 'prompt' column; the header has: text, seed"),
    ("csv", "prompt\na dog,extra\n", ":2: more cells than the header"),
    ("yaml", "a", "unknown prompt file format"),
])
def test_bad_prompt_files_say_where(fmt: str, text: str, message: str) -> None:
    with pytest.raises(PromptFileError) as e:
        parse_prompts(text, fmt, source="p.txt")
    assert message in str(e.value) and str(e.value).startswith("p.txt")


def test_missing_prompt_file(tmp_path: Path) -> None:
    with pytest.raises(PromptFileError, match="does not exist"):
        read_prompts(tmp_path / "nope.txt")


# -- sharding and batching -------------------------------------------------------------------------------
@settings(max_examples=200, deadline=None)
@given(n=st.integers(0, 300), k=st.integers(1, 17))
def test_shards_partition_the_items(n: int, k: int) -> None:
    items = list(range(n))
    shards = [shard(items, r, k) for r in range(k)]
    flat = [x for s in shards for x in s]
    assert sorted(flat) == items  # no loss, no overlap
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    assert shards == [shard(items, r, k) for r in range(k)]  # deterministic


def test_shard_rejects_bad_process() -> None:
    with pytest.raises(ValueError):
        shard([1], 2, 2)


def test_batches_group_by_size_and_negative() -> None:
    text = "\n".join(json.dumps(d) for d in [
        {"prompt": "a"}, {"prompt": "b", "size": 32}, {"prompt": "c"}, {"prompt": "d", "negative_prompt": "x"},
        {"prompt": "e"}, {"prompt": "f", "size": 32},
    ])
    groups = batches(parse_prompts(text, "jsonl"), 2)
    assert [[it.prompt for it in g] for g in groups] == [["a", "c"], ["e"], ["b", "f"], ["d"]]
    with pytest.raises(ValueError):
        batches([], 0)


# -- runs on the tiny pipeline ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory, clip_tokenizer_dir) -> str:
    d = tmp_path_factory.mktemp("tiny_sd_batch")
    tiny_sd(clip_tokenizer_dir).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def pipe(sd_dir):
    from daamkit.jobs.pipeline import load_pipeline

    return load_pipeline(sd_dir)


def _config(sd_dir: str, **kw) -> BatchConfig:
    return BatchConfig(model=sd_dir, steps=2, progress=False, **kw)


def _items(prompts=PROMPTS, base_seed=0):
    return parse_prompts("\n".join(prompts), "text", base_seed=base_seed)


def _mtimes(out: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in sorted((out / "records").iterdir())}


def test_run_writes_records_and_index(pipe, sd_dir, tmp_path: Path) -> None:
    text = "\n".join([json.dumps({"prompt": "a red dog", "words": ["dog", "cat"], "id": "dog"}),
                      json.dumps({"prompt": "a blue cat", "size": "48x32", "negative_prompt": "ugly"})])
    items = parse_prompts(text, "jsonl", base_seed=3)
    messages: list[str] = []
    summary = run_batch(items, tmp_path, _config(sd_dir), pipe=pipe, log=messages.append)
    assert summary["generated"] == 2 and summary["skipped"] == 0 and summary["processes"] == 1
    index = [json.loads(line) for line in (tmp_path / "index.jsonl").read_text().splitlines()]
    assert [e["id"] for e in index] == ["dog", "000001"]
    assert index[1]["settings"]["height"] == 32 and index[1]["settings"]["width"] == 48
    assert index[1]["image_size"] == [32, 48] and index[1]["negative_prompt"] == "ugly"
    assert index[0]["words"] == ["dog", "cat"] and index[0]["seed"] == 3 and index[1]["seed"] == 4
    assert index[0]["settings"]["model"] == sd_dir and index[0]["settings"]["steps"] == 2
    rec = RunRecord.load(tmp_path / index[1]["paths"]["json"])
    assert rec.prompt == "a blue cat" and rec.seed == 4 and rec.negative_prompt == "ugly"
    assert rec.image.size == (48, 32) and rec.meta["batch_id"] == "000001"
    assert not (tmp_path / "index.parts").exists()
    assert any("'cat' not in the prompt's words" in m for m in messages)  # a word the prompt lacks: a warning


def test_resume_redoes_only_missing_or_damaged_records(pipe, sd_dir, tmp_path: Path, monkeypatch) -> None:
    items, config = _items(), _config(sd_dir)
    run_batch(items, tmp_path, config, pipe=pipe)
    index_before = (tmp_path / "index.jsonl").read_text()
    before = _mtimes(tmp_path)

    calls: list[list[str]] = []
    real = batch_mod._generate_batch

    def counting(pipe, group, config):
        calls.append([it.id for it in group])
        return real(pipe, group, config)

    monkeypatch.setattr(batch_mod, "_generate_batch", counting)
    rec_dir = tmp_path / "records"
    (rec_dir / "000001.safetensors").unlink()  # deleted record
    (rec_dir / "000002.json").unlink()  # half-written: the JSON never got there
    data = bytearray((rec_dir / "000003.safetensors").read_bytes())  # damaged: checksum mismatch
    data[-1] ^= 0xFF
    (rec_dir / "000003.safetensors").write_bytes(bytes(data))
    (rec_dir / ".000000.json.123.abcdef.tmp").write_text("{")  # left by a killed process
    summary = run_batch(items, tmp_path, config, pipe=pipe)
    assert sorted(i for c in calls for i in c) == ["000001", "000002", "000003"]
    assert summary["skipped"] == 1 and summary["generated"] == 3
    after = _mtimes(tmp_path)
    assert after["000000.json"] == before["000000.json"]
    assert after["000000.safetensors"] == before["000000.safetensors"]
    assert not list(rec_dir.glob(".*.tmp"))
    assert (tmp_path / "index.jsonl").read_text() == index_before
    for it in items:
        RunRecord.load(rec_dir / it.id)  # all complete and verified

    calls.clear()  # nothing left: no pipeline call at all
    assert run_batch(items, tmp_path, config, pipe=pipe)["generated"] == 0 and calls == []

    # another prompt on a line redoes that record only; other run settings are refused
    changed = _items([PROMPTS[0], "a purple fish", *PROMPTS[2:]])
    run_batch(changed, tmp_path, config, pipe=pipe)
    assert calls == [["000001"]] and RunRecord.load(rec_dir / "000001").prompt == "a purple fish"
    with pytest.raises(BatchError, match=r"other settings \(steps: 2 in the record, 3 now\)"):
        run_batch(changed, tmp_path, BatchConfig(model=sd_dir, steps=3, progress=False), pipe=pipe)


def test_ctrl_c_keeps_finished_records_and_resumes(pipe, sd_dir, tmp_path: Path, monkeypatch) -> None:
    items, config = _items(), _config(sd_dir)
    real = batch_mod._generate_batch
    n = {"calls": 0}

    def interrupted(pipe, group, config):
        n["calls"] += 1
        if n["calls"] == 3:
            raise KeyboardInterrupt
        return real(pipe, group, config)

    monkeypatch.setattr(batch_mod, "_generate_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_batch(items, tmp_path, config, pipe=pipe, log=lambda m: None)
    assert sorted(p.name for p in (tmp_path / "records").iterdir()) == [
        "000000.json", "000000.safetensors", "000001.json", "000001.safetensors"]
    assert not (tmp_path / "index.jsonl").exists()
    monkeypatch.setattr(batch_mod, "_generate_batch", real)
    summary = run_batch(items, tmp_path, config, pipe=pipe)
    assert (summary["skipped"], summary["generated"]) == (2, 2)
    assert len((tmp_path / "index.jsonl").read_text().splitlines()) == 4


def test_batch_size_two_gives_the_same_maps(pipe, sd_dir, tmp_path: Path) -> None:
    items = _items(PROMPTS[:3], base_seed=11)
    run_batch(items, tmp_path / "b1", _config(sd_dir, batch_size=1), pipe=pipe)
    run_batch(items, tmp_path / "b2", _config(sd_dir, batch_size=2), pipe=pipe)
    one, two = list(load_runs(tmp_path / "b1")), list(load_runs(tmp_path / "b2"))
    assert [r.seed for r in one] == [11, 12, 13]
    for a, b in zip(one, two, strict=True):
        assert (a.prompt, a.seed, a.settings) == (b.prompt, b.seed, b.settings)
        assert torch.allclose(a.heat_maps.maps, b.heat_maps.maps, rtol=1e-4, atol=1e-6)
        diff = (torch.tensor(list(a.image.getdata())) - torch.tensor(list(b.image.getdata()))).abs().max()
        assert diff <= 1  # same latents from the per-item generators; at most a rounding step apart
    assert not torch.allclose(one[0].heat_maps.maps[:6], one[1].heat_maps.maps[:6])  # seeds differ per item


def test_load_runs_is_lazy_and_filters(pipe, sd_dir, tmp_path: Path, monkeypatch) -> None:
    run_batch(_items(PROMPTS[:3]), tmp_path, _config(sd_dir, save_image=False), pipe=pipe)
    loaded: list[str] = []
    real = RunRecord.load

    def spy(path, verify=True):
        loaded.append(Path(path).name)
        return real(path, verify=verify)

    monkeypatch.setattr(RunRecord, "load", staticmethod(spy))
    runs = load_runs(tmp_path, filter=lambda e: "cat" not in e["prompt"])
    assert len(runs) == 2 and runs.ids == ["000000", "000002"] and loaded == []
    it = iter(runs)
    first = next(it)
    assert loaded == ["000000"] and first.prompt == "a red dog" and first.image is None
    assert [r.prompt for r in it] == ["a green bird"] and loaded == ["000000", "000002"]
    assert runs["000002"].seed == 2
    with pytest.raises(KeyError, match="no run '000001'"):
        runs.load("000001")
    # without an index (an interrupted batch, generate/demo folders): found by scanning the JSON files
    (tmp_path / "index.jsonl").unlink()
    scanned = load_runs(tmp_path)
    assert not scanned.indexed and scanned.ids == ["records/000000", "records/000001", "records/000002"]
    assert [e["prompt"] for e in scanned.entries] == PROMPTS[:3]


# -- several processes with accelerate --------------------------------------------------------------------
def _launch(args: list[str], out: Path, nproc: int, env: dict[str, str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--num_cpu_threads_per_process", "1", "--main_process_port", "0", "-m", "daamkit", "batch", *args,
           "--out", str(out)]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_two_processes_match_one_process(sd_dir, tmp_path: Path, capsys) -> None:
    """``accelerate launch`` with 2 CPU processes (gloo): same index and byte-identical records."""
    prompts = tmp_path / "p.jsonl"
    rows = [{"prompt": p, "seed": 100 + i} for i, p in enumerate(PROMPTS)] + [{"prompt": "a small house"}]
    prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")  # 5 prompts: not divisible by 2
    args = [str(prompts), "--model", sd_dir, "--steps", "2", "--no-progress"]
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in [str(Path(__file__).parents[2] / "src"),
                                                     os.environ.get("PYTHONPATH", "")] if p)}
    # The accelerate launcher with --multi_gpu starts the processes with torchrun; on a machine without a
    # GPU daamkit asks accelerate for its CPU backend (gloo). Every process runs on one thread
    # (OMP_NUM_THREADS=1; here, torch.set_num_threads(1)), so that the float results can be compared bit
    # for bit.
    two = _launch(args, tmp_path / "two", 2, env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "on 2 processes" in two.stderr

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert cli_main(["batch", *args, "--out", str(tmp_path / "one")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "on 1 process " in capsys.readouterr().err

    assert (tmp_path / "two" / "index.jsonl").read_text() == (tmp_path / "one" / "index.jsonl").read_text()
    names = sorted(p.name for p in (tmp_path / "one" / "records").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "two" / "records").iterdir()) and len(names) == 10
    for stem in sorted({n.rsplit(".", 1)[0] for n in names}):
        a, b = (RunRecord.load(tmp_path / d / "records" / stem) for d in ("one", "two"))
        assert torch.equal(a.heat_maps.maps, b.heat_maps.maps), stem  # bit for bit
        assert a.image.tobytes() == b.image.tobytes() and a == b, stem
        # The JSON halves are identical but for the tensor file's checksum: safetensors writes its
        # __metadata__ map in a per-process hash order, so the tensor files' headers may differ.
        docs = [json.loads((tmp_path / d / "records" / f"{stem}.json").read_text()) for d in ("one", "two")]
        for doc in docs:
            doc.pop("safetensors_sha256")
        assert docs[0] == docs[1], stem
    # and a rerun over the finished folder generates nothing
    assert run_batch(read_prompts(prompts), tmp_path / "two", _config(sd_dir))["generated"] == 0


def test_command_line_errors_are_one_line(sd_dir, tmp_path: Path, capsys) -> None:
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "a dog", "sede": 1}\n')
    assert cli_main(["batch", str(p), "--model", sd_dir, "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "p.jsonl:1: unknown key(s) 'sede'" in err and "Traceback" not in err
    p.write_text('{"prompt": "a dog"}\n')
    assert cli_main(["batch", str(p), "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "o").exists()
    assert cli_main(["batch", str(p), "--model", sd_dir, "--out", str(tmp_path / "o"), "--batch-size", "0"]) == 2
    assert "--batch-size must be at least 1" in capsys.readouterr().err


def test_changed_words_rewrite_meta_without_regenerating(pipe, sd_dir, tmp_path: Path, monkeypatch) -> None:
    first = parse_prompts('{"prompt": "a red dog", "words": ["dog"]}\n', "jsonl")
    run_batch(first, tmp_path, _config(sd_dir), pipe=pipe)
    maps = RunRecord.load(tmp_path / "records" / "000000").heat_maps.maps
    monkeypatch.setattr(batch_mod, "_generate_batch", lambda *a: pytest.fail("regenerated"))
    second = parse_prompts('{"prompt": "a red dog", "words": ["red", "dog"], "meta": {"k": 1}}\n', "jsonl")
    assert run_batch(second, tmp_path, _config(sd_dir), pipe=pipe)["skipped"] == 1
    rec = RunRecord.load(tmp_path / "records" / "000000")
    assert rec.meta["words"] == ["red", "dog"] and rec.meta["item"] == {"k": 1}
    assert torch.equal(rec.heat_maps.maps, maps)
    assert json.loads((tmp_path / "index.jsonl").read_text())["words"] == ["red", "dog"]
