"""Joint-attention capture shared by the diffusion transformers: SD3 / SD3.5 (``sd3.py``) and Flux (``flux.py``).

Text and image share one attention: the sequence is [image, text] in SD3's processor and [text, image]
in Flux's. Like the UNet capture we only read the projections the model's own processor computes
(forward hooks on ``to_q`` / ``add_k_proj`` / ``to_k``), apply the module's own q/k RMS/LayerNorm and,
for Flux, its rotary embedding, and form softmax(q_image k_text^T * scale) over the text keys only —
the (image queries x text keys) block, never the full joint matrix. Processors stay untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from daamkit.capture.base import (
    CaptureSink,
    DenoiserCall,
    DenoiserPreHook,
    HookSet,
    LayerInfo,
    ProjectionTap,
    attention_probs,
)


def _rope(x: torch.Tensor, freqs: Any) -> torch.Tensor:
    """Flux's rotary embedding on (B, S, heads, D) with (cos, sin) of (S, D)."""
    from diffusers.models.embeddings import apply_rotary_emb

    return apply_rotary_emb(x, freqs, sequence_dim=1)


class _Tap(ProjectionTap):
    """Hooks of one joint-attention module.

    kind: "sd3" (image q from to_q, text k from add_k_proj), "double" (Flux double-stream: same, with
    rotary embedding), "single" (Flux single-stream: one [text, image] sequence through to_q / to_k).
    """

    def __init__(self, layer: LayerInfo, attn: nn.Module, sink: CaptureSink, kind: str, capture: Any):
        super().__init__(layer, attn, sink)
        self.kind, self.capture = kind, capture

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        q, k = self.take()
        if q is None or k is None:
            return  # fused projections (to_qkv) or an image-only call: nothing we can read
        rows_by_branch = self.sink.branch_rows(q.shape[0])
        t = self.capture.text_len
        image_tokens = q.shape[1] - t if self.kind == "single" else q.shape[1]
        if not rows_by_branch or not self.sink.wants(self.layer, image_tokens):
            return
        attn = self.attn
        heads = int(attn.heads)
        d = q.shape[-1] // heads
        rope = kwargs.get("image_rotary_emb")
        scale = float(getattr(attn, "scale", d**-0.5)) if self.kind == "sd3" else d**-0.5
        with torch.no_grad():
            for branch, rows in rows_by_branch.items():
                qb, kb = self._prepare(q[rows], k[rows], heads, d, t, rope)
                probs = attention_probs(qb.transpose(1, 2), kb.transpose(1, 2), heads, scale, head_first=True)
                self.sink.on_attention(self.layer, probs, branch)

    def _prepare(self, q: torch.Tensor, k: torch.Tensor, heads: int, d: int, t: int, rope: Any):
        """Image queries and text keys as the processor sees them: (B, N, heads, D) after the
        module's q/k norms and rotary embedding.

        The single-stream sequence is cut to image queries and text keys first: the norms and
        the rotary embedding treat each position on its own, so they give the same values on the
        part the probabilities use and skip the rest (the text queries, the image keys)."""
        attn = self.attn
        if self.kind == "single":
            q, k = q[:, t:], k[:, :t]
        q = q.unflatten(-1, (heads, d))
        k = k.unflatten(-1, (heads, d))
        if self.kind == "single":
            q, k = attn.norm_q(q), attn.norm_k(k)
        else:
            if getattr(attn, "norm_q", None) is not None:
                q = attn.norm_q(q)
            if getattr(attn, "norm_added_k", None) is not None:
                k = attn.norm_added_k(k)
        if self.kind != "sd3" and rope is not None:
            cos, sin = rope
            n_txt = k.shape[1]  # the text positions come first in the rotary tables
            q = _rope(q, (cos[n_txt:], sin[n_txt:]))
            k = _rope(k, (cos[:n_txt], sin[:n_txt]))
        return q, k


class _TransformerPreHook(DenoiserPreHook):
    """Reads the latent grid and the text length off the transformer's inputs."""

    def __init__(self, sink: CaptureSink, capture: Any):
        super().__init__(sink)
        self.capture = capture

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = kwargs.get("hidden_states", args[0] if args else None)
        t = kwargs.get("timestep", args[2] if len(args) > 2 else None)
        ctx = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        self.capture.text_len = int(ctx.shape[1]) if isinstance(ctx, torch.Tensor) else 0
        if isinstance(t, torch.Tensor):
            t = float(t.flatten()[0].item()) if t.numel() else 0.0
        self.sink.on_denoiser_call(
            DenoiserCall(batch=int(x.shape[0]), latent_hw=self.capture.grid_of(x, kwargs), timestep=float(t or 0.0))
        )


class JointCapture:
    family = "?"
    repeated_timestep_is_negative = False

    def __init__(self, transformer: nn.Module):
        self.denoiser = transformer
        self.text_len = 0
        self.modules = self._find(transformer)
        if not self.modules:
            raise ValueError(f"no joint text-image attention found in {type(transformer).__name__}")
        self.layers = [
            LayerInfo(name=name, block=kind if kind != "sd3" else "joint", index=i, heads=int(m.heads))
            for i, (name, m, kind) in enumerate(self.modules)
        ]
        self.hooks = HookSet()

    def _find(self, transformer: nn.Module) -> list[tuple[str, nn.Module, str]]:
        raise NotImplementedError

    def grid_of(self, x: torch.Tensor, kwargs: dict) -> tuple[int, int]:
        raise NotImplementedError

    def attach(self, sink: CaptureSink) -> None:
        fused = [name for name, attn, _ in self.modules if getattr(attn, "fused_projections", False)]
        if fused:
            raise ValueError(
                f"{len(fused)} attention modules use fused q/k/v projections (fuse_qkv_projections), which hide "
                "the queries and keys from daamkit: call pipe.transformer.unfuse_qkv_projections() before tracing"
            )
        try:
            self.hooks.add(self.denoiser.register_forward_pre_hook(_TransformerPreHook(sink, self), with_kwargs=True))
            for layer, (_, attn, kind) in zip(self.layers, self.modules, strict=True):
                key_proj = attn.to_k if kind == "single" else attn.add_k_proj
                _Tap(layer, attn, sink, kind, self).install(self.hooks, key_proj)
        except BaseException:
            self.hooks.remove()
            raise

    def detach(self) -> None:
        self.hooks.remove()
