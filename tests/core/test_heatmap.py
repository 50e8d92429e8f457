"""Semantics of GlobalHeatMap / WordHeatMap: word maps, expansion, normalisation, masks, IoU/IoA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from daamkit.heatmap import GlobalHeatMap, WordHeatMap, as_bool_mask, mask_ioa, mask_iou
from daamkit.tokens import TokenAlignment, Word, WordNotFoundError

PUNCT = {",", ".", "!", "?", ";", ":"}


def make_alignment(
    pieces: list[tuple[str, int]], max_length: int = 16, prompt: str | None = None
) -> TokenAlignment:
    """Alignment built from the dataclass fields: ``pieces`` = (word, number of BPE tokens) in order.

    Position 0 is BOS, then the words' tokens, then EOS and padding up to ``max_length``.
    """
    tokens = ["<|startoftext|>"]
    words = []
    seen: dict[str, int] = {}
    for index, (text, n) in enumerate(pieces):
        start = len(tokens)
        tokens += [text[:2] + str(i) for i in range(n - 1)] + [f"{text}</w>"]
        words.append(
            Word(text, index, seen.get(text, 0), tuple(range(start, start + n)), False, text in PUNCT)
        )
        seen[text] = seen.get(text, 0) + 1
    tokens.append("<|endoftext|>")
    tokens += ["<|endoftext|>"] * (max_length - len(tokens))
    return TokenAlignment(tuple(tokens), tuple(words), max_length, prompt or " ".join(t for t, _ in pieces))


# "a giraffe , a dog" -> positions: BOS 0, a 1, giraffe 2-3, ',' 4, a 5, dog 6, EOS 7, pad 8..15
PIECES = [("a", 1), ("giraffe", 2), (",", 1), ("a", 1), ("dog", 1)]


def peaked(t: int, h: int, w: int, cells: dict[int, tuple[int, int, float]]) -> torch.Tensor:
    maps = torch.zeros(t, h, w)
    for pos, (y, x, v) in cells.items():
        maps[pos, y, x] = v
    return maps


@pytest.fixture
def gm() -> GlobalHeatMap:
    torch.manual_seed(0)
    al = make_alignment(PIECES)
    maps = torch.rand(al.max_length, 4, 6)
    return GlobalHeatMap(maps, al, (32, 48), meta={"steps": 3})


def test_words_and_token_maps(gm: GlobalHeatMap) -> None:
    assert gm.words == ["a", "giraffe", "dog"]  # distinct, punctuation left out
    assert gm.grid_size == (4, 6) and gm.image_size == (32, 48) and gm.num_tokens == 16
    assert torch.equal(gm.token_map(6), gm.maps[6])
    assert gm.token_heat_map(3).word == gm.alignment.tokens[3]
    with pytest.raises(IndexError):
        gm.token_map(16)
    assert "dog" in gm and "cat" not in gm and "do" not in gm


def test_multi_token_word_is_mean_of_its_tokens(gm: GlobalHeatMap) -> None:
    giraffe = gm.word("giraffe")
    assert giraffe.positions == (2, 3)
    assert torch.allclose(giraffe.value, (gm.maps[2] + gm.maps[3]) / 2)
    assert giraffe.value.shape == (4, 6) and giraffe.image_size == (32, 48)


def test_occurrence_selection(gm: GlobalHeatMap) -> None:
    first, second, both = gm.word("a", occurrence=0), gm.word("a", occurrence=1), gm.word("a")
    assert first.positions == (1,) and second.positions == (5,) and both.positions == (1, 5)
    assert torch.equal(first.value, gm.maps[1])
    assert torch.equal(second.value, gm.maps[5])
    assert torch.allclose(both.value, (gm.maps[1] + gm.maps[5]) / 2)
    labels = [label for label, _ in gm.items(per_occurrence=True)]
    assert labels == ["a (1)", "giraffe", "a (2)", "dog"]  # prompt order
    per = dict(gm.items(per_occurrence=True))
    assert torch.equal(per["a (2)"].value, second.value) and per["a (2)"].occurrence == 1


def test_unknown_word_raises(gm: GlobalHeatMap) -> None:
    with pytest.raises(WordNotFoundError):
        gm.word("cat")


def test_iteration_and_word_maps(gm: GlobalHeatMap) -> None:
    items = list(gm)
    assert [w for w, _ in items] == ["a", "giraffe", "dog"]
    assert all(isinstance(m, WordHeatMap) for _, m in items)
    assert [w for w, _ in gm.items(include_punctuation=True)] == ["a", "giraffe", ",", "dog"]
    maps = gm.compute_word_maps()
    assert list(maps) == gm.words and torch.equal(maps["dog"].value, gm.maps[6])
    assert torch.equal(gm["dog"].value, gm.maps[6])


def test_constructor_validates(gm: GlobalHeatMap) -> None:
    with pytest.raises(ValueError, match="token rows"):
        GlobalHeatMap(torch.zeros(5, 4, 6), gm.alignment, (32, 48))
    with pytest.raises(ValueError, match="tokens, h, w"):
        GlobalHeatMap(torch.zeros(4, 6), gm.alignment, (32, 48))
    with pytest.raises(ValueError, match="image_size"):
        GlobalHeatMap(gm.maps, gm.alignment, (0, 48))


def test_expand_peak_lands_in_the_right_place_non_square() -> None:
    # Grid 4 rows x 6 cols, image 32 x 48 (8 px per cell). Peak at grid cell (row 1, col 4):
    # its pixel centre is y = 1.5 * 8 = 12, x = 4.5 * 8 = 36, so the peak must be around (11..12, 35..36).
    al = make_alignment(PIECES)
    gm = GlobalHeatMap(peaked(16, 4, 6, {6: (1, 4, 1.0)}), al, (32, 48))
    e = gm.word("dog").expand()
    assert e.shape == (32, 48)
    y, x = divmod(int(e.argmax()), 48)
    assert 11 <= y <= 12 and 35 <= x <= 36
    assert float(e.min()) >= 0.0  # bicubic overshoot clamped
    # The same map at an explicit size, and the whole stack.
    assert gm.word("dog").expand((16, 24)).shape == (16, 24)
    assert gm.expand().shape == (16, 32, 48)
    assert torch.allclose(gm.expand()[6], e)


def test_expand_is_bicubic_align_corners_false() -> None:
    v = torch.rand(3, 5)
    wm = WordHeatMap(v, "x", image_size=(9, 15))
    ref = torch.nn.functional.interpolate(v[None, None], size=(9, 15), mode="bicubic", align_corners=False)
    assert torch.allclose(wm.expand(), ref[0, 0].clamp(min=0))


def test_normalized_range_and_zero_map() -> None:
    wm = WordHeatMap(torch.rand(4, 6) + 0.1, "x", image_size=(32, 48))
    n = wm.normalized()
    assert float(n.max()) == 1.0 and float(n.min()) >= 0.0
    zero = WordHeatMap(torch.zeros(4, 6), "z", image_size=(32, 48))
    nz = zero.normalized()
    assert not torch.isnan(nz).any() and float(nz.abs().sum()) == 0.0
    assert not zero.mask().any()
    mm = wm.normalized(method="minmax")
    assert float(mm.min()) == 0.0 and float(mm.max()) == 1.0
    with pytest.raises(ValueError, match="NaN"):
        WordHeatMap(torch.full((2, 2), float("nan")), "n").normalized()


def hand_map() -> WordHeatMap:
    # Grid = image size, so expansion is the identity and the mask is known exactly:
    # the normalised map is 1.0 on rows 0-1 x cols 0-3 (8 px), 0.5 on row 2 x cols 0-3, 0 elsewhere.
    v = torch.zeros(4, 6)
    v[0:2, 0:4] = 2.0
    v[2, 0:4] = 1.0
    return WordHeatMap(v, "hand", image_size=(4, 6))


def test_identity_expand_and_mask_threshold_inclusive() -> None:
    wm = hand_map()
    assert torch.allclose(wm.expand(), wm.value)
    m = wm.mask(0.4)
    assert m.dtype == np.bool_ and m.shape == (4, 6)
    assert m.sum() == 12 and m[:3, :4].all()
    assert wm.mask(0.5).sum() == 12  # >= : the 0.5 row is kept at threshold 0.5
    assert wm.mask(0.6).sum() == 8
    assert wm.mask(1.0).sum() == 8  # the peak itself survives threshold 1
    with pytest.raises(ValueError, match="threshold"):
        wm.mask(1.5)


def test_iou_ioa_against_hand_made_mask() -> None:
    wm = hand_map()  # mask at 0.4: rows 0-2, cols 0-3 (12 px)
    gt = np.zeros((4, 6), dtype=bool)
    gt[1:4, 2:6] = True  # 12 px; intersection rows 1-2 x cols 2-3 = 4 px; union 20
    assert wm.iou(gt) == pytest.approx(4 / 20)
    assert wm.ioa(gt) == pytest.approx(4 / 12)
    assert wm.iou(torch.from_numpy(gt)) == pytest.approx(4 / 20)  # torch masks too
    assert wm.iou(gt.astype(np.uint8)) == pytest.approx(4 / 20)  # 0/1 ints accepted
    assert wm.iou(wm.mask()) == 1.0
    with pytest.raises(ValueError, match=r"shape \(5, 6\)"):
        wm.iou(np.zeros((5, 6), dtype=bool))
    with pytest.raises(ValueError, match="0/1"):
        wm.iou(np.full((4, 6), 255, dtype=np.uint8))


def test_iou_between_word_maps_and_empty_cases() -> None:
    a = hand_map()
    v = torch.zeros(4, 6)
    v[2:4, 2:6] = 1.0
    b = WordHeatMap(v, "b", image_size=(4, 6))  # mask rows 2-3 x cols 2-5 = 8 px, overlap row 2 x 2-3 = 2
    assert a.iou(b) == pytest.approx(2 / 18)
    assert a.ioa(b) == pytest.approx(2 / 8)
    empty = WordHeatMap(torch.zeros(4, 6), "e", image_size=(4, 6))
    assert empty.iou(empty) == 0.0  # empty union defined as 0
    assert a.ioa(np.zeros((4, 6), dtype=bool)) == 0.0  # empty reference area defined as 0
    with pytest.raises(ValueError, match="image size"):
        a.iou(WordHeatMap(v, "c", image_size=(8, 12)))


def test_mask_helpers() -> None:
    a = np.array([[1, 1], [0, 0]], dtype=bool)
    b = np.array([[1, 0], [1, 0]], dtype=bool)
    assert mask_iou(a, b) == pytest.approx(1 / 3)
    assert mask_ioa(a, b) == pytest.approx(1 / 2)
    with pytest.raises(ValueError, match="2-D"):
        as_bool_mask(np.zeros((2, 2, 1), dtype=bool))


def test_to_cpu_and_equality(gm: GlobalHeatMap) -> None:
    other = GlobalHeatMap(gm.maps.clone(), gm.alignment, gm.image_size, dict(gm.meta))
    assert other == gm
    assert gm.cpu() == gm
    assert GlobalHeatMap(gm.maps + 1, gm.alignment, gm.image_size, gm.meta) != gm
    assert gm.word("dog").cpu().positions == (6,)
    assert "giraffe" in repr(gm) and "dog" in repr(gm.word("dog"))
