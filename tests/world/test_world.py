"""The shapes world's scene generator: reproducible, exact masks, a clean held-out split."""

from __future__ import annotations

import re

import numpy as np
import pytest

from daamkit.world import scenes as W
from daamkit.world.scenes import (
    BACKGROUNDS,
    COLORS,
    HELDOUT_PAIRS,
    HELDOUT_TEMPLATES,
    PLURALS,
    SHAPES,
    TEMPLATES,
    is_heldout,
    make_heldout_scene,
    make_scene,
)

N = 80


@pytest.fixture(scope="module")
def train_scenes():
    return [make_scene(i, "train") for i in range(N)]


@pytest.fixture(scope="module")
def test_scenes():
    return [make_scene(i, "test") for i in range(N)]


def test_world_has_enough_variety():
    assert len(SHAPES) >= 6 and len(COLORS) >= 6
    assert {"circle", "square", "triangle", "star", "heart", "cross"} <= set(SHAPES)
    assert len(BACKGROUNDS) >= 3
    # colours are distinct flat colours, far from each other and from every background
    cols = np.array(list(COLORS.values()), float)
    d = np.linalg.norm(cols[:, None] - cols[None], axis=-1)
    assert d[~np.eye(len(cols), dtype=bool)].min() > 60
    for bg in BACKGROUNDS.values():
        for c in bg:
            assert np.linalg.norm(cols - np.array(c, float), axis=-1).min() > 60


def test_reproducible():
    for seed in (0, 7, 123):
        a, b = make_scene(seed), make_scene(seed)
        assert a.caption == b.caption
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
        assert np.array_equal(a.masks, b.masks)
        assert a.to_dict() == b.to_dict()
    assert make_scene(0).caption != make_scene(1).caption or not np.array_equal(
        np.asarray(make_scene(0).image), np.asarray(make_scene(1).image)
    )
    # splits are different streams
    assert make_scene(5, "train").to_dict() != make_scene(5, "test").to_dict()


def test_counts_and_variety(train_scenes):
    ns = {len(s.objects) for s in train_scenes}
    assert ns == {1, 2, 3}
    assert {s.template for s in train_scenes} <= set(TEMPLATES) - HELDOUT_TEMPLATES
    assert len({s.template for s in train_scenes}) >= 8
    for t in set(TEMPLATES) - HELDOUT_TEMPLATES:
        assert make_scene(1, "train", template=t).template == t
    assert len({s.background for s in train_scenes}) == len(BACKGROUNDS)
    assert len({o.size for s in train_scenes for o in s.objects}) == 3
    # some scenes have overlapping objects
    assert any((s.full_masks.sum(0) > 1).any() for s in train_scenes)


def test_masks_match_rendered_pixels(train_scenes):
    for s in train_scenes[:60]:
        img = np.asarray(s.image).astype(int)
        assert s.masks.shape == (len(s.objects), 64, 64)
        # visible masks are disjoint and inside the amodal silhouettes
        assert (s.masks.sum(0) <= 1).all()
        assert not (s.masks & ~s.full_masks).any()
        for obj, m in zip(s.objects, s.masks, strict=True):
            assert m.sum() > 10
            col = np.array(COLORS[obj.color])
            dist = np.abs(img - col).sum(-1)
            # interior pixels (away from antialiased edges) have exactly the object's colour ...
            inner = m & np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1)
            assert (dist[inner] <= 3).mean() > 0.95
            # ... and almost every mask pixel is closer to this colour than to any other palette entry
            assert (dist[m] < 150).mean() > 0.8
        # every pure-coloured pixel belongs to an object of that colour
        for name, col in COLORS.items():
            pure = np.abs(img - np.array(col)).sum(-1) <= 3
            same = [i for i, o in enumerate(s.objects) if o.color == name]
            owned = s.masks[same].any(0) if same else np.zeros_like(pure)
            assert not (pure & ~owned).any()
        # background pixels carry no object colour
        bg = s.background_mask
        bg_inner = bg & np.roll(bg, 1, 0) & np.roll(bg, -1, 0) & np.roll(bg, 1, 1) & np.roll(bg, -1, 1)
        sat = img.max(-1) - img.min(-1)
        assert (sat[bg_inner] <= 3).mean() > 0.995  # (thin star tips may tint a few pixels)


