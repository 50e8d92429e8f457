"""Checks for cross-attention families (keys = text only): an independent recomputation of one module's
image-query x text-key probabilities, and a hand-set for keys that are mostly masked."""

from __future__ import annotations

from collections.abc import Callable

import torch
from family_checks import HandSet
from torch import nn


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, heads*d) -> (B, heads, N, d)."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


class CrossOracle:
    """Recomputes a cross-attention module's probabilities from its ``to_q``/``to_k`` outputs.

    ``prepare(module, q, k, kwargs) -> (q, k)`` turns the projections into (B, H, N, d) with the module's
    own norms and rotary embedding, as the test reads them off diffusers' processor; the additive mask
    the module gets as ``attention_mask`` ((B, 1, L) bias) is added to the scores. Each call appends the
    (B, H, N_image, L) softmax over the text keys to ``calls``.
    """

    def __init__(self, module: nn.Module, prepare: Callable | None = None):
        self.m = module
        self.prepare = prepare or (lambda m, q, k, kw: (split_heads(q, m.heads), split_heads(k, m.heads)))
        self.calls: list[torch.Tensor] = []
        self.out: dict[str, torch.Tensor] = {}
        self.kwargs: dict = {}
        self.handles = [
            module.register_forward_pre_hook(self._pre, with_kwargs=True),
            module.to_q.register_forward_hook(self._save("q")),
            module.to_k.register_forward_hook(self._save("k")),
            module.register_forward_hook(self._post),
        ]

    def _pre(self, mod, args, kwargs):
        self.out, self.kwargs = {}, kwargs

    def _save(self, name):
        def hook(mod, args, out):
            self.out.setdefault(name, out.detach())

        return hook

    def _post(self, mod, args, out):
        q, k = self.prepare(self.m, self.out["q"], self.out["k"], self.kwargs)
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
        mask = self.kwargs.get("attention_mask")
        if mask is not None:
            scores = scores + mask.float().reshape(mask.shape[0], 1, 1, mask.shape[-1])
        self.calls.append(scores.softmax(-1))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def expected_maps(probs: torch.Tensor, row: int, grid: tuple[int, int]) -> torch.Tensor:
    """One row's (H, N, L) probabilities as DAAM maps: mean over heads, (L, h, w)."""
    h, w = grid
    return probs[row].mean(0)[: h * w].T.reshape(-1, h, w)


class CrossHandSet(HandSet):
    """:class:`HandSet` for cross-attention over a handful of unmasked keys.

    Image queries outside the region point away from the token (a zero query would give it the
    uniform share of the few keys left by the mask, as much as 1/9 for a short prompt); the unit
    vectors are scaled by ``amp`` (families without q/k norms) and sit at dimension ``dim`` of each
    head (a slowly rotating rotary pair keeps the scores' sign); ``token_of(row, batch)``, if given,
    picks the token per batch row.
    """

    def __init__(self, *args, token_of: Callable[[int, int], int] | None = None, amp: float = 4.0,
                 dim: int = 0, **kwargs):
        self.token_of, self.amp, self.dim = token_of, amp, dim
        super().__init__(*args, **kwargs)

    def _vec(self, heads: int, c: int, like: torch.Tensor) -> torch.Tensor:
        u = torch.zeros(c // heads, dtype=like.dtype)
        u[self.dim] = self.amp
        return u.repeat(heads)

    def _q(self, heads: int, offset):
        def hook(mod, args, out):
            q = torch.zeros_like(out)
            start = self._at(offset, out.shape[1])
            u = self._vec(heads, out.shape[-1], out)
            q[:, start: start + self.mask.numel()] = torch.where(self.mask[:, None], u, -u)
            return q

        return hook

    def _k(self, heads: int, offset):
        def hook(mod, args, out):
            k = torch.zeros_like(out)
            start = self._at(offset, out.shape[1])
            for r in range(out.shape[0]):
                token = self.token if self.token_of is None else self.token_of(r, out.shape[0])
                k[r, start + token] = self._vec(heads, out.shape[-1], out)
            return k

        return hook
