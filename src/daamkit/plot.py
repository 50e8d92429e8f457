"""Pictures of heat maps: PIL overlays and matplotlib plots.

Kept apart from the data objects in :mod:`daamkit.heatmap` (whose ``overlay``/``plot``/``plot_grid``
methods delegate here) so that computing maps never imports matplotlib.

Only matplotlib's object-oriented API is used: figures are ``matplotlib.figure.Figure`` objects that are
not registered with pyplot, so nothing here selects a backend, opens windows, or leaks figures into
pyplot's global state; it works headless and from threads. Save with :func:`save_figure` (or
``fig.savefig``); to show one in a notebook, simply return/display the Figure.

Heat values are drawn normalised to [0, 1] (the DAAM convention) with a fixed colour scale, so colours
mean the same thing on every panel; pass ``normalize=False`` to see raw attention mass instead.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np
import PIL.Image
import torch
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Colormap, Normalize
from matplotlib.figure import Figure

if TYPE_CHECKING:
    from daamkit.faithfulness import Counterfactual, Curve
    from daamkit.heatmap import GlobalHeatMap, WordHeatMap
    from daamkit.relation import ImageRelationMap, TokenRelationMatrix

__all__ = [
    "colorize",
    "heat_image",
    "plot_counterfactual",
    "plot_deletion_curves",
    "overlay",
    "plot_frame_scores",
    "plot_grid",
    "plot_image_relation",
    "plot_token_relation",
    "plot_word",
    "save_figure",
    "save_heat_image",
    "save_overlay",
]


def _cmap(cmap: str | Colormap) -> Colormap:
    return cmap if isinstance(cmap, Colormap) else matplotlib.colormaps[cmap]


def _heat_array(heat: Any) -> np.ndarray:
    if isinstance(heat, torch.Tensor):
        heat = heat.detach().cpu().float().numpy()
    arr = np.asarray(heat, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"heat must be a 2-D (height, width) array, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("heat holds NaN or inf values")
    return arr


def colorize(heat: Any, cmap: str | Colormap = "jet") -> np.ndarray:
    """(H, W) heat in [0, 1] (values outside are clipped) -> uint8 RGB array (H, W, 3)."""
    h = np.clip(_heat_array(heat), 0.0, 1.0)
    rgb = _cmap(cmap)(h)[..., :3]
    return np.round(rgb * 255).astype(np.uint8)


def heat_image(heat: Any, cmap: str | Colormap = "jet") -> PIL.Image.Image:
    """The heat map alone as a coloured RGB image (no photo underneath)."""
    return PIL.Image.fromarray(colorize(heat, cmap))


def overlay(
    image: PIL.Image.Image,
    heat: Any,
    alpha: float = 0.5,
    cmap: str | Colormap = "jet",
    weighted: bool = False,
) -> PIL.Image.Image:
    """Blend the coloured heat map over ``image``; returns an RGB image of the image's size.

    ``heat`` is (H, W) in [0, 1] (clipped), numpy or torch, and must match the image's (height, width):
    use ``WordHeatMap.overlay`` to expand a grid map first. With ``weighted=False`` every pixel gets
    ``(1 - alpha) * image + alpha * colour`` (the look of the DAAM paper's figures); with
    ``weighted=True`` the opacity is ``alpha * heat``, so cold regions show the untouched image.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    rgb = image.convert("RGB")
    h = np.clip(_heat_array(heat), 0.0, 1.0)
    if h.shape != (rgb.height, rgb.width):
        raise ValueError(
            f"heat has shape {h.shape} but the image is (height, width) = {(rgb.height, rgb.width)}; "
            "expand the map to the image size first (WordHeatMap.overlay does this)"
        )
    base = np.asarray(rgb, dtype=np.float64) / 255.0
    colour = _cmap(cmap)(h)[..., :3]
    a = alpha * h[..., None] if weighted else alpha
    out = (1.0 - a) * base + a * colour
    return PIL.Image.fromarray(np.round(np.clip(out, 0.0, 1.0) * 255).astype(np.uint8))


def _panel_heat(word_map: WordHeatMap, size: tuple[int, int], normalize: bool) -> np.ndarray:
    t = word_map.normalized(size) if normalize else word_map.expand(size)
    return t.cpu().numpy()


def _draw(
    ax: Axes,
    heat: np.ndarray,
    image: PIL.Image.Image | None,
    norm: Normalize,
    cmap: Colormap,
    alpha: float,
    title: str | None,
) -> None:
    if image is not None:
        ax.imshow(np.asarray(image.convert("RGB")))
    # Without a photo the map is drawn opaque: alpha would only wash out the colours.
    ax.imshow(heat, cmap=cmap, norm=norm, alpha=alpha if image is not None else 1.0, interpolation="nearest")
    if title:
        ax.set_title(title)
    ax.set_axis_off()


def _colorbar_mappable(norm: Normalize, cmap: Colormap) -> ScalarMappable:
    # A separate, opaque mappable: a colour bar taken from the blended image would show faded colours.
    return ScalarMappable(norm=norm, cmap=cmap)


def _size_for(word_map: WordHeatMap, image: PIL.Image.Image | None) -> tuple[int, int]:
    return (image.height, image.width) if image is not None else word_map.image_size


def plot_word(
    word_map: WordHeatMap,
    image: PIL.Image.Image | None = None,
    ax: Axes | None = None,
    colorbar: bool = True,
    title: str | None = None,
    cmap: str | Colormap = "jet",
    alpha: float = 0.5,
    normalize: bool = True,
    vmax: float | None = None,
) -> Axes:
    """Draw one word's map (over ``image`` if given) and return the Axes.

    With ``ax=None`` a new pyplot-free Figure is made (``ax.figure``). The map is expanded to the image's
    size if an image is given, else to the map's ``image_size``. ``title`` defaults to the word;
    pass ``""`` for none. With ``normalize=False`` the colour scale runs from 0 to ``vmax`` (default:
    the map's maximum).
    """
    size = _size_for(word_map, image)
    heat = _panel_heat(word_map, size, normalize)
    if ax is None:
        h, w = size
        fig = Figure(figsize=(4.0 * w / h + (0.8 if colorbar else 0.0), 4.0), layout="constrained")
        ax = fig.add_subplot()
    top = 1.0 if normalize else (vmax if vmax is not None else float(heat.max()) or 1.0)
    norm = Normalize(vmin=0.0, vmax=top)
    cm = _cmap(cmap)
    _draw(ax, heat, image, norm, cm, alpha, word_map.word if title is None else title)
    if colorbar:
        ax.figure.colorbar(_colorbar_mappable(norm, cm), ax=ax, fraction=0.046, pad=0.04)
    return ax


def plot_grid(
    global_map: GlobalHeatMap,
    image: PIL.Image.Image | None = None,
    words: Sequence[str | tuple[str, WordHeatMap]] | None = None,
    ncols: int = 4,
    colorbar: bool = True,
    shared_scale: bool = True,
    normalize: bool = True,
    cmap: str | Colormap = "jet",
    alpha: float = 0.5,
    panel_size: float = 2.5,
    include_image: bool = False,
    title: str | None = None,
) -> Figure:
    """A Figure with one panel per word, the word as each panel's title.

    ``words``: word queries (default: every distinct non-punctuation word, ``global_map.words``) or
    ``(label, WordHeatMap)`` pairs such as ``global_map.items(per_occurrence=True)``.
    ``shared_scale=True`` puts all panels on one colour scale with a single colour bar (with
    ``normalize=False`` the scale runs to the largest value of any panel, so panels compare magnitudes);
    ``False`` gives each panel its own bar. ``include_image=True`` adds the plain image as a first panel.
    Unused grid cells are removed, so ``fig.axes`` holds the panels followed by the colour bars.
    Uses constrained layout; save with :func:`save_figure` (tight bounding box) for papers.
    """
    entries: list[tuple[str, WordHeatMap]] = []
    for item in global_map.words if words is None else words:
        if isinstance(item, str):
            entries.append((item, global_map.word(item)))
        else:
            label, wm = item
            entries.append((label, wm))
    if not entries:
        raise ValueError("no words to plot (the prompt has no non-punctuation words?)")
    if include_image and image is None:
        raise ValueError("include_image=True needs an image")
    if ncols < 1:
        raise ValueError(f"ncols must be >= 1, got {ncols}")

    size = (image.height, image.width) if image is not None else global_map.image_size
    heats = [_panel_heat(wm, size, normalize) for _, wm in entries]
    n_panels = len(heats) + (1 if include_image else 0)
    ncols = min(ncols, n_panels)
    nrows = math.ceil(n_panels / ncols)
    h, w = size
    extra_w = 0.8 if colorbar else 0.0
    fig = Figure(
        figsize=(panel_size * ncols * w / h + extra_w, panel_size * nrows + (0.4 if title else 0.0)),
        layout="constrained",
    )
    grid = fig.subplots(nrows, ncols, squeeze=False)
    flat = list(grid.ravel())
    for ax in flat[n_panels:]:
        ax.remove()  # empty cells would only leave blank frames
    panels = flat[:n_panels]
    if include_image:
        assert image is not None
        panels[0].imshow(np.asarray(image.convert("RGB")))
        panels[0].set_title("image")
        panels[0].set_axis_off()
        word_axes = panels[1:]
    else:
        word_axes = panels

    cm = _cmap(cmap)
    if normalize:
        shared_top = 1.0
    else:
        shared_top = max(float(x.max()) for x in heats) or 1.0
    for ax, (label, _), heat in zip(word_axes, entries, heats, strict=True):
        top = shared_top if (normalize or shared_scale) else (float(heat.max()) or 1.0)
        norm = Normalize(vmin=0.0, vmax=top)
        _draw(ax, heat, image, norm, cm, alpha, label)
        if colorbar and not shared_scale:
            fig.colorbar(_colorbar_mappable(norm, cm), ax=ax, fraction=0.046, pad=0.04)
    if colorbar and shared_scale:
        fig.colorbar(
            _colorbar_mappable(Normalize(vmin=0.0, vmax=shared_top), cm), ax=panels, shrink=0.9, pad=0.02
        )
    if title:
        fig.suptitle(title)
    return fig


def plot_frame_scores(
    heat_maps: GlobalHeatMap,
    words: Sequence[str] | None = None,
    ax: Axes | None = None,
    fps: float | None = None,
    title: str | None = None,
) -> Axes:
    """Each word's score over the frames of a video (:meth:`GlobalHeatMap.frame_scores`: the mean of its
    map over the frame), one line per word, x the video frame; returns the Axes.

    ``words`` default to every word of the prompt. With ``fps`` a second x axis on top gives seconds.
    Frames that share a token frame (the VAE's temporal compression) share a value, so the lines are
    drawn as steps. With ``ax=None`` a new pyplot-free Figure is made (``ax.figure``).
    """
    if not heat_maps.is_video:
        raise ValueError("plot_frame_scores needs a video's heat maps; these are an image's (plot_grid draws those)")
    if fps is not None and not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be a positive number of frames per second, got {fps!r}")
    scores = heat_maps.frame_scores(words)
    if not scores:
        raise ValueError("no words to plot (the prompt has no non-punctuation words?)")
    if ax is None:
        fig = Figure(figsize=(6.4, 3.6), layout="constrained")
        ax = fig.add_subplot()
    x = np.arange(heat_maps.num_frames)
    for word, s in scores.items():
        ax.step(x, s.detach().cpu().float().numpy(), where="mid", label=word, linewidth=1.5)
    ax.set_xlabel("video frame")
    ax.set_ylabel("mean attribution over the frame")
    ax.set_xlim(-0.5, heat_maps.num_frames - 0.5)
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(loc="best", fontsize="small", ncols=1 + len(scores) // 8)
    if fps is not None:
        top = ax.secondary_xaxis("top", functions=(lambda f: f / fps, lambda t: t * fps))
        top.set_xlabel("seconds")
    if title:
        ax.set_title(title)
    return ax


def plot_image_relation(
    relation: ImageRelationMap,
    image: PIL.Image.Image | None = None,
    k: int = 0,
    ax: Axes | None = None,
    colorbar: bool = True,
    title: str | None = None,
    cmap: str | Colormap = "jet",
    alpha: float = 0.5,
    normalize: bool = True,
    marker_color: str = "white",
) -> Axes:
    """Where query ``k`` of an image->image relation attends: its map over ``image`` (if given), with
    the query drawn on top (a point as a ringed cross, a region as its outline). Returns the Axes.

    ``title`` defaults to the query's position; pass ``""`` for none. The map is expanded to the
    image's size (else the relation's ``image_size``) and, with ``normalize``, scaled to [0, 1].
    """
    query = relation.queries[k]
    word_map = relation.heat_map(k)
    ax = plot_word(word_map, image, ax=ax, colorbar=colorbar, title=query.label() if title is None else title,
                   cmap=cmap, alpha=alpha, normalize=normalize)
    h, w = _size_for(word_map, image)
    sy, sx = h / relation.image_size[0], w / relation.image_size[1]  # the query is in the relation's pixels
    if query.point is not None:
        y, x = query.point[0] * sy, query.point[1] * sx
        ax.plot([x], [y], marker="o", markersize=11, markerfacecolor="none", markeredgecolor="black",
                markeredgewidth=2.5)
        ax.plot([x], [y], marker="+", markersize=11, color=marker_color, markeredgewidth=1.8)
    elif query.box is not None:
        y0, x0, y1, x1 = query.box
        xs = [x0 * sx - 0.5, x1 * sx - 0.5, x1 * sx - 0.5, x0 * sx - 0.5, x0 * sx - 0.5]
        ys = [y0 * sy - 0.5, y0 * sy - 0.5, y1 * sy - 0.5, y1 * sy - 0.5, y0 * sy - 0.5]
        ax.plot(xs, ys, color="black", linewidth=3.0)
        ax.plot(xs, ys, color=marker_color, linewidth=1.5)
    else:
        assert query.mask is not None
        mh, mw = query.mask.shape
        ax.contour(np.linspace(0, w, mw, endpoint=False) + 0.5 * w / mw, np.linspace(0, h, mh, endpoint=False)
                   + 0.5 * h / mh, query.mask.astype(float), levels=[0.5], colors=[marker_color], linewidths=1.5)
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    return ax


def plot_token_relation(
    relation: TokenRelationMatrix,
    level: str = "word",
    ax: Axes | None = None,
    colorbar: bool = True,
    title: str | None = None,
    cmap: str | Colormap = "viridis",
    include_punctuation: bool = False,
    annotate: bool | None = None,
) -> Axes:
    """A text->text relation as a matrix, rows the attending (query) words, columns the attended
    (key) words. Returns the Axes.

    level: ``"word"`` (the prompt's words, :meth:`TokenRelationMatrix.words`) or ``"token"`` (the
        tokens of those words, each labelled with its token string; start, end and padding tokens left
        out). annotate: write each cell's value (default: when the matrix has at most 12 rows).
    """
    if level == "word":
        labels, m = relation.words(include_punctuation=include_punctuation)
    elif level == "token":
        chosen = [w for w in relation.alignment.words if w.positions and (include_punctuation or not w.is_punctuation)]
        positions = [p for w in chosen for p in w.positions]
        if not positions:
            raise ValueError("the prompt has no tokens to label the matrix with")
        labels = [relation.tokens[p] for p in positions]
        m = relation.matrix.float()[positions][:, positions]
    else:
        raise ValueError(f"level must be 'word' or 'token', got {level!r}")
    arr = m.detach().cpu().numpy()
    n = len(labels)
    if ax is None:
        side = max(3.0, 0.45 * n + 1.5)
        fig = Figure(figsize=(side + (0.8 if colorbar else 0.0), side), layout="constrained")
        ax = fig.add_subplot()
    image = ax.imshow(arr, cmap=_cmap(cmap), vmin=0.0, interpolation="nearest")
    ax.set_xticks(range(n), labels, rotation=90)
    ax.set_yticks(range(n), labels)
    ax.set_xlabel("attended (key)")
    ax.set_ylabel("attending (query)")
    if annotate if annotate is not None else n <= 12:
        top = float(arr.max()) or 1.0
        for r in range(n):
            for c in range(n):
                ax.text(c, r, f"{arr[r, c]:.2f}", ha="center", va="center", fontsize="x-small",
                        color="black" if arr[r, c] > 0.6 * top else "white")
    if colorbar:
        ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    if title:
        ax.set_title(title)
    return ax


def save_figure(fig: Figure, path: str | Path, dpi: int = 150, **kwargs: Any) -> Path:
    """Save ``fig`` (format from the suffix: png, pdf, svg...) with a tight bounding box; makes parent
    folders. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs.setdefault("bbox_inches", "tight")
    fig.savefig(path, dpi=dpi, **kwargs)
    return path


def save_overlay(
    word_map: WordHeatMap,
    image: PIL.Image.Image,
    path: str | Path,
    alpha: float = 0.5,
    cmap: str | Colormap = "jet",
    weighted: bool = False,
) -> Path:
    """Write ``word_map.overlay(image)`` as an image file (format from the suffix). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    word_map.overlay(image, alpha=alpha, cmap=cmap, weighted=weighted).save(path)
    return path


def save_heat_image(
    word_map: WordHeatMap,
    path: str | Path,
    cmap: str | Colormap = "jet",
    size: Sequence[int] | None = None,
) -> Path:
    """Write the normalised map alone as a coloured image of ``size`` (default: the image size)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    heat_image(word_map.normalized(size), cmap).save(path)
    return path


def _quoted(text: str, width: int = 38) -> str:
    return f'"{text}"' if len(text) <= width else f'"{text[: width - 1]}…"'


def plot_counterfactual(cf: Counterfactual, cmap: str | Colormap = "jet") -> Figure:
    """Four panels of a :class:`~daamkit.faithfulness.Counterfactual`: the image, the counterfactual
    (the word removed or swapped, same seed), the per-pixel change, and the word's map over the image
    with the changed region's outline; Spearman's rho and the region AUC in the title."""
    fig = Figure(figsize=(12.0, 3.6), layout="constrained")
    axes = fig.subplots(1, 4)
    axes[0].imshow(cf.image)
    axes[0].set_title(_quoted(cf.prompt), fontsize="small")
    axes[1].imshow(cf.counterfactual)
    axes[1].set_title(_quoted(cf.counterfactual_prompt), fontsize="small")
    top = float(cf.change.max()) or 1.0
    shown = axes[2].imshow(cf.change, cmap="magma", vmin=0.0, vmax=top)
    axes[2].set_title("change (L2 over RGB)", fontsize="small")
    fig.colorbar(shown, ax=axes[2], fraction=0.046, pad=0.02)
    axes[3].imshow(cf.image)
    axes[3].imshow(cf.heat, cmap=_cmap(cmap), vmin=0.0, vmax=1.0, alpha=0.5)
    if cf.region.any() and not cf.region.all():
        axes[3].contour(cf.region.astype(float), levels=[0.5], colors="white", linewidths=1.2)
    axes[3].set_title(f"{cf.method} map of {_quoted(cf.word)}, changed region", fontsize="small")
    for ax in axes:
        ax.set_axis_off()
    rho = "n/a" if not math.isfinite(cf.spearman) else f"{cf.spearman:.3f}"
    auc = "n/a" if not math.isfinite(cf.auc) else f"{cf.auc:.3f}"
    fig.suptitle(f"Spearman rho(map, change) = {rho}    AUC(map -> changed region) = {auc}", fontsize="medium")
    return fig


def plot_deletion_curves(curves: Curve | Sequence[Curve]) -> Figure:
    """Deletion / insertion curves (:class:`~daamkit.faithfulness.Curve`): over tau, the change inside
    the edited region relative to outside it (left) and the mean change inside it (right), for the map's
    region (solid) and for random regions of the same shape and area (dashed); one colour per curve."""
    curves = [curves] if not isinstance(curves, Sequence) else list(curves)
    if not curves:
        raise ValueError("no curves to plot")
    fig = Figure(figsize=(9.6, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    colours = matplotlib.colormaps["tab10"]
    for i, c in enumerate(curves):
        colour = colours(i % 10)
        name = f"{c.word} ({c.kind}, x{c.scale:g})"
        left.plot(c.taus, c.map_effect, "o-", color=colour, label=f"{name}: map")
        left.plot(c.taus, c.random_effect, "s--", color=colour, alpha=0.7, label=f"{name}: random")
        right.plot(c.taus, c.map_inside, "o-", color=colour)
        right.plot(c.taus, c.random_inside, "s--", color=colour, alpha=0.7)
    left.axhline(1.0, color="grey", linewidth=0.8)
    left.set_ylabel("change inside / outside the region")
    right.set_ylabel("mean change inside the region")
    for ax in (left, right):
        ax.set_xlabel("tau (region: map >= tau)")
        ax.grid(True, alpha=0.3)
        ax.set_ylim(bottom=0)
    left.legend(loc="best", fontsize="small")
    return fig
