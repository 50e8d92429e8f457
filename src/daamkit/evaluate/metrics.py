"""Scores and their uncertainty: the evaluation's names for the core functions.

The computations live in :mod:`daamkit.metrics` (masks, IoU) and :mod:`daamkit.stats` (intervals);
``iou`` and ``mean_ci`` are kept as the names ``daamkit.evaluate`` has always exported.
"""

from __future__ import annotations

from daamkit.metrics import mask_iou as iou
from daamkit.stats import bootstrap_mean_ci as mean_ci

__all__ = ["iou", "mean_ci"]
