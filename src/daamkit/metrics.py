"""Masks from heat maps and their overlap: the one place that thresholds a map and computes IoU / IoA.

Used by :mod:`daamkit.heatmap` (``WordHeatMap.mask/iou/ioa``), :mod:`daamkit.evaluate` (the COCO-Gen
protocol), :mod:`daamkit.analysis` and the shapes world's segmenter.

Conventions (the DAAM definition, see the README's "How the maps are computed"):

* A map is thresholded on its normalised values (divided by the maximum): ``normalized >= threshold``.
  ``>=`` rather than ``>`` so that ``threshold=1`` still selects the peak; for continuous maps the two
  differ only on exact ties. The paper's tau is 0.4 (:data:`DEFAULT_THRESHOLD`).
* IoU / IoA of two empty masks (empty union, or empty reference area for IoA) is defined as 0.0 rather
  than NaN, so that means over a data set stay finite; a word map that selects nothing scores 0.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "DEFAULT_THRESHOLD",
    "as_bool_mask",
    "check_threshold",
    "mask_ioa",
    "mask_iou",
    "scaled_threshold_mask",
    "threshold_mask",
]

#: tau of the DAAM paper.
DEFAULT_THRESHOLD = 0.4


def _to_numpy(x: Any) -> Any:
    """A torch tensor as a numpy array (on the CPU); anything else unchanged. Without importing torch:
    if it is not loaded, ``x`` cannot be a tensor (the shapes world uses this module with numpy only)."""
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return x


def check_threshold(threshold: float) -> float:
    """``threshold`` as a float, or ``ValueError`` if it lies outside [0, 1]."""
    threshold = float(threshold)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must lie in [0, 1] (it applies to the normalised map), got {threshold}")
    return threshold


def threshold_mask(normalized: Any, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Boolean numpy mask ``normalized >= threshold`` of a map already scaled to [0, 1].

    ``normalized`` is a numpy array or a torch tensor (compared in its own dtype, then moved to the CPU).
    """
    return np.asarray(_to_numpy(normalized >= threshold), dtype=bool)


def scaled_threshold_mask(heat: np.ndarray, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """Divide a non-negative map by its maximum, then :func:`threshold_mask`.

    Unlike ``threshold_mask(WordHeatMap.normalized())``, a map with no positive value selects nothing
    even at ``threshold=0`` (the normalised all-zero map would select everything there). The evaluation
    protocol relies on this for its baseline maps, whose maximum need not be 1; the two agree for every
    ``threshold > 0``.
    """
    top = heat.max()
    if not top > 0:
        return np.zeros_like(heat, bool)
    return threshold_mask(heat / top, threshold)


def as_bool_mask(mask: Any, shape: Sequence[int] | None = None, what: str = "mask",
                 expected: str = "the heat map's image size") -> np.ndarray:
    """Return ``mask`` as a 2-D numpy bool array, checking its shape against ``shape`` = (H, W).

    Accepts numpy arrays and torch tensors; non-bool arrays are accepted only if they hold 0/1 values,
    because silently thresholding e.g. a 0..255 mask or a soft map at some guessed level hides mistakes.
    ``expected`` names what ``shape`` is, for the error message.
    """
    arr = np.asarray(_to_numpy(mask))
    if arr.ndim != 2:
        raise ValueError(f"{what} must be a 2-D (height, width) array, got shape {tuple(arr.shape)}")
    if arr.dtype != np.bool_:
        if arr.size and not np.isin(arr, (0, 1)).all():
            raise ValueError(
                f"{what} must be boolean or hold only 0/1 values (dtype {arr.dtype}); threshold it first"
            )
        arr = arr.astype(bool)
    if shape is not None and tuple(arr.shape) != tuple(shape):
        raise ValueError(
            f"{what} has shape {tuple(arr.shape)}, which differs from {expected} (height, width) = "
            f"{tuple(shape)}"
        )
    return arr


def _pair(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    a = as_bool_mask(a, what="first mask")
    return a, as_bool_mask(b, tuple(a.shape), what="second mask", expected="the first mask's shape")


def mask_iou(a: Any, b: Any) -> float:
    """Intersection over union of two boolean masks of the same shape; 0.0 if both are empty."""
    a, b = _pair(a, b)
    union = int(np.logical_or(a, b).sum())
    if union == 0:
        return 0.0
    return int(np.logical_and(a, b).sum()) / union


def mask_ioa(a: Any, b: Any) -> float:
    """Intersection over the area of ``b``: ``|a ∩ b| / |b|``; 0.0 if ``b`` is empty."""
    a, b = _pair(a, b)
    area = int(b.sum())
    if area == 0:
        return 0.0
    return int(np.logical_and(a, b).sum()) / area
