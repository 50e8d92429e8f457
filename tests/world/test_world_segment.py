"""Recovering drawn objects from shapes-world images (tested on rendered scenes with known truth)."""

from __future__ import annotations

import numpy as np
import pytest

from daamkit.world.scenes import COLORS, SHAPES, SceneObject, make_scene, render
from daamkit.world.segment import (
    BLUR_SIGMAS,
    classify_pixels,
    classify_shape,
    connected_components,
    drawn_masks,
    generation_accuracy,
    parse_caption,
    segment,
)


def _iou(a, b):
    return (a & b).sum() / max(1, (a | b).sum())


def test_connected_components():
    m = np.zeros((8, 8), bool)
    m[0:2, 0:2] = True
    m[5:8, 5:8] = True
    m[4, 0] = True
    lab, n = connected_components(m)
    assert n == 3
    assert len({lab[0, 0], lab[6, 6], lab[4, 0]}) == 3 and lab[3, 3] == 0
    m2 = np.eye(4, dtype=bool)
    assert connected_components(m2)[1] == 4
    assert connected_components(m2, connectivity=8)[1] == 1


def test_classify_pixels_palette_and_background():
    img = np.zeros((2, len(COLORS) + 3, 3), np.uint8)
    for i, c in enumerate(COLORS.values()):
        img[:, i] = c
    img[:, len(COLORS)] = (255, 255, 255)
    img[:, len(COLORS) + 1] = (128, 128, 128)
    img[:, len(COLORS) + 2] = (20, 20, 20)
    lab = classify_pixels(img)
    assert lab[0, : len(COLORS)].tolist() == list(range(len(COLORS)))
    assert (lab[:, len(COLORS) :] == -1).all()


@pytest.mark.parametrize("shape", SHAPES)
def test_shape_classifier_on_single_shapes(shape):
    hits = 0
    for k, (r, ang) in enumerate([(7.0, 0.0), (11.0, 8.0), (16.0, -10.0)]):
        obj = SceneObject(shape, "red", "medium", 30 + k, 33 - k, r, ang if shape != "circle" else 0.0)
        _, vis, _, _ = render([obj], "white")
        got, score, _ = classify_shape(vis[0])
        hits += got == shape
        assert score > 0.6
    assert hits >= 2  # the smallest hearts and circles are nearly alike at 64 px


def _blurred_single_shapes(sigma: float):
    """(image, true shape) for every shape at five sizes and angles, in varied colours and
    backgrounds, blurred like a decoded image."""
    from PIL import ImageFilter

    colors = list(COLORS)
    for si, shape in enumerate(SHAPES):
        for k, (r, ang) in enumerate([(7.0, 0.0), (9.0, -6.0), (11.0, 8.0), (14.0, -10.0), (16.0, 4.0)]):
            obj = SceneObject(
                shape, colors[(si + k) % 6], "medium", 30 + k, 33 - k, r, ang if shape != "circle" else 0.0
            )
            image = render([obj], ("white", "grey", "black")[k % 3])[0]
            yield image.filter(ImageFilter.GaussianBlur(sigma)), shape


def test_shape_classifier_reads_blurred_shapes():
    # sharp templates alone read blurred hearts, stars and squares as circles (26 of 30 right here);
    # the blurred templates must get nearly all of them
    def right(blurs):
        hits = 0
        for image, shape in _blurred_single_shapes(1.5):
            comps = segment(image, classify=False)
            hits += bool(comps) and classify_shape(comps[0].mask, blurs=blurs)[0] == shape
        return hits

    with_blur, sharp_only = right(BLUR_SIGMAS), right((0.0,))
    assert with_blur >= 28
    assert with_blur > sharp_only


def test_segment_recovers_rendered_scenes():
    n = iou_sum = 0
    shape_ok = 0
    for i in range(25):
        s = make_scene(i, "test")
        chk = generation_accuracy(s.image, s)
        assert chk.colors_present == 1.0
        for k, _obj in enumerate(s.objects):
            m = chk.mask_for(k)
            assert m is not None
            iou_sum += _iou(m, s.masks[k])
            n += 1
        shape_ok += chk.shapes_correct
    assert iou_sum / n > 0.85
    assert shape_ok / 25 > 0.85


def test_generation_accuracy_detects_missing_and_wrong():
    s = make_scene(3, "test", template="single")
    obj = s.objects[0]
    other_color = next(c for c in COLORS if c != obj.color)
    other_shape = next(x for x in SHAPES if x != obj.shape)
    ok = generation_accuracy(s.image, [(obj.color, obj.shape)])
    assert ok.exact and ok.shapes_correct == 1.0
    wrong_color = generation_accuracy(s.image, [(other_color, obj.shape)])
    assert wrong_color.colors_present == 0.0 and not wrong_color.exact and wrong_color.extra == 1
    missing = generation_accuracy(s.image, [(obj.color, obj.shape), (other_color, other_shape)])
    assert missing.objects_present == 0.5 and not missing.exact
    blank = np.full((64, 64, 3), 255, np.uint8)
    assert generation_accuracy(blank, s.caption).objects_present == 0.0
    assert segment(blank) == []


def test_parse_caption():
    r = parse_caption("a small red circle above a blue star on a grey background")
    assert [(x.color, x.shape, x.count) for x in r] == [("red", "circle", 1), ("blue", "star", 1)]
    r = parse_caption("a picture of three yellow crosses")
    assert [(x.color, x.shape, x.count) for x in r] == [("yellow", "cross", 3)]
    r = parse_caption("a red circle, a blue star and an orange heart")
    assert [x.color for x in r] == ["red", "blue", "orange"]


def test_drawn_masks_words():
    s = make_scene(11, "test", template="pair_rel")
    dm = drawn_masks(s.image, s.caption)
    a, b = s.objects
    assert _iou(dm[a.shape][0], s.masks[0]) > 0.8
    assert _iou(dm[b.color][-1], s.masks[1]) > 0.8
