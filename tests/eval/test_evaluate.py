"""The evaluation code on hand-made maps and masks whose scores are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from daamkit.evaluate import centre_gaussian, iou, mean_ci, random_map, score_run, whole_image
from daamkit.evaluate.protocol import EvalResult
from daamkit.heatmap import GlobalHeatMap
from daamkit.tokens import align
from daamkit.world import make_scene


def test_iou_on_known_masks():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2] = True  # 8 pixels
    b[1:3] = True  # 8 pixels, 4 shared
    assert iou(a, b) == pytest.approx(4 / 12)
    assert iou(a, a) == 1.0 and iou(a, ~a) == 0.0
    assert iou(np.zeros((2, 2)), np.zeros((2, 2))) == 0.0
    with pytest.raises(ValueError, match="differ"):
        iou(a, np.zeros((3, 3), bool))


def test_mean_ci_brackets_the_mean_and_shrinks_with_n():
    rng = np.random.default_rng(0)
    small = rng.random(20)
    large = rng.random(2000)
    m, lo, hi = mean_ci(small)
    assert lo < m < hi
    m2, lo2, hi2 = mean_ci(large)
    assert hi2 - lo2 < (hi - lo) / 5
    assert mean_ci([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)
    assert all(np.isnan(mean_ci([])))


def test_baselines():
    assert whole_image((8, 6)).min() == 1.0
    g = centre_gaussian((9, 9))
    assert g.argmax() == 40 and g.max() == pytest.approx(1.0)
    r = random_map((16, 16), np.random.default_rng(0))
    assert r.shape == (16, 16) and 0 <= r.min() and r.max() == pytest.approx(1.0)
    assert not np.allclose(r, random_map((16, 16), np.random.default_rng(1)))


def maps_from_masks(tokenizer, caption, masks_by_word, size):
    """A GlobalHeatMap whose word maps are exactly the given masks (on an image-size grid)."""
    ids = tokenizer(caption, padding="max_length", max_length=77, truncation=True).input_ids
    al = align(tokenizer, ids, caption)
    maps = torch.zeros(77, *size)
    for w in al.words:
        m = masks_by_word.get((w.text, w.occurrence))
        for p in w.positions:
            maps[p] = torch.from_numpy(m.astype(np.float32)) if m is not None else 0.01
    return GlobalHeatMap(maps, al, size)


def _scene_with_two_objects():
    for seed in range(200):
        scene = make_scene(seed, "test")
        roles = [w.role for w in scene.words]
        if len(scene.objects) == 2 and roles.count("noun") == 2 and scene.masks.any(0).sum() > 0:
            nouns = [w.text for w in scene.words if w.role == "noun"]
            if len(set(nouns)) == 2 and all(m.sum() > 20 for m in scene.masks):
                return scene
    pytest.skip("no two-object scene in the first 200 seeds")


def test_score_run_gives_one_for_perfect_maps_and_zero_for_swapped_ones(sd_tokenizer):
    scene = _scene_with_two_objects()
    size = scene.masks.shape[1:]
    perfect, swapped = {}, {}
    seen: dict[str, int] = {}
    for w in scene.words:
        k = seen.get(w.text, 0)
        seen[w.text] = k + 1
        m = scene.object_mask(w.objects) if w.role in ("noun", "color") else None
        perfect[(w.text, k)] = m
        if m is not None:
            other = [i for i in range(len(scene.objects)) if (i,) != w.objects]
            swapped[(w.text, k)] = scene.object_mask((other[0],))
    good, check = score_run(maps_from_masks(sd_tokenizer, scene.caption, perfect, size), scene.image,
                            scene.caption, taus=(0.4,))
    assert check["exact"] or check["objects_present"] == 1.0
    nouns = [s for s in good if s.kind == "noun"]
    assert len(nouns) == 2
    # the drawn masks are recovered from the picture, so allow the anti-aliased border
    assert all(s.iou["0.4"] > 0.9 and s.peak_inside for s in good)
    bad, _ = score_run(maps_from_masks(sd_tokenizer, scene.caption, swapped, size), scene.image,
                       scene.caption, taus=(0.4,))
    assert all(s.iou["0.4"] < 0.1 and not s.peak_inside for s in bad)
    # the whole-image baseline scores the object's share of the image
    s = nouns[0]
    truth = scene.word_mask(s.word)
    assert s.baselines["whole image"]["0.4"] == pytest.approx(truth.mean(), abs=0.03)
    assert s.baselines["other word"]["0.4"] < 0.1

    result = EvalResult(scores=good + bad, checks=[check, check], taus=(0.4,))
    summary = result.summary()
    assert summary["words"]["noun"]["n"] == 4
    assert summary["words"]["noun"]["miou"]["daam"]["0.4"][0] == pytest.approx(
        np.mean([s.iou["0.4"] for s in good + bad if s.kind == "noun"]))
    assert "| noun | 4 | daam |" in result.markdown(0.4)
