"""Several attribution methods scored side by side (``daamkit eval --methods``): the selection of the
methods, the scoring of each method's maps against the same masks, the table and plot, and a tiny
run on the embedded model in which every method is traced in the same pipeline call."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from daamkit.capture import UnsupportedPipelineError
from daamkit.cli import main
from daamkit.errors import InputError
from daamkit.evaluate import evaluate_world, scene_words, score_run, select_methods
from daamkit.evaluate.protocol import EvalResult
from daamkit.heatmap import GlobalHeatMap
from daamkit.methods import METHODS, AttributionMethod
from daamkit.tokens import align
from daamkit.world import make_heldout_scene, make_scene


class EchoMethod(AttributionMethod):
    """A method merged later, as eval sees it: listed in METHODS, built with ``for_images``' default.
    Its maps are DAAM's, so its scores must be DAAM's."""

    name = "echo"

    def heat_maps(self, trace, i, **options):
        return trace.method("daam").heat_maps(trace, i, **options)


@pytest.fixture()
def with_echo(monkeypatch):
    monkeypatch.setitem(METHODS, "echo", EchoMethod)


def test_select_methods_names_aliases_all_and_errors(with_echo):
    assert select_methods("daam,ovam", "unet") == (["daam", "ovam"], [])
    assert select_methods(["ovam", "cross"]) == (["ovam", "daam"], [])
    chosen, notes = select_methods("all", "unet")
    assert chosen == ["daam", "ovam", "refined", "echo"]  # a method added to METHODS is picked up as it is
    assert len(notes) == 1 and notes[0].startswith("concept: skipped") and "joint-attention" in notes[0]
    chosen, notes = select_methods(" all ", "flux")
    assert chosen == ["daam", "concept", "echo"] and notes[0].startswith("ovam: skipped")
    allowed = "allowed: all, daam (alias cross), concept, ovam, refined, echo"
    with pytest.raises(InputError, match=r"unknown attribution method 'dam'; " + allowed.replace("(", r"\(").replace(")", r"\)")):
        select_methods("daam,dam")
    with pytest.raises(InputError, match="'all' stands alone"):
        select_methods("all,daam")
    with pytest.raises(InputError, match="name 'daam' twice"):
        select_methods("daam,cross")
    with pytest.raises(InputError, match="empty name"):
        select_methods("daam,,ovam")
    with pytest.raises(UnsupportedPipelineError, match="'concept' does not apply to this unet model"):
        select_methods("daam,concept", "unet")


def _maps(tokenizer, text, masks_by_word, size):
    """A GlobalHeatMap over ``text``'s tokens whose word maps are the given masks."""
    ids = tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids
    al = align(tokenizer, ids, text)
    maps = torch.full((77, *size), 0.01)
    for w in al.words:
        m = masks_by_word.get((w.text, w.occurrence))
        for p in w.positions:
            if m is not None:
                maps[p] = torch.from_numpy(m.astype(np.float32))
    return GlobalHeatMap(maps, al, size)


def test_score_run_scores_every_method_against_the_same_masks(sd_tokenizer):
    for seed in range(200):
        scene = make_scene(seed, "test")
        nouns = [w.text for w in scene.words if w.role == "noun"]
        if len(scene.objects) == 2 and len(set(nouns)) == 2 and all(m.sum() > 20 for m in scene.masks):
            break
    else:
        pytest.skip("no two-object scene in the first 200 seeds")
    size = scene.masks.shape[1:]
    perfect, swapped, seen = {}, {}, {}
    for w in scene.words:
        k = seen.get(w.text, 0)
        seen[w.text] = k + 1
        if w.role in ("noun", "color"):
            perfect[(w.text, k)] = scene.object_mask(w.objects)
            other = [i for i in range(2) if (i,) != w.objects]
            swapped[(w.text, k)] = scene.object_mask((other[0],))
    words = " ".join(scene_words(scene))  # an OVAM-like map: only the scene's nouns and colours
    by_method = {"good": _maps(sd_tokenizer, scene.caption, perfect, size),
                 "bad": _maps(sd_tokenizer, words, swapped, size)}
    scores, check = score_run(by_method, scene.image, scene.caption, taus=(0.4,))
    good = [s for s in scores if s.method == "good"]
    bad = [s for s in scores if s.method == "bad"]
    assert len(good) == len(bad) >= 4 and {(s.word, s.occurrence) for s in good} == {(s.word, s.occurrence) for s in bad}
    assert all(s.iou["0.4"] > 0.9 for s in good) and all(s.iou["0.4"] < 0.1 for s in bad)
    for g, b in zip(good, bad, strict=True):  # the trivial baselines are drawn once per word
        assert {k: v for k, v in g.baselines.items() if k != "other word"} == \
            {k: v for k, v in b.baselines.items() if k != "other word"}
    # one map alone is scored as DAAM, as before
    alone, _ = score_run(by_method["good"], scene.image, scene.caption, taus=(0.4,))
    assert [s.method for s in alone] == ["daam"] * len(good) and [s.iou for s in alone] == [s.iou for s in good]

    result = EvalResult(scores=scores, checks=[check], taus=(0.4,), methods=("good", "bad"),
                        notes=["concept: skipped, it does not apply"])
    noun = result.summary()["words"]["noun"]
    assert noun["miou"]["good"]["0.4"][0] > 0.9 and noun["miou"]["bad"]["0.4"][0] < 0.1
    assert noun["by_method"]["bad"]["n"] == 2 and noun["n"] == 2
    assert result.miou("noun", 0.4) == result.miou("noun", 0.4, method="good")
    diff = noun["by_method"]["bad"]["minus_first"]["0.4"]
    assert diff[0] == pytest.approx(noun["miou"]["bad"]["0.4"][0] - noun["miou"]["good"]["0.4"][0])
    assert diff[1] <= diff[0] <= diff[2] < -0.8 and "minus_first" not in noun["by_method"]["good"]
    assert result.paired_difference("noun", 0.4, "good", reference="bad")[0] == pytest.approx(-diff[0])
    md = result.markdown(0.4)
    assert "| noun | 2 | good |" in md and "| noun | 2 | bad |" in md and "| noun | bad |" in md
    assert "| noun | 2 | bad minus good (paired) | -0.9" in md
    assert "Not scored: concept: skipped" in md
    fig = result.plot()
    for ax in fig.axes:  # one panel per word kind, one line per method, then the baselines
        labels = [line.get_label() for line in ax.lines]
        assert labels[:2] == ["good", "bad"] and "whole image" in labels


