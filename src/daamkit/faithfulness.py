"""Causal faithfulness of word maps: did the word act where its map says?

A map's overlap with an object (mIoU) says where the map lies, not whether the word acted there. The
checks here follow the attribution literature: a *counterfactual* generation without the word (or with
another word) at the same seed, whose pixel change the map should predict (rank correlation, ROC AUC of
the map as a score for the changed region), and *deletion / insertion curves* (Petsiuk et al. 2018's
RISE curves; prompt-to-prompt's attention reweighting as the perturbation): the word's attention is
deleted (or amplified) inside the map's region at each threshold, and the image should change inside
that region more than outside it, and more than when a random region of the same shape is edited.

This module holds the measures (pure numpy functions) and the result types; the runs that generate the
images are in :mod:`daamkit.jobs.faithfulness`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from daamkit.errors import InputError

__all__ = [
    "Counterfactual",
    "Curve",
    "area_under",
    "change_map",
    "change_region",
    "otsu_threshold",
    "rank_correlation",
    "rankdata",
    "region_auc",
    "rolled_region",
]


def _image(x: Any, what: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim not in (2, 3):
        raise InputError(f"{what} must be an image (H, W) or (H, W, C), got shape {a.shape}")
    if a.dtype == np.uint8:
        return a.astype(np.float64) / 255.0
    if not np.issubdtype(a.dtype, np.number) or a.dtype == bool:
        raise InputError(f"{what} must be a uint8 or float image, got {a.dtype}")
    return a.astype(np.float64)


def change_map(a: Any, b: Any) -> np.ndarray:
    """Per-pixel L2 norm of ``b - a`` over the channels, (H, W) float64.

    uint8 images are taken as 0..255 and scaled to [0, 1] first, float images as they are (diffusers'
    ``output_type="np"`` gives [0, 1]); so a change of 1.0 is one full channel's range. PIL images work.
    """
    x, y = _image(a, "the first image"), _image(b, "the second image")
    if x.shape != y.shape:
        raise InputError(f"the two images differ in shape: {x.shape} and {y.shape}")
    d = y - x
    return np.sqrt((d * d).sum(axis=-1)) if d.ndim == 3 else np.abs(d)


def otsu_threshold(values: Any, bins: int = 256) -> float:
    """Otsu's threshold of ``values`` (implemented here in numpy: a histogram of ``bins`` bins over
    [min, max], the cut that maximises the between-class variance). Values above it form the upper
    class. A constant input returns its value (nothing lies above it)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise InputError("Otsu's threshold needs at least one finite value")
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return hi
    counts, edges = np.histogram(v, bins=bins, range=(lo, hi))
    p = counts / counts.sum()
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(p)  # weight of the class at or below each bin
    mu = np.cumsum(p * centres)
    w1 = 1.0 - w0
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * w0 - mu) ** 2 / (w0 * w1)
    between = np.where((w0 > 0) & (w1 > 0), between, -1.0)
    k = int(np.argmax(between))
    return float(edges[k + 1])


def change_region(change: Any) -> np.ndarray:
    """Where the image changed: ``change`` above its Otsu threshold (:func:`otsu_threshold`, numpy, no
    image library), (H, W) bool. A change map that is constant (e.g. all zero) gives an empty region."""
    c = np.asarray(change, dtype=np.float64)
    if c.ndim != 2:
        raise InputError(f"a change map is (H, W), got shape {c.shape}")
    t = otsu_threshold(c)
    return c > t


def rankdata(x: Any) -> np.ndarray:
    """Ranks 1..n of the values of ``x`` (flattened), ties given their average rank."""
    v = np.asarray(x, dtype=np.float64).ravel()
    order = np.argsort(v, kind="mergesort")
    s = v[order]
    # the first index of each run of equal values, and the run each sorted value is in
    starts = np.flatnonzero(np.r_[True, s[1:] != s[:-1]])
    ends = np.r_[starts[1:], s.size]
    avg = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 .. ends
    runs = np.repeat(np.arange(starts.size), ends - starts)
    ranks = np.empty(v.size)
    ranks[order] = avg[runs]
    return ranks


def _same_shape(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape != b.shape:
        raise InputError(f"{what}: shapes differ, {a.shape} and {b.shape}: resize the map to the image first")


def rank_correlation(heat: Any, change: Any) -> float:
    """Spearman's rank correlation of a map and a change map over their pixels (ties: average ranks,
    i.e. Pearson's correlation of the ranks). NaN when either is constant."""
    a, b = np.asarray(heat, dtype=np.float64), np.asarray(change, dtype=np.float64)
    _same_shape(a, b, "rank correlation")
    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum()) * float((rb * rb).sum()))
    return float((ra * rb).sum() / denom) if denom > 0 else math.nan


