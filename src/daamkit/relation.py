"""Relation maps: what attends to what inside the image or inside the prompt, beside the word maps.

* ``"image->image"`` (:class:`ImageRelationMap`): where a chosen point or region of the image
  attends, from the self-attention (UNets) or joint attention (SD3, Flux, ...) of the chosen queries
  over the image keys, aggregated over steps and layers as DAAM aggregates word maps.
* ``"text->text"`` (:class:`TokenRelationMatrix`): which prompt tokens the prompt's tokens attend to,
  from the text queries over the text keys of joint-attention transformers, with the words that
  label the rows and columns.

The queries of an image relation (:class:`RelationQuery`) are given in pixels of the generated image
before the pipeline runs; the methods that record them live in :mod:`daamkit.methods.relations`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from daamkit.errors import InputError

if TYPE_CHECKING:
    import PIL.Image
    from matplotlib.axes import Axes

    from daamkit.heatmap import WordHeatMap
    from daamkit.tokens import TokenAlignment

#: The relation kinds ``trace(relations=[...])`` and ``tc.relation(i, kind)`` take.
RELATIONS = ("image->image", "text->text")


def check_kind(kind: str) -> str:
    if kind not in RELATIONS:
        raise InputError(f"unknown relation {kind!r}: use one of {', '.join(map(repr, RELATIONS))}")
    return kind


@dataclass(frozen=True, eq=False)
class RelationQuery:
    """One query of an image relation: a ``point`` (y, x) in pixels, a ``mask`` (H, W) bool array
    over the generated image, or a ``box`` (y0, x0, y1, x1) in pixels (the half-open rectangle
    y0 <= y < y1, x0 <= x < x1), which need not know the image size in advance. A region (mask or box)
    averages its cells' rows, weighted by the area it covers."""

    point: tuple[float, float] | None = None
    mask: np.ndarray | None = None
    box: tuple[float, float, float, float] | None = None

    def __post_init__(self) -> None:
        if sum(v is not None for v in (self.point, self.mask, self.box)) != 1:
            raise InputError("a relation query is exactly one of a point, a mask or a box")
        if self.box is not None:
            y0, x0, y1, x1 = (float(v) for v in self.box)
            if not all(np.isfinite(v) for v in (y0, x0, y1, x1)):
                raise InputError(f"the query box {self.box} must hold finite pixel coordinates")
            if not (y0 < y1 and x0 < x1):
                raise InputError(f"the query box (x0={x0:g}, y0={y0:g}, x1={x1:g}, y1={y1:g}) is empty: "
                                 "give x0 < x1 and y0 < y1 (pixels)")

    @classmethod
    def parse(cls, value: Any) -> RelationQuery:
        if isinstance(value, RelationQuery):
            return value
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        if isinstance(value, np.ndarray) and value.ndim == 2:
            if value.dtype != bool and not np.isin(value, (0, 1)).all():
                raise InputError("a region query must be a boolean (or 0/1) (height, width) mask")
            mask = value.astype(bool)
            if not mask.any():
                raise InputError("the region query's mask is empty: mark at least one pixel")
            return cls(mask=mask)
        try:
            y, x = (float(v) for v in value)
        except (TypeError, ValueError):
            raise InputError(
                f"a relation query is a point (y, x) in pixels or a (height, width) boolean mask, got {value!r}"
            ) from None
        if not (np.isfinite(y) and np.isfinite(x)):
            raise InputError(f"the query point (y, x) = {(y, x)} must be finite")
        return cls(point=(y, x))

    def label(self) -> str:
        if self.point is not None:
            return f"(y={self.point[0]:g}, x={self.point[1]:g})"
        if self.box is not None:
            y0, x0, y1, x1 = self.box
            return f"box x {x0:g}..{x1:g}, y {y0:g}..{y1:g}"
        assert self.mask is not None
        return f"region of {int(self.mask.sum())} px"

    def check(self, size: tuple[int, int]) -> None:
        """Raise :class:`InputError` if the query does not lie on an image of ``size`` (H, W) pixels."""
        h, w = size
        if self.point is not None:
            y, x = self.point
            if not (0 <= y < h and 0 <= x < w):
                raise InputError(
                    f"the query point (y, x) = ({y:g}, {x:g}) lies outside the {h}x{w} image: "
                    f"use 0 <= y < {h} and 0 <= x < {w} (pixels)"
                )
        elif self.box is not None:
            y0, x0, y1, x1 = self.box
            if not (0 <= y0 and 0 <= x0 and y1 <= h and x1 <= w):
                raise InputError(
                    f"the query box (x0={x0:g}, y0={y0:g}, x1={x1:g}, y1={y1:g}) reaches outside the {h}x{w} "
                    f"image: use 0 <= x0 < x1 <= {w} and 0 <= y0 < y1 <= {h} (pixels)"
                )
        elif self.mask is not None and self.mask.shape != (h, w):
            raise InputError(f"the region mask is {self.mask.shape[0]}x{self.mask.shape[1]} but the image is "
                             f"{h}x{w} (height x width): give a mask of the image's size")

    def region(self, size: tuple[int, int]) -> np.ndarray | None:
        """The (H, W) bool mask of a region query on an image of ``size`` (None for a point); a box
        covers the pixels its rectangle overlaps."""
        if self.box is not None:
            y0, x0, y1, x1 = self.box
            mask = np.zeros(size, bool)
            mask[int(np.floor(y0)) : int(np.ceil(y1)), int(np.floor(x0)) : int(np.ceil(x1))] = True
            return mask
        return self.mask

    def weights(self, size: tuple[int, int], grid: tuple[int, int]) -> torch.Tensor:
        """The query's weight on each cell of a (gh, gw) ``grid`` over an image of ``size`` pixels:
        (gh * gw,) summing to 1; a point is the cell holding it, a region the area it covers."""
        (h, w), (gh, gw) = size, grid
        out = torch.zeros(gh * gw)
        if self.point is not None:
            y, x = self.point
            out[min(gh - 1, int(y * gh / h)) * gw + min(gw - 1, int(x * gw / w))] = 1.0
            return out
        region = self.region(size)
        assert region is not None
        m = torch.from_numpy(region.astype(np.float32))[None, None]
        area = F.adaptive_avg_pool2d(m, (gh, gw)).flatten()
        return area / area.sum()


