"""The cross-attention grounding loss: each noun, colour and size token's attention map is pulled
onto the mask of the object(s) its word names."""

from __future__ import annotations

import math

from .data import MAX_OBJECTS


class CaptureCrossAttention:
    """Attention processor for ``attn2`` (text-image) that computes the attention explicitly and keeps
    the probabilities (with gradients) for the grounding loss. Same output as diffusers' AttnProcessor.
    Used only while training: the exported pipeline has diffusers' default processors."""

    def __init__(self, store: list):
        self.store = store

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        import torch

        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        v = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(q, k, None)  # (batch * heads, pixels, tokens)
        self.store.append((attn.heads, probs))
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out))


def capture_cross_attention(unet, store: list) -> None:
    """Give every cross-attention layer of ``unet`` a :class:`CaptureCrossAttention` into ``store``."""
    for name, mod in unet.named_modules():
        if name.endswith("attn2"):
            mod.set_processor(CaptureCrossAttention(store))


def scored_tokens(bits, keep, n_objects: int = MAX_OBJECTS):
    """(B, 77) mask of the tokens the grounding loss scores: tokens bound to one of the first
    ``n_objects`` objects (noun, colour and size words) in kept captions."""
    return ((bits & ((1 << n_objects) - 1)) > 0) & keep.unsqueeze(1)


def grounded_tokens(bits, keep) -> int:
    """How many tokens of a batch the grounding loss scores (noun, colour and size tokens of kept
    captions)."""
    return int(scored_tokens(bits, keep).sum())


def grounding_loss(store: list, bits, masks, keep, norm: float | None = None):
    """Cross-attention grounding loss (in the spirit of TokenCompose, Wang et al. 2024).

    For every noun, colour and size token of a kept sample, in every cross-attention layer (mean over
    heads), two terms: the share of the token's attention mass that falls outside its object(s), and
    one minus the soft Dice overlap of its max-normalised map with the object mask. The first alone
    lets a map collapse onto one pixel of its object; the second asks it to cover the object, which is
    what a thresholded DAAM map is scored on.

    ``bits`` (B, 77) int64 object bits per token, ``masks`` (B, O, 16, 16) in [0, 1], ``keep`` (B,).
    ``norm``: divide each layer's summed terms by this instead of by the batch's own number of scored
    tokens (a data-parallel worker passes the whole batch's count over the number of workers)."""
    import torch
    import torch.nn.functional as F

    obj = (bits.unsqueeze(-1) >> torch.arange(masks.shape[1], device=bits.device)) & 1  # (B, 77, O)
    sel = scored_tokens(bits, keep, masks.shape[1])  # (B, 77)
    if not sel.any():
        return torch.zeros((), device=bits.device)
    obj = obj.float()
    terms = []
    for heads, probs in store:
        n = probs.shape[1]
        res = int(round(math.sqrt(n)))
        p = probs.float().reshape(len(bits), heads, n, -1).mean(1).transpose(1, 2)  # (B, tokens, pixels)
        m = masks if res == masks.shape[-1] else F.adaptive_avg_pool2d(masks, res)
        target = (obj @ m.flatten(2)).clamp(max=1)  # (B, 77, pixels)
        a, t = p[sel], target[sel]
        inside = (a * t).sum(-1) / a.sum(-1).clamp_min(1e-8)
        ahat = a / a.amax(-1, keepdim=True).detach().clamp_min(1e-8)
        dice = 2 * (ahat * t).sum(-1) / (ahat.sum(-1) + t.sum(-1)).clamp_min(1e-8)
        scored = (1 - inside) + (1 - dice)
        terms.append((scored.mean() if norm is None else scored.sum() / norm) / 2)
    return torch.stack(terms).mean()
