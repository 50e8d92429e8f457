"""Checks every traced model family must pass, shared by the ``test_family_*.py`` files.

``traced_equals_untraced`` runs a pipeline call untraced and traced and checks that the images are
bit-identical and that processors, hooks and the torch-function mode stack are back as they were.
``HandSet`` overwrites chosen query/key projections so that one text token owns a known image region
and raises the q/k norm weights (so the model's own norms and rotary embedding shape the scores the
capture must reproduce); ``assert_peaks_in_region`` checks the word's map against that region.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from daamkit import trace


def _modules(pipe) -> list[nn.Module]:
    return [v for v in vars(pipe).values() if isinstance(v, nn.Module)] + [
        getattr(pipe, k) for k in getattr(pipe, "components", {}) if isinstance(getattr(pipe, k, None), nn.Module)
    ]


def pipeline_state(pipe) -> tuple[dict, int, int]:
    """Attention processors by module, hooks on every module of the pipeline, torch-function modes."""
    procs, hooks = {}, 0
    for root in {id(m): m for m in _modules(pipe)}.values():
        for name, m in root.named_modules():
            if hasattr(m, "processor"):
                procs[(id(root), name)] = m.processor
            hooks += len(m._forward_hooks) + len(m._forward_pre_hooks)
    return procs, hooks, torch._C._len_torch_function_stack()


def assert_restored(pipe, before) -> None:
    procs, hooks, modes = pipeline_state(pipe)
    assert hooks == before[1], "hooks left on the pipeline"
    assert modes == before[2], "a torch-function mode was left active"
    assert procs.keys() == before[0].keys() and all(procs[k] is before[0][k] for k in procs)


def images(out) -> np.ndarray:
    imgs = out.images if hasattr(out, "images") else out.frames if hasattr(out, "frames") else out
    return np.asarray(imgs)


def traced_equals_untraced(pipe, call: Callable[[], object], **trace_kw):
    """Run ``call`` untraced, then traced; assert identical images and a restored pipeline.

    Returns the trace (its results stay readable after the block)."""
    ref = images(call())
    before = pipeline_state(pipe)  # after a first call: transformers' encoders add their own hooks then
    with trace(pipe, **trace_kw) as tc:
        out = images(call())
    assert np.array_equal(out, ref), "tracing changed the image"
    assert_restored(pipe, before)
    return tc


def assert_maps_for_every_word(hm, words: Sequence[str]) -> None:
    assert hm.words == list(words)
    for w in words:
        m = hm.word(w).value
        assert torch.isfinite(m).all() and m.sum() > 0, f"no attention on {w!r}"


def region_mask(grid: tuple[int, ...], region=(0.0, 0.5, 0.5, 1.0), frames: tuple[int, int] | None = None) -> torch.Tensor:
    """Row-major (h*w,) mask of ``region`` = (row0, row1, col0, col1) as fractions of the grid.

    A video's grid is (frames, h, w): the mask is (frames*h*w,), frame-major, and holds the region
    only in token frames ``frames`` = (first, stop) (default: all of them)."""
    *lead, h, w = grid
    r0, r1, c0, c1 = region
    g = torch.zeros(h, w, dtype=torch.bool)
    g[int(r0 * h): int(math.ceil(r1 * h)), int(c0 * w): int(math.ceil(c1 * w))] = True
    if not lead:
        return g.flatten()
    f0, f1 = frames if frames is not None else (0, lead[0])
    v = torch.zeros(lead[0], h, w, dtype=torch.bool)
    v[f0:f1] = g
    return v.flatten()


class HandSet:
    """Query projections give a unit vector at the image positions inside a region and zero elsewhere;
    key projections give the unit vector at text position ``token`` and zero elsewhere.

    queries: ``[(module path regex, projection attribute, image offset)]``: the projection's output
    holds the generated image's tokens from ``image offset`` on (an int, or a callable of the output's
    sequence length). keys: ``[(regex, attribute, text offset)]`` likewise for the text tokens.
    Norm modules named in ``norms`` (on the matched modules) get weight ``gain``, so the model's own
    q/k norms shape the scores. Where the norms have no weight (LayerNorm without affine: the scores
    cannot be sharpened), ``others=-1`` with ``text_len`` gives the other text keys the opposite vector.
    rows: the batch rows whose keys are set (None: all); the other rows' keys are zero.
    """

    def __init__(self, denoiser: nn.Module, grid: tuple[int, ...], token: int, queries, keys,
                 region=(0.0, 0.5, 0.5, 1.0), norms=("norm_q", "norm_k", "norm_added_q", "norm_added_k"),
                 gain: float = 6.0, heads_of: Callable[[nn.Module], int] = lambda m: int(m.heads),
                 text_len: int = 0, others: float = 0.0, rows: Sequence[int] | None = None,
                 frames: tuple[int, int] | None = None):
        self.mask = region_mask(grid, region, frames)
        self.grid, self.token = grid, token
        self.text_len, self.others, self.rows = text_len, others, rows
        self.handles = []
        self.saved = []
        for name, m in denoiser.named_modules():
            matched = False
            for pattern, attr, offset in queries:
                if re.fullmatch(pattern, name) and getattr(m, attr, None) is not None:
                    self.handles.append(getattr(m, attr).register_forward_hook(self._q(heads_of(m), offset)))
                    matched = True
            for pattern, attr, offset in keys:
                if re.fullmatch(pattern, name) and getattr(m, attr, None) is not None:
                    self.handles.append(getattr(m, attr).register_forward_hook(self._k(heads_of(m), offset)))
                    matched = True
            if matched:
                for norm in norms:
                    mod = getattr(m, norm, None)
                    if mod is not None and getattr(mod, "weight", None) is not None:
                        self.saved.append((mod.weight, mod.weight.detach().clone()))
                        with torch.no_grad():
                            mod.weight.fill_(gain)

    @staticmethod
    def _unit(heads: int, c: int, like: torch.Tensor) -> torch.Tensor:
        u = torch.zeros(c // heads, dtype=like.dtype)
        u[0] = 1.0
        return u.repeat(heads)

    @staticmethod
    def _at(offset, n: int) -> int:
        return int(offset(n)) if callable(offset) else int(offset)

    def _q(self, heads: int, offset):
        def hook(mod, args, out):
            q = torch.zeros_like(out)
            start = self._at(offset, out.shape[1])
            n = self.mask.numel()
            block = q[:, start: start + n]
            block[:, self.mask] = self._unit(heads, out.shape[-1], out)
            return q

        return hook

    def _k(self, heads: int, offset):
        def hook(mod, args, out):
            k = torch.zeros_like(out)
            start = self._at(offset, out.shape[1])
            u = self._unit(heads, out.shape[-1], out)
            k[:, start: start + self.text_len] = self.others * u
            k[:, start + self.token] = u
            if self.rows is not None:
                k[[r for r in range(k.shape[0]) if r not in self.rows]] = 0.0
            return k

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        with torch.no_grad():
            for weight, value in self.saved:
                weight.copy_(value)


def assert_peaks_in_region(maps: torch.Tensor, position: int, mask: torch.Tensor) -> None:
    """The map at text ``position`` is high inside ``mask`` and low outside; the others stay low there.
    A video's maps are (T, F, h, w) and its mask frame-major (F*h*w,): outside includes the frames
    where the region is not."""
    grid = maps.shape[1:]
    inside = mask.reshape(tuple(grid))
    m = maps[position]
    assert m[inside].mean() > 10 * m[~inside].mean()
    assert inside.flatten()[int(m.argmax())]
    others = torch.cat([maps[:position], maps[position + 1:]])
    assert others[:, inside].mean() < 0.05 * m[inside].mean()


class RowHandSet(HandSet):
    """:class:`HandSet` whose key token depends on the row and on the call's key length:
    ``token_of(row, n)`` (an image's own word, a negative prompt's word), with the unit vector at
    ``dim`` of each head. Rotary embeddings turn dims (0, 1) fastest; families that rotate text keys
    by their position (Qwen-Image, Z-Image) put it on the slowest pair of the first axis instead, so
    that the query-key angle stays small."""

    def __init__(self, denoiser: nn.Module, grid: tuple[int, ...], token_of: Callable[[int, int], int], queries, keys,
                 dim: int = 0, **kw):
        self.token_of, self.dim = token_of, dim
        super().__init__(denoiser, grid, 0, queries, keys, **kw)

    def _unit(self, heads: int, c: int, like: torch.Tensor) -> torch.Tensor:
        u = torch.zeros(c // heads, dtype=like.dtype)
        u[self.dim] = 1.0
        return u.repeat(heads)

    def _k(self, heads: int, offset):
        def hook(mod, args, out):
            k = torch.zeros_like(out)
            start = self._at(offset, out.shape[1])
            for r in range(out.shape[0]):
                k[r, start + self.token_of(r, out.shape[1])] = self._unit(heads, out.shape[-1], out)
            return k

        return hook