def _words(caption: str) -> list[str]:
    return re.findall(r"[a-z]+", caption)


def test_captions_mention_exactly_the_objects_drawn(train_scenes, test_scenes):
    for s in train_scenes + test_scenes:
        words = _words(s.caption)
        assert [w.text for w in s.words] == words
        nouns = [w for w in s.words if w.role == "noun"]
        # every object is named by exactly one noun, with its shape; colours agree
        named = sorted(i for w in nouns for i in w.objects)
        assert named == list(range(len(s.objects))), s.caption
        for w in nouns:
            shapes = {s.objects[i].shape for i in w.objects}
            assert len(shapes) == 1
            shape = shapes.pop()
            assert w.text == (shape if len(w.objects) == 1 else PLURALS[shape])
        for w in s.words:
            if w.role == "color":
                assert all(s.objects[i].color == w.text for i in w.objects)
            if w.role == "size":
                size = {"small": "small", "tiny": "small", "large": "large", "big": "large"}[w.text]
                assert all(s.objects[i].size == size for i in w.objects)
        # no shape or colour word that is not drawn
        drawn_shapes = {o.shape for o in s.objects}
        drawn_colors = {o.color for o in s.objects}
        for t in words:
            singular = {PLURALS[x]: x for x in SHAPES}
            if t in SHAPES or t in singular:
                assert singular.get(t, t) in drawn_shapes
            if t in COLORS:
                assert t in drawn_colors


def test_word_masks(train_scenes):
    for s in train_scenes[:40]:
        for w, (text, role, mask) in zip(s.words, s.word_masks(), strict=True):
            assert text == w.text and role == w.role
            if w.objects is None:
                assert mask is None
            elif w.objects == ():
                assert np.array_equal(mask, s.background_mask)
            else:
                assert np.array_equal(mask, s.masks[list(w.objects)].any(0))
        nouns = [w for w in s.words if w.role == "noun"]
        assert np.array_equal(s.word_mask(nouns[0].text), s.masks[list(nouns[0].objects)].any(0))
    with pytest.raises(KeyError):
        train_scenes[0].word_mask("zebra")


def test_relations_hold_geometrically():
    seen = set()
    for i in range(60):
        s = make_scene(i, "train", template="pair_rel")
        a, b = s.objects
        seen.add(s.relation)
        if s.relation == "above":
            assert a.cy < b.cy
        elif s.relation == "below":
            assert a.cy > b.cy
        elif s.relation == "left":
            assert a.cx < b.cx
        elif s.relation == "right":
            assert a.cx > b.cx
    assert seen == {"above", "below", "left", "right", "next"}


def test_heldout_pairs_and_templates_never_in_train():
    for i in range(300):
        s = make_scene(i, "train")
        assert s.template not in HELDOUT_TEMPLATES
        for o in s.objects:
            assert (o.color, o.shape) not in HELDOUT_PAIRS
    with pytest.raises(ValueError):
        make_scene(0, "train", template=sorted(HELDOUT_TEMPLATES)[0])
    # held-out pairs cover every colour and every shape once
    assert {c for c, _ in HELDOUT_PAIRS} == set(COLORS)
    assert {s for _, s in HELDOUT_PAIRS} == set(SHAPES)


def test_test_split_and_heldout_scenes(test_scenes):
    assert any(is_heldout(s) for s in test_scenes)
    assert len({s.template for s in test_scenes}) >= 10
    for i in range(20):
        s = make_heldout_scene(i)
        assert is_heldout(s)
        assert make_heldout_scene(i).caption == s.caption


def test_caption_grammar():
    for i in range(150):
        c = make_scene(i, "test").caption
        assert " a orange" not in c and not c.startswith("a orange")
        assert "  " not in c and c == c.strip()


def test_render_batch():
    imgs, caps = W.render_batch([0, 1, 2])
    assert imgs.shape == (3, 64, 64, 3) and imgs.dtype == np.uint8
    assert caps == [make_scene(i).caption for i in range(3)]