@pytest.fixture(scope="module")
def world_pipe():
    from daamkit.jobs.pipeline import load_pipeline
    from daamkit.world import ModelNotFoundError, default_model_path

    try:
        path = default_model_path()
    except ModelNotFoundError as e:
        pytest.skip(str(e))
    return load_pipeline(path, progress=False)


def test_all_methods_on_the_same_images_of_the_embedded_model(world_pipe, with_echo):
    kw = dict(n=3, seed=5, steps=4, taus=(0.4, 0.6), batch_size=2, progress=False)
    result = evaluate_world(world_pipe, methods="all", **kw)
    assert result.methods == ("daam", "ovam", "refined", "echo") and result.notes[0].startswith("concept: skipped")
    assert result.settings["methods"] == ["daam", "ovam", "refined", "echo"] and len(result.checks) == 3
    by = {m: [(s.image, s.word, s.occurrence, s.iou) for s in result.scores if s.method == m] for m in result.methods}
    assert by["daam"], "nothing was scored"
    # OVAM maps the scenes' own nouns and colours: the same words are scored for every method
    assert [k[:3] for k in by["ovam"]] == [k[:3] for k in by["daam"]]
    assert by["echo"] == by["daam"]
    # the images are those of a DAAM-only evaluation: tracing more methods changes nothing
    plain = evaluate_world(world_pipe, **kw)
    assert plain.methods == ("daam",) and "methods" not in plain.settings
    assert [c["caption"] for c in plain.checks] == [c["caption"] for c in result.checks]
    assert [c["exact"] for c in plain.checks] == [c["exact"] for c in result.checks]
    assert [(s.image, s.word, s.occurrence, s.iou) for s in plain.scores] == by["daam"]
    assert [s.iou for s in result.scores if s.method == "ovam"] != [s.iou for s in plain.scores]
    assert world_pipe.unet._forward_pre_hooks == {} and world_pipe.unet._forward_hooks == {}
    assert scene_words(make_heldout_scene(5)) == ["blue", "circle", "blue", "triangle", "purple", "heart"]


def test_eval_cli_writes_one_table_for_all_methods(tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(["eval", "--methods", "all", "--n", "2", "--seed", "2", "--steps", "3", "--taus", "0.3",
                 "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "daamkit eval: concept: skipped" in err
    doc = json.loads((out / "eval.json").read_text())
    assert doc["summary"]["methods"] == ["daam", "ovam", "refined"] and doc["summary"]["taus"] == [0.3, 0.4]
    assert {s["method"] for s in doc["scores"]} == {"daam", "ovam", "refined"}
    md = (out / "eval.md").read_text()
    assert "| noun | ovam | " in md and "| colour | daam | " in md
    assert (out / "miou_vs_tau.png").stat().st_size > 1000


@pytest.mark.parametrize("argv, message", [
    (["--methods", "daam,nope"], "unknown attribution method 'nope'; allowed: all, daam (alias cross), concept, ovam"),
    (["--methods", "all,ovam"], "'all' stands alone"),
    (["--methods", "daam,daam"], "twice"),
    (["--methods", ""], "empty name"),
    (["--methods", "ovam", "--runs", "{t}"], "--methods applies when eval generates the images"),
    (["--methods", "concept", "--n", "1"], "'concept' does not apply to this unet model"),
])
def test_bad_methods_give_one_line_and_exit_2(tmp_path, capsys, argv, message):
    out = tmp_path / "out"
    argv = [a.replace("{t}", str(tmp_path)) for a in argv]
    assert main(["eval", *argv, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert not out.exists()