def parse_queries(query: Any) -> list[RelationQuery]:
    """``query`` as a list: one point (y, x), one mask, or a list of them."""
    if query is None:
        raise InputError("an image->image relation needs query=...: a point (y, x) in pixels or a boolean mask")
    if isinstance(query, (RelationQuery, np.ndarray, torch.Tensor)):
        return [RelationQuery.parse(query)]
    if isinstance(query, Sequence) and not isinstance(query, str):
        items = list(query)
        if not items:
            raise InputError("query is an empty list: give a point (y, x), a mask, or a list of them")
        if all(isinstance(v, (int, float, np.integer, np.floating)) for v in items):
            return [RelationQuery.parse(items)]
        return [RelationQuery.parse(v) for v in items]
    return [RelationQuery.parse(query)]


@dataclass
class ImageRelationMap:
    """Where the queries attend in the image: ``maps`` (queries, gh, gw) on the aggregation grid of an
    image of ``image_size`` (H, W) pixels, aggregated as DAAM's word maps (sum over steps of the mean
    over layers of the head mean, each call upsampled to the grid)."""

    maps: torch.Tensor
    queries: list[RelationQuery]
    image_size: tuple[int, int]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def map(self) -> torch.Tensor:
        """The (gh, gw) map of the only query (``maps[k]`` holds query ``k`` of several)."""
        if self.maps.shape[0] != 1:
            raise InputError(f"this relation has {self.maps.shape[0]} queries: read maps[k] or heat_map(k)")
        return self.maps[0]

    def heat_map(self, k: int = 0) -> WordHeatMap:
        """Query ``k``'s map as a :class:`~daamkit.heatmap.WordHeatMap` (``expand``, ``normalized``,
        ``overlay``, ``mask`` ...)."""
        from daamkit.heatmap import WordHeatMap

        if not 0 <= k < self.maps.shape[0]:
            raise IndexError(f"query {k} out of range: the relation has {self.maps.shape[0]} queries")
        return WordHeatMap(self.maps[k], self.queries[k].label(), image_size=self.image_size)

    def plot(self, image: PIL.Image.Image | None = None, k: int = 0, **kwargs: Any) -> Axes:
        """:func:`daamkit.plot.plot_image_relation` of query ``k``."""
        from daamkit.plot import plot_image_relation

        return plot_image_relation(self, image, k=k, **kwargs)


@dataclass
class TokenRelationMatrix:
    """Token-to-token attention of the prompt: ``matrix[a, b]`` is how much text token ``a`` (query)
    attends to text token ``b`` (key), aggregated like the word maps (sum over steps of the mean over
    layers of the head mean). ``alignment`` names the tokens and the prompt's words."""

    matrix: torch.Tensor  # (T, T)
    alignment: TokenAlignment
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens(self) -> tuple[str, ...]:
        return self.alignment.tokens

    def words(self, include_punctuation: bool = False) -> tuple[list[str], torch.Tensor]:
        """(labels, W x W matrix) over the prompt's words: row word ``a``, column word ``b`` holds the
        mean over ``a``'s tokens of the attention they give all of ``b``'s tokens (so a row's sum is
        the share of attention the word gives the prompt's words). Repeated words are labelled
        ``word#2`` ...; words cut off by the tokenizer are left out."""
        chosen = [w for w in self.alignment.words if w.positions and (include_punctuation or not w.is_punctuation)]
        if not chosen:
            raise InputError("the prompt has no words to label the matrix with")
        labels = [w.text if w.occurrence == 0 else f"{w.text}#{w.occurrence + 1}" for w in chosen]
        m = self.matrix.float()
        cols = torch.stack([m[:, list(w.positions)].sum(1) for w in chosen], dim=1)  # (T, W)
        out = torch.stack([cols[list(w.positions)].mean(0) for w in chosen])  # (W, W)
        return labels, out

    def plot(self, level: str = "word", **kwargs: Any) -> Axes:
        """:func:`daamkit.plot.plot_token_relation`."""
        from daamkit.plot import plot_token_relation

        return plot_token_relation(self, level=level, **kwargs)
