"""``daamkit eval --faithfulness``: the causal tests on the embedded shapes-world model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from daamkit.cli import main
from daamkit.evaluate.faithfulness import FLOOR, _swap, evaluate_faithfulness


@pytest.fixture(scope="module")
def world_pipe():
    from daamkit.jobs.pipeline import load_pipeline

    return load_pipeline("world", progress=False)


def test_swap_replaces_the_chosen_occurrence_with_a_word_of_its_kind_not_in_the_caption():
    rng = np.random.default_rng(0)
    cap = "a red circle and a red square"
    out = _swap(cap, "red", 1, "colour", rng)
    a, b = cap.split(), out.split()
    assert a[:5] == b[:5] and a[6:] == b[6:] and b[5] not in ("red", "circle", "square")
    noun = _swap("two blue stars, a red circle", "circle", 0, "noun", rng).split()[-1]
    assert noun not in ("circle", "stars") and noun.isalpha()


def test_every_word_gets_both_tests_for_every_map_and_the_floor(world_pipe):
    r = evaluate_faithfulness(world_pipe, n=1, seed=3, steps=4, taus=(0.4,), methods="daam", progress=False)
    assert r.images == 1 and r.methods == ("daam",)
    words = {(s.word, s.occurrence) for s in r.scores}
    assert words, "no drawn object to test"
    for m in ("daam", FLOOR):
        mine = [s for s in r.scores if s.method == m]
        assert {(s.word, s.occurrence) for s in mine} == words
        for s in mine:
            assert -1 <= s.spearman <= 1 and (math.isnan(s.auc) or 0 <= s.auc <= 1)
            assert 0 < s.change_area < 1
            if "0.4" in s.removed:
                assert s.removed["0.4"] in (0.0, 1.0) and s.removed_random["0.4"] in (0.0, 1.0)
                assert math.isnan(s.inside["0.4"]) or 0 <= s.inside["0.4"] <= 1
    # a map that tells where the object is moves more of the change into its region than a random region
    # of its size; the floor does not know where the object is
    daam = [s for s in r.scores if s.method == "daam" and "0.4" in s.inside and not math.isnan(s.inside["0.4"])]
    assert daam and np.mean([s.inside["0.4"] for s in daam]) > np.mean([s.area["0.4"] for s in daam])
    md = r.markdown(0.4)
    assert "| noun | daam |" in md and f"| noun | {FLOOR} |" in md
    assert world_pipe.unet._forward_pre_hooks == {} and world_pipe.unet._forward_hooks == {}


def test_eval_cli_writes_the_faithfulness_table_and_refuses_it_with_runs(tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(["eval", "--n", "1", "--seed", "3", "--steps", "3", "--taus", "0.4", "--faithfulness", "1",
                 "--faithfulness-taus", "0.4", "--out", str(out), "--no-progress"]) == 0
    doc = json.loads((out / "faithfulness.json").read_text())
    assert doc["summary"]["methods"] == ["daam"] and doc["scores"]
    assert (out / "deletion_curves.png").stat().st_size > 1000 and "| daam |" in (out / "faithfulness.md").read_text()
    capsys.readouterr()
    bad = tmp_path / "bad"
    assert main(["eval", "--runs", str(tmp_path), "--faithfulness", "2", "--out", str(bad), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--faithfulness applies when eval generates" in err
    assert not bad.exists()
