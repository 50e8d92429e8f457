"""Synthetic video heat maps and frames for tests: no pipeline, every value known.

:func:`video_heat_maps` builds a (T, F, h, w) :class:`GlobalHeatMap` whose token frames differ in a way a
test can read back: in token frame ``f`` every word's map is ``f + 1`` on one grid cell,
:func:`hot_cell` ``(f)`` on the diagonal, and 0 elsewhere, so the plane that lies on a video frame is
visible in the pixels of its overlay. The cells keep off the border, so that bicubic expansion gives
every plane's peak the same shape.
"""

from __future__ import annotations

import numpy as np
import torch

from daamkit.frames import TimeAxis
from daamkit.heatmap import GlobalHeatMap
from daamkit.tokens import TokenAlignment, Word

PROMPT = "a cat jumps over a dog"


def alignment(prompt: str = PROMPT, max_length: int = 12) -> TokenAlignment:
    """One token per word: BOS, the words, EOS and padding up to ``max_length``."""
    texts = prompt.split()
    if len(texts) + 2 > max_length:
        raise ValueError(f"{len(texts)} words do not fit {max_length} tokens")
    tokens = ["<|startoftext|>", *(f"{t}</w>" for t in texts), "<|endoftext|>"]
    tokens += ["<|endoftext|>"] * (max_length - len(tokens))
    seen: dict[str, int] = {}
    words = []
    for i, t in enumerate(texts):
        words.append(Word(t, i, seen.get(t, 0), (i + 1,), False, False))
        seen[t] = seen.get(t, 0) + 1
    return TokenAlignment(tuple(tokens), tuple(words), max_length, prompt)


def hot_cell(f: int, grid: tuple[int, int] = (8, 8)) -> tuple[int, int]:
    """The grid cell that is hot in token frame ``f`` (needs a grid of at least 4 x 4)."""
    n = min(grid) - 3
    return 1 + f % n, 1 + f % n


def video_heat_maps(time: TimeAxis | None = None, grid: tuple[int, int] = (8, 8),
                    image_size: tuple[int, int] = (32, 32), prompt: str = PROMPT) -> GlobalHeatMap:
    """Video maps with one distinct cell per token frame (see the module docstring); by default 3
    token frames under a causal VAE with compression 4 (9 video frames)."""
    time = time or TimeAxis(frames=3, compression=4, causal=True)
    al = alignment(prompt)
    h, w = grid
    maps = torch.zeros(len(al.tokens), time.frames, h, w)
    for f in range(time.frames):
        maps[:, f, *hot_cell(f, grid)] = f + 1.0
    # words differ by scale, so their frame scores are told apart too
    for word in al.words:
        maps[list(word.positions)] *= 1.0 + 0.5 * word.index
    return GlobalHeatMap(maps, al, image_size, meta={"time": time.to_json(), "steps": [0, 1]})


def video_frames(num_frames: int, size: tuple[int, int] = (32, 32), seed: int = 0) -> np.ndarray:
    """Random uint8 RGB frames ``(num_frames, H, W, 3)`` (random, so no two frames are equal)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (num_frames, *size, 3), dtype=np.uint8)