def region_auc(heat: Any, region: Any) -> float:
    """ROC AUC of the map as a score for the region's pixels: the probability that a pixel inside
    scores higher than one outside, ties counting half (the Mann-Whitney U statistic over both class
    sizes, with average ranks). NaN when the region is empty or the whole image."""
    a = np.asarray(heat, dtype=np.float64)
    r = np.asarray(region, dtype=bool)
    _same_shape(a, r, "region AUC")
    n_pos = int(r.sum())
    n_neg = r.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    ranks = rankdata(a)
    u = float(ranks[r.ravel()].sum()) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def rolled_region(region: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, tuple[int, int]]:
    """A random region of the same shape and area: ``region`` rolled by a random (dy, dx), wrapping
    around the image's edges (``np.roll``). Returns the region and the offset."""
    h, w = region.shape
    dy, dx = int(rng.integers(0, h)), int(rng.integers(0, w))
    return np.roll(region, (dy, dx), axis=(0, 1)), (dy, dx)


def area_under(x: Sequence[float], y: Sequence[float]) -> float:
    """Trapezoidal area under y(x) over the finite points (NaN when fewer than two)."""
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(xs) & np.isfinite(ys)
    if ok.sum() < 2:
        return math.nan
    xs, ys = xs[ok], ys[ok]
    return float(np.sum((xs[1:] - xs[:-1]) * (ys[1:] + ys[:-1]) / 2.0))


def inside_outside(change: np.ndarray, region: np.ndarray) -> tuple[float, float, float]:
    """Mean change inside and outside ``region`` and their ratio (NaN where a side is empty)."""
    inside = float(change[region].mean()) if region.any() else math.nan
    outside = float(change[~region].mean()) if (~region).any() else math.nan
    ratio = inside / outside if outside > 0 else math.nan
    return inside, outside, ratio


def _num(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


@dataclass
class Counterfactual:
    """A traced generation and its counterfactual (the word removed or swapped), same seed.

    heat: the word's map (of ``method``) at image size, normalised to [0, 1] by its maximum; change: the
    per-pixel change (:func:`change_map`); region: where the image changed (:func:`change_region`);
    spearman: :func:`rank_correlation` of heat and change; auc: :func:`region_auc` of heat for region.
    """

    prompt: str
    counterfactual_prompt: str
    word: str
    swap: str | None
    seed: int
    method: str
    image: np.ndarray
    counterfactual: np.ndarray
    heat: np.ndarray
    change: np.ndarray
    region: np.ndarray
    spearman: float
    auc: float

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": self.prompt, "counterfactual_prompt": self.counterfactual_prompt, "word": self.word,
            "swap": self.swap, "seed": self.seed, "method": self.method, "spearman": _num(self.spearman),
            "auc": _num(self.auc), "changed_fraction": float(self.region.mean()),
            "mean_change": float(self.change.mean()),
        }


@dataclass
class Curve:
    """A deletion (``scale < 1``) or insertion (``scale > 1``) curve of one word's map.

    For each tau, the word's attention was scaled by ``scale`` inside the map's region ``map >= tau``
    (``area``: its fraction of the image) and, as a control, inside ``random_regions`` random regions of
    the same shape and area (:func:`rolled_region`). ``*_inside`` / ``*_outside`` are the mean change
    (:func:`change_map` against the unedited image) inside / outside the edited region, ``*_effect``
    their ratio (random: means over the random regions); ``*_judge`` the judge's verdicts (the fraction
    of random regions judged true) when a judge was given. ``auc_*``: areas under the effect curves
    over tau (trapezoids).
    """

    word: str
    scale: float
    seed: int
    taus: list[float]
    area: list[float] = field(default_factory=list)
    map_inside: list[float] = field(default_factory=list)
    map_outside: list[float] = field(default_factory=list)
    map_effect: list[float] = field(default_factory=list)
    random_inside: list[float] = field(default_factory=list)
    random_outside: list[float] = field(default_factory=list)
    random_effect: list[float] = field(default_factory=list)
    map_judge: list[bool] | None = None
    random_judge: list[float] | None = None
    offsets: list[list[tuple[int, int]]] = field(default_factory=list)
    image: np.ndarray | None = None  # the unedited generation
    edited: list[np.ndarray] = field(default_factory=list)  # the map-region edit's image per tau

    @property
    def kind(self) -> str:
        return "deletion" if self.scale < 1 else "insertion"

    @property
    def auc_map(self) -> float:
        return area_under(self.taus, self.map_effect)

    @property
    def auc_random(self) -> float:
        return area_under(self.taus, self.random_effect)

    def to_json(self) -> dict[str, Any]:
        def nums(xs: Sequence[float]) -> list[float | None]:
            return [_num(x) for x in xs]

        return {
            "word": self.word, "kind": self.kind, "scale": self.scale, "seed": self.seed, "taus": list(self.taus),
            "area": nums(self.area), "map": {"inside": nums(self.map_inside), "outside": nums(self.map_outside),
                                             "effect": nums(self.map_effect), "judge": self.map_judge},
            "random": {"inside": nums(self.random_inside), "outside": nums(self.random_outside),
                       "effect": nums(self.random_effect), "judge": self.random_judge,
                       "offsets": [[list(o) for o in offs] for offs in self.offsets]},
            "auc_map": _num(self.auc_map), "auc_random": _num(self.auc_random),
        }
