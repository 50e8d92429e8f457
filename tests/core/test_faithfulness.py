"""Faithfulness measures (``daamkit.faithfulness``, property-tested against direct definitions) and runs
(``daamkit.jobs.faithfulness``) on the tiny SD pipeline and the shapes-world model."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from daamkit.errors import InputError
from daamkit.faithfulness import (
    area_under,
    change_map,
    change_region,
    otsu_threshold,
    rank_correlation,
    rankdata,
    region_auc,
    rolled_region,
)

small = st.integers(min_value=0, max_value=4)  # few distinct values: many ties
grids = st.tuples(st.integers(1, 6), st.integers(1, 6))


def maps(shape, elements=small):
    return arrays(np.int64, shape, elements=elements).map(lambda a: a.astype(np.float64))


# ---- metrics ---------------------------------------------------------------------------------------
@settings(deadline=None)
@given(st.data())
def test_change_map_is_the_channel_l2_norm(data):
    shape = data.draw(grids)
    a = data.draw(arrays(np.uint8, (*shape, 3)))
    b = data.draw(arrays(np.uint8, (*shape, 3)))
    c = change_map(a, b)
    for y, x in itertools.product(range(shape[0]), range(shape[1])):
        d = [(int(b[y, x, k]) - int(a[y, x, k])) / 255.0 for k in range(3)]
        assert math.isclose(c[y, x], math.sqrt(sum(v * v for v in d)), abs_tol=1e-12)
    assert np.allclose(change_map(a, b), change_map(b, a)) and not change_map(a, a).any()


def test_change_map_rejects_other_shapes():
    with pytest.raises(InputError, match="differ in shape"):
        change_map(np.zeros((4, 4, 3)), np.zeros((4, 5, 3)))


def _rank_by_definition(v):
    v = list(v)
    return [sum(u < x for u in v) + (sum(u == x for u in v) + 1) / 2 for x in v]


@settings(deadline=None)
@given(maps(st.integers(1, 30)))
def test_rankdata_gives_ties_their_average_rank(v):
    assert np.allclose(rankdata(v), _rank_by_definition(v))


@settings(deadline=None)
@given(st.data())
def test_spearman_is_pearson_of_average_ranks(data):
    n = data.draw(st.integers(2, 30))
    a, b = data.draw(maps(n)), data.draw(maps(n))
    rho = rank_correlation(a, b)
    ra, rb = np.array(_rank_by_definition(a)), np.array(_rank_by_definition(b))
    if ra.std() == 0 or rb.std() == 0:
        assert math.isnan(rho)
    else:
        assert math.isclose(rho, float(np.corrcoef(ra, rb)[0, 1]), abs_tol=1e-9)
        assert math.isclose(rank_correlation(a, a), 1.0) and math.isclose(rank_correlation(a, -a), -1.0)


@settings(deadline=None)
@given(st.data())
def test_region_auc_is_the_pairwise_win_rate(data):
    shape = data.draw(grids)
    heat = data.draw(maps(shape))
    region = data.draw(arrays(bool, shape))
    auc = region_auc(heat, region)
    pos, neg = heat[region], heat[~region]
    if pos.size == 0 or neg.size == 0:
        assert math.isnan(auc)
        return
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    assert math.isclose(auc, wins / (pos.size * neg.size), abs_tol=1e-12)
    assert math.isclose(region_auc(-heat, region), 1 - auc, abs_tol=1e-12)


@settings(max_examples=50, deadline=None)
@given(st.data())
def test_otsu_maximises_the_between_class_variance(data):
    n = data.draw(st.integers(2, 60))
    v = data.draw(arrays(np.float64, n, elements=st.floats(0, 10, allow_nan=False)))
    t = otsu_threshold(v)
    if v.max() == v.min():
        assert t == v.max()
        return

    def between(cut):
        hi = v > cut
        if hi.all() or not hi.any():
            return -1.0
        w1 = hi.mean()
        return w1 * (1 - w1) * (v[hi].mean() - v[~hi].mean()) ** 2

    # no cut between the distinct values beats Otsu's by more than the histogram's bin width allows
    u = np.unique(v)
    best = max(between(c) for c in (u[:-1] + u[1:]) / 2)
    width = (v.max() - v.min()) / 256
    assert between(t) >= best - 2 * width * (v.max() - v.min()) - 1e-12


def test_change_region_splits_two_levels():
    change = np.zeros((8, 8))
    change[2:5, 3:7] = 1.0
    change += np.linspace(0, 0.01, 64).reshape(8, 8)
    assert (change_region(change) == (change > 0.5)).all()
    assert not change_region(np.zeros((4, 4))).any()


@settings(deadline=None)
@given(arrays(bool, st.tuples(st.integers(1, 8), st.integers(1, 8))), st.integers(0, 2**32 - 1))
def test_rolled_region_keeps_shape_and_area(region, seed):
    rolled, (dy, dx) = rolled_region(region, np.random.default_rng(seed))
    assert rolled.shape == region.shape and rolled.sum() == region.sum()
    assert (np.roll(rolled, (-dy, -dx), axis=(0, 1)) == region).all()


def test_area_under_is_the_trapezoid_rule():
    assert area_under([0.2, 0.4, 0.8], [1.0, 3.0, 3.0]) == pytest.approx(0.2 * 2 + 0.4 * 3)
    assert area_under([0.2, 0.4, 0.8], [1.0, math.nan, 3.0]) == pytest.approx(0.6 * 2)
    assert math.isnan(area_under([0.2], [1.0]))


# ---- runs on the tiny SD pipeline --------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    from daamkit.testing.pipelines import tiny_sd
    from daamkit.testing.tokenizers import clip_tokenizer

    d = tmp_path_factory.mktemp("clip")
    clip_tokenizer(d)
    return tiny_sd(str(d))


def test_edit_prompt():
    from daamkit.jobs.faithfulness import edit_prompt

    assert edit_prompt("a red dog on a bench, red", "red") == "a dog on a bench,"
    assert edit_prompt("A Red dog", "red", swap="blue") == "A blue dog"
    assert edit_prompt("a reddish dog and a red cat", "red") == "a reddish dog and a cat"
    with pytest.raises(InputError, match="'blue' is not a word of the prompt"):
        edit_prompt("a red dog", "blue")


def test_counterfactual_on_tiny_sd(sd):
    from daamkit.jobs.faithfulness import counterfactual

    cf = counterfactual(sd, "a dog on a bench", "dog", seed=0, num_inference_steps=2, height=64, width=64)
    assert cf.counterfactual_prompt == "a on a bench"
    assert cf.image.dtype == np.uint8 and cf.image.shape == cf.counterfactual.shape == (64, 64, 3)
    assert cf.heat.shape == cf.change.shape == cf.region.shape == (64, 64)
    assert cf.change.max() > 0 and 0 < cf.region.mean() < 1
    assert cf.spearman == pytest.approx(rank_correlation(cf.heat, cf.change))
    assert cf.auc == pytest.approx(region_auc(cf.heat, cf.region))
    swap = counterfactual(sd, "a dog on a bench", "dog", swap="cat", seed=0, num_inference_steps=2, height=64,
                          width=64)
    assert swap.counterfactual_prompt == "a cat on a bench" and np.array_equal(swap.image, cf.image)
    with pytest.raises(InputError, match="method"):
        counterfactual(sd, "a dog on a bench", "dog", seed=0, method="nope")


def test_deletion_and_insertion_curves_on_tiny_sd(sd):
    from daamkit.jobs.faithfulness import deletion_curve

    heat = np.tile(np.linspace(0, 1, 64), (64, 1))  # rises from left to right
    calls = []

    def judge(image):
        calls.append(image)
        return bool(image.mean() > 0)

    curve = deletion_curve(sd, "a dog on a bench", "dog", heat, taus=(0.5, 0.75), seed=0, judge=judge,
                           num_inference_steps=2, height=64, width=64)
    assert curve.kind == "deletion" and curve.area == pytest.approx([0.5, 0.25], abs=0.02)
    assert len(calls) == 4 and curve.map_judge == [True, True] and curve.random_judge == [1.0, 1.0]
    assert all(v > 0 for v in curve.map_inside + curve.random_inside)
    assert all(np.isfinite(curve.map_effect)) and math.isfinite(curve.auc_map)
    assert [len(offs) for offs in curve.offsets] == [1, 1]  # one random region per tau
    js = curve.to_json()
    assert js["kind"] == "deletion" and len(js["random"]["offsets"]) == 2
    up = deletion_curve(sd, "a dog on a bench", "dog", heat, taus=(0.5,), scale=4.0, seed=0, random_regions=0,
                        num_inference_steps=2, height=64, width=64)
    assert up.kind == "insertion" and up.map_inside[0] > 0 and math.isnan(up.random_effect[0])
    with pytest.raises(InputError, match="threshold"):
        deletion_curve(sd, "a dog on a bench", "dog", heat, taus=(1.5,), seed=0)


# ---- the shapes-world model ------------------------------------------------------------------------
def test_world_deleting_a_noun_in_its_map_region_changes_it_most():
    from daamkit.world import ModelNotFoundError, default_model_path

    try:
        path = default_model_path()
    except ModelNotFoundError as e:  # pragma: no cover - a checkout without the weights
        pytest.fail(f"the shapes-world model is part of the package: {e}")
    from daamkit import trace
    from daamkit.jobs.faithfulness import deletion_curve
    from daamkit.jobs.pipeline import load_pipeline

    pipe = load_pipeline(path, dtype="float32", progress=False)
    prompt, kw = "a red circle and a blue square", {"num_inference_steps": 20, "guidance_scale": 5.0}
    with trace(pipe) as tc:
        pipe(prompt, generator=torch.Generator().manual_seed(0), **kw)
        heat = tc.heat_maps(0).word("circle")
    curve = deletion_curve(pipe, prompt, "circle", heat, taus=(0.4,), seed=0, random_regions=1, **kw)
    assert 0 < curve.area[0] < 0.5
    assert curve.map_inside[0] > 2 * curve.map_outside[0]  # the change lies in the word's region
    assert curve.map_inside[0] > 10 * curve.random_inside[0]  # and deleting elsewhere does little


def test_plots_are_figures():
    from daamkit.faithfulness import Counterfactual, Curve
    from daamkit.plot import plot_counterfactual, plot_deletion_curves

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    other = rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)
    change = change_map(image, other)
    heat = rng.random((16, 16))
    cf = Counterfactual("a dog", "a", "dog", None, 0, "daam", image, other, heat, change, change_region(change),
                        rank_correlation(heat, change), region_auc(heat, change_region(change)))
    fig = plot_counterfactual(cf)
    assert len(fig.axes) == 5 and "Spearman" in fig._suptitle.get_text()  # 4 panels and a colour bar
    curve = Curve("dog", 0.0, 0, [0.2, 0.4], area=[0.5, 0.2], map_inside=[1.0, 2.0], map_outside=[0.5, 0.5],
                  map_effect=[2.0, 4.0], random_inside=[0.1, 0.1], random_outside=[0.1, 0.1], random_effect=[1, 1])
    fig = plot_deletion_curves([curve, curve])
    assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 5  # map and random per curve, and y = 1
    assert curve.auc_map == pytest.approx(0.6) and curve.auc_random == pytest.approx(0.2)
