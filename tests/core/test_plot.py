"""Overlay images and matplotlib plots (object-oriented API only, headless)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from daamkit import plot
from daamkit.heatmap import GlobalHeatMap, WordHeatMap
from daamkit.tokens import TokenAlignment, Word


def make_alignment(words: list[str], max_length: int = 10) -> TokenAlignment:
    # One token per word: BOS, words, EOS, padding.
    tokens = ["<|startoftext|>"] + [f"{w}</w>" for w in words] + ["<|endoftext|>"]
    tokens += ["<|endoftext|>"] * (max_length - len(tokens))
    ws = tuple(Word(w, i, words[:i].count(w), (i + 1,), False, w in {",", "."}) for i, w in enumerate(words))
    return TokenAlignment(tuple(tokens), ws, max_length, " ".join(words))


@pytest.fixture
def scene() -> tuple[GlobalHeatMap, PIL.Image.Image]:
    # Grid 4x6, image 32x48 (H x W). "red" is hot in the top-left cell, "square" in the bottom-right.
    al = make_alignment(["a", "red", "square", ",", "a", "ball"])
    maps = torch.zeros(10, 4, 6)
    maps[2, 0, 0] = 1.0
    maps[3, 3, 5] = 2.0
    maps[6] = 0.1
    image = PIL.Image.new("RGB", (48, 32), (128, 128, 128))  # PIL size is (W, H)
    return GlobalHeatMap(maps, al, (32, 48)), image


def colorbar_axes(fig: Figure) -> list[Axes]:
    return [a for a in fig.axes if getattr(a, "_colorbar", None) is not None]


def test_overlay_rgb_of_image_size_changed_where_hot(scene) -> None:
    gm, image = scene
    red = gm.word("red")
    out = red.overlay(image, weighted=True)
    assert out.mode == "RGB" and out.size == image.size
    diff = np.abs(np.asarray(out, dtype=int) - np.asarray(image, dtype=int)).sum(-1)
    assert diff[2, 2] > 50  # top-left: where the map is high
    assert diff[28, 44] == 0  # bottom-right: cold, weighted overlay leaves the image alone
    # Default blend (uniform alpha) still colours the hot region differently from the cold one.
    plain = np.asarray(red.overlay(image), dtype=int)
    assert np.abs(plain[2, 2] - plain[28, 44]).sum() > 50


def test_overlay_expands_to_the_given_image_and_checks_shapes(scene) -> None:
    gm, _ = scene
    big = PIL.Image.new("RGBA", (96, 64))
    assert gm.word("square").overlay(big).size == (96, 64)
    with pytest.raises(ValueError, match="expand the map"):
        plot.overlay(big, np.zeros((32, 48)))
    with pytest.raises(ValueError, match="alpha"):
        plot.overlay(big, np.zeros((64, 96)), alpha=2.0)


def test_plot_word_returns_axes_with_colorbar(scene) -> None:
    gm, image = scene
    ax = gm.word("red").plot(image=image)
    assert isinstance(ax, Axes)
    assert ax.get_title() == "red"
    assert len(colorbar_axes(ax.figure)) == 1
    heat = ax.images[-1].get_array()
    assert heat.shape == (32, 48) and float(heat.max()) == pytest.approx(1.0)
    ax2 = plot.plot_word(gm.word("ball"), colorbar=False, title="")
    assert colorbar_axes(ax2.figure) == [] and ax2.get_title() == ""


def test_plot_word_on_given_axes(scene) -> None:
    gm, _ = scene
    fig = Figure()
    ax = fig.add_subplot()
    assert gm.word("square").plot(ax=ax) is ax


def test_grid_one_axes_per_word_shared_colorbar(scene, tmp_path: Path) -> None:
    gm, image = scene
    fig = gm.plot_grid(image, ncols=2)
    assert isinstance(fig, Figure)
    panels = [a for a in fig.axes if getattr(a, "_colorbar", None) is None]
    assert [a.get_title() for a in panels] == gm.words == ["a", "red", "square", "ball"]
    assert len(colorbar_axes(fig)) == 1
    path = plot.save_figure(fig, tmp_path / "sub" / "grid.png", dpi=50)
    with PIL.Image.open(path) as im:
        assert im.size[0] > 0


def test_grid_options(scene) -> None:
    gm, image = scene
    fig = plot.plot_grid(
        gm,
        image,
        words=["red", "ball"],
        shared_scale=False,
        normalize=False,
        ncols=3,
        include_image=True,
        title="a red square",
    )
    panels = [a for a in fig.axes if getattr(a, "_colorbar", None) is None]
    assert [a.get_title() for a in panels] == ["image", "red", "ball"]
    assert len(colorbar_axes(fig)) == 2
    # Unnormalised, own scale: the "ball" panel's colour scale tops at its own max (0.1).
    assert panels[2].images[-1].norm.vmax == pytest.approx(float(gm.word("ball").expand().max()))
    per_occ = plot.plot_grid(gm, words=gm.items(per_occurrence=True), colorbar=False)
    assert [a.get_title() for a in per_occ.axes] == ["a (1)", "red", "square", "a (2)", "ball"]
    with pytest.raises(ValueError, match="no words"):
        plot.plot_grid(gm, words=[])


def test_save_helpers(scene, tmp_path: Path) -> None:
    gm, image = scene
    p = plot.save_overlay(gm.word("red"), image, tmp_path / "red.png")
    with PIL.Image.open(p) as im:
        assert im.size == image.size and im.mode == "RGB"
    q = plot.save_heat_image(gm.word("red"), tmp_path / "red_heat.png")
    with PIL.Image.open(q) as im:
        assert im.size == (48, 32)
    assert plot.colorize(np.array([[0.0, 1.0]])).shape == (1, 2, 3)


def test_no_pyplot_global_state() -> None:
    # Plotting must not register figures with pyplot (if pyplot was imported by someone else).
    pyplot = sys.modules.get("matplotlib.pyplot")
    before = len(pyplot.get_fignums()) if pyplot else 0
    wm = WordHeatMap(torch.rand(3, 3), "x", image_size=(6, 6))
    plot.plot_word(wm)
    pyplot = sys.modules.get("matplotlib.pyplot")
    assert (len(pyplot.get_fignums()) if pyplot else 0) == before
