"""Faithfulness runs: counterfactual generations and deletion / insertion curves of a word's map (the
measures and result types are in :mod:`daamkit.faithfulness`).

```python
from daamkit.jobs.faithfulness import counterfactual, deletion_curve

cf = counterfactual(pipe, "a red dog on a bench", "dog", seed=0, num_inference_steps=20)
cf.spearman, cf.auc                      # does the map predict where removing "dog" changes the image?
curve = deletion_curve(pipe, "a red dog on a bench", "dog", cf.heat, seed=0, num_inference_steps=20)
curve.map_effect, curve.random_effect   # change inside / outside the edited region, map vs random
```

Every generation of one run uses the same seed (a fresh ``torch.Generator`` on the pipeline's device),
so the only difference between two images is the prompt (counterfactual) or the attention edit (curves).
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from daamkit.errors import InputError
from daamkit.faithfulness import (
    Counterfactual,
    Curve,
    change_map,
    change_region,
    inside_outside,
    rank_correlation,
    region_auc,
    rolled_region,
)
from daamkit.intervene import AttentionEdit, intervene
from daamkit.metrics import check_threshold, scaled_threshold_mask
from daamkit.tokens import split_words

__all__ = ["METHODS", "counterfactual", "deletion_curve", "edit_prompt"]

#: Attribution methods a counterfactual can map the word with, and the trace options that record them.
METHODS: dict[str, Callable[[str], dict[str, Any]]] = {
    "daam": lambda word: {},
    "refined": lambda word: {"refine": True},
    "ovam": lambda word: {"open_vocabulary": [word]},
}


def _word_pattern(word: str) -> re.Pattern[str]:
    units = split_words(word)
    if not units:
        raise InputError(f"the word must be a word of the prompt, got {word!r}")
    # whole words only, case-insensitively, whatever whitespace lies between a multi-word query's words
    body = r"\s*".join(re.escape(u) for u in units)
    return re.compile(rf"(?<![^\W_]){body}(?![^\W_])", re.IGNORECASE)


def edit_prompt(prompt: str, word: str, swap: str | None = None) -> str:
    """``prompt`` with every occurrence of ``word`` (whole words, case-insensitive) removed, or replaced by
    ``swap``; spaces are tidied. ``InputError`` when the word is not in the prompt."""
    pattern = _word_pattern(word)
    if not pattern.search(prompt):
        raise InputError(f"{word!r} is not a word of the prompt {prompt!r}; its words: {', '.join(split_words(prompt))}")
    if swap is not None and not swap.strip():
        raise InputError("the swap word is empty: give the word that replaces it, or no swap to remove it")
    out = pattern.sub(swap.strip() if swap is not None else "", prompt)
    out = re.sub(r"\s+([,.;:!?])", r"\1", re.sub(r"\s{2,}", " ", out)).strip()
    if not out:
        raise InputError(f"removing {word!r} leaves an empty prompt: use a swap word instead")
    return out


def _generate(pipe: Any, prompt: str, seed: int, call_kwargs: dict[str, Any]) -> np.ndarray:
    """One image (uint8 (H, W, 3)) of ``prompt`` at ``seed``."""
    device = getattr(pipe, "device", None)
    gen = torch.Generator(device=device if isinstance(device, torch.device) and device.type != "meta" else "cpu")
    out = pipe(prompt, generator=gen.manual_seed(int(seed)), **call_kwargs)
    img = out.images[0] if hasattr(out, "images") else out[0][0]
    a = np.asarray(img)
    if a.dtype != np.uint8:
        a = (np.clip(a, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return a


def _check_call_kwargs(call_kwargs: dict[str, Any]) -> None:
    for k in ("prompt", "generator", "num_images_per_prompt", "output_type"):
        if k in call_kwargs:
            raise InputError(f"{k}= is set by the faithfulness run (one image, seeded, as uint8); leave it out")


def counterfactual(
    pipe: Any,
    prompt: str,
    word: str,
    *,
    swap: str | None = None,
    seed: int,
    method: str = "daam",
    occurrence: int | None = None,
    **call_kwargs: Any,
) -> Counterfactual:
    """Generate ``prompt`` traced, then ``prompt`` without ``word`` (or with ``swap`` in its place), both
    at ``seed``; compare where the image changed with the word's map (of ``method``: ``"daam"``,
    ``"refined"`` or ``"ovam"``). ``call_kwargs`` go to both pipeline calls."""
    from daamkit import trace

    if method not in METHODS:
        raise InputError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    _check_call_kwargs(call_kwargs)
    other = edit_prompt(prompt, word, swap)
    with trace(pipe, **METHODS[method](word)) as tc:
        image = _generate(pipe, prompt, seed, call_kwargs)
        maps = tc.heat_maps(0, method=method)
    size = image.shape[:2]
    heat = maps.word(word, occurrence=occurrence).normalized(size=size).float().cpu().numpy().astype(np.float64)
    changed = _generate(pipe, other, seed, call_kwargs)
    change = change_map(image, changed)
    region = change_region(change)
    return Counterfactual(
        prompt=prompt, counterfactual_prompt=other, word=word, swap=swap, seed=int(seed), method=method,
        image=image, counterfactual=changed, heat=heat, change=change, region=region,
        spearman=rank_correlation(heat, change), auc=region_auc(heat, region),
    )


def _heat_array(heat_map: Any, size: tuple[int, int]) -> np.ndarray:
    """A (H, W) map at image size from a WordHeatMap or an array (resized bilinearly if need be)."""
    if hasattr(heat_map, "normalized"):
        return heat_map.normalized(size=size).float().cpu().numpy().astype(np.float64)
    a = np.asarray(heat_map, dtype=np.float64)
    if a.ndim != 2:
        raise InputError(f"heat_map must be a word's map or an (H, W) array, got shape {a.shape}")
    if a.shape != size:
        t = torch.from_numpy(a)[None, None]
        a = torch.nn.functional.interpolate(t, size=size, mode="bilinear", align_corners=False)[0, 0].numpy()
    return a


def deletion_curve(
    pipe: Any,
    prompt: str,
    word: str,
    heat_map: Any,
    *,
    taus: Sequence[float] = (0.2, 0.4, 0.6, 0.8),
    scale: float = 0.0,
    seed: int,
    random_regions: int = 1,
    rng_seed: int = 0,
    judge: Callable[[np.ndarray], bool] | None = None,
    occurrence: int | None = None,
    **call_kwargs: Any,
) -> Curve:
    """Scale ``word``'s attention by ``scale`` (0: deletion; > 1: the insertion variant) inside the map's
    region at each tau and inside random regions of equal shape and area; measure the change.

    heat_map: the word's map (a WordHeatMap, or an (H, W) array); the region at tau is the map divided by
    its maximum, ``>= tau``, as DAAM thresholds it. The random regions are the map's region rolled by a
    random offset, wrapping around the image (same shape, same area), drawn from ``rng_seed``. ``judge``
    (e.g. "is the object still there") is asked of every edited image. Every image is generated at
    ``seed``: 1 unedited + len(taus) x (1 + random_regions) calls.
    """
    _check_call_kwargs(call_kwargs)
    try:
        taus = [check_threshold(t) for t in taus]
    except ValueError as e:
        raise InputError(f"taus: {e}") from None
    if not taus:
        raise InputError("give at least one tau")
    if int(random_regions) < 0:
        raise InputError(f"random_regions must be >= 0, got {random_regions}")
    AttentionEdit(word, scale)  # the scale's and word's own checks, before anything runs
    edit_prompt(prompt, word)  # the word must be in the prompt
    base = _generate(pipe, prompt, seed, call_kwargs)
    size = base.shape[:2]
    heat = _heat_array(heat_map, size)
    rng = np.random.default_rng(rng_seed)
    curve = Curve(word=word, scale=float(scale), seed=int(seed), taus=list(taus), image=base)
    if judge is not None:
        curve.map_judge, curve.random_judge = [], []

    def edited(region: np.ndarray) -> np.ndarray:
        with intervene(pipe, prompt, [AttentionEdit(word, scale, region=region, occurrence=occurrence)]):
            return _generate(pipe, prompt, seed, call_kwargs)

    for tau in taus:
        region = scaled_threshold_mask(heat, tau)
        curve.area.append(float(region.mean()))
        if not region.any():
            for xs in (curve.map_inside, curve.map_outside, curve.map_effect, curve.random_inside,
                       curve.random_outside, curve.random_effect):
                xs.append(math.nan)
            curve.offsets.append([])
            curve.edited.append(base)
            if judge is not None:
                curve.map_judge.append(bool(judge(base)))
                curve.random_judge.append(math.nan)
            continue
        image = edited(region)
        curve.edited.append(image)
        inside, outside, ratio = inside_outside(change_map(base, image), region)
        curve.map_inside.append(inside)
        curve.map_outside.append(outside)
        curve.map_effect.append(ratio)
        if judge is not None:
            curve.map_judge.append(bool(judge(image)))
        stats, verdicts, offsets = [], [], []
        for _ in range(int(random_regions)):
            rolled, offset = rolled_region(region, rng)
            other = edited(rolled)
            stats.append(inside_outside(change_map(base, other), rolled))
            offsets.append(offset)
            if judge is not None:
                verdicts.append(bool(judge(other)))
        curve.offsets.append(offsets)
        with warnings.catch_warnings():  # a column of NaN (a region that covers everything) stays NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            means = np.nanmean(np.array(stats, dtype=np.float64), axis=0) if stats else [math.nan] * 3
        curve.random_inside.append(float(means[0]))
        curve.random_outside.append(float(means[1]))
        curve.random_effect.append(float(means[2]))
        if judge is not None:
            curve.random_judge.append(float(np.mean(verdicts)) if verdicts else math.nan)
    return curve
