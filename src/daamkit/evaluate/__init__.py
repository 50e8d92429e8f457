"""Evaluation: the DAAM paper's COCO-Gen protocol (mIoU of thresholded word maps against the drawn
objects), its trivial baselines, and interval estimates, for one attribution method or several side by side."""

from daamkit.evaluate.baselines import BASELINES, centre_gaussian, random_map, whole_image
from daamkit.evaluate.metrics import iou, mean_ci
from daamkit.evaluate.protocol import EvalResult, evaluate_world, scene_words, score_run, select_methods

__all__ = [
    "BASELINES",
    "EvalResult",
    "centre_gaussian",
    "evaluate_world",
    "iou",
    "mean_ci",
    "random_map",
    "scene_words",
    "score_run",
    "select_methods",
    "whole_image",
]
