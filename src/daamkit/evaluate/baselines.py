"""Trivial maps a word map must beat (the DAAM paper compares against such baselines).

Each returns an (H, W) float map in [0, 1] that is thresholded exactly like a word map.
"""

from __future__ import annotations

import numpy as np


def whole_image(size: tuple[int, int], rng: np.random.Generator | None = None) -> np.ndarray:
    """Everything is the object: the IoU is the object's share of the image."""
    return np.ones(size, np.float32)


def centre_gaussian(size: tuple[int, int], rng: np.random.Generator | None = None,
                    sigma: float = 0.25) -> np.ndarray:
    """A Gaussian bump at the centre, ``sigma`` as a fraction of each side: objects are often central."""
    h, w = size
    y = (np.arange(h) + 0.5) / h - 0.5
    x = (np.arange(w) + 0.5) / w - 0.5
    g = np.exp(-(y[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma**2))
    return (g / g.max()).astype(np.float32)


def random_map(size: tuple[int, int], rng: np.random.Generator | None = None, cells: int = 8) -> np.ndarray:
    """Smooth random blobs: uniform noise on a coarse ``cells`` grid, bicubically upsampled, so its
    blobs have the size of a DAAM map's, not of single pixels."""
    import torch
    import torch.nn.functional as F

    rng = rng or np.random.default_rng(0)
    coarse = torch.from_numpy(rng.random((1, 1, cells, cells)).astype(np.float32))
    up = F.interpolate(coarse, size=size, mode="bicubic", align_corners=False)[0, 0].clamp(min=0).numpy()
    return up / up.max()


BASELINES = {"whole image": whole_image, "centre gaussian": centre_gaussian, "random map": random_map}
