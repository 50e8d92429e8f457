"""Cross-attention capture for UNet pipelines: SD 1.x / 2.x, SDXL, their img2img / inpainting /
ControlNet variants, and AnimateDiff's motion UNet (image layers per frame; its motion modules'
temporal attention is self-attention and is not traced).

Why hooks and not a replacement processor: the query and key projections are computed anyway by
whatever processor the pipeline has (SDPA, sliced, xformers, LoRA-wrapped layers, IP-Adapter), so we
read them off ``attn.to_q`` / ``attn.to_k`` as they are produced and only add the (queries x text
tokens) product and softmax for the branch we need. The processor and its fused kernel stay in place.
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
    ImageQueries,
    LayerInfo,
    ProjectionTap,
    attention_probs,
    query_chunks,
)
from daamkit.capture.families import TextPart
from daamkit.frames import TimeAxis


def _block_of(name: str) -> str:
    head = name.split(".", 1)[0]
    return {"down_blocks": "down", "mid_block": "mid", "up_blocks": "up"}.get(head, head)


def cross_attention_layers(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """The text-image attention modules of a UNet, in forward order."""
    from diffusers.models.attention_processor import Attention

    found = [
        (name, m)
        for name, m in unet.named_modules()
        if isinstance(m, Attention) and getattr(m, "is_cross_attention", False)
    ]
    # named_modules lists up_blocks after mid_block only by registration order; make it forward order
    order = {"down": 0, "mid": 1, "up": 2}
    return sorted(found, key=lambda nm: order.get(_block_of(nm[0]), 3))


class _LayerTap(ProjectionTap):
    """Cross-attention: image queries from ``to_q``, text keys from ``to_k``.

    A motion UNet (AnimateDiff) runs its image layers on the frames as batch rows, sample-major
    (row ``b * frames + f``), each row with its own copy of the text keys (or its own keys: prompt
    travel gives frames different prompts); a sample's probabilities go out frame-major, (b, heads,
    frames * n, T), in query chunks within the sink's budget.
    """

    def __init__(self, layer: LayerInfo, attn: nn.Module, sink: CaptureSink, capture: UNetCapture):
        super().__init__(layer, attn, sink)
        self.capture = capture

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        q, k = self.take()
        if q is None:
            return
        if k is None:  # fused key/value projection: compute the keys ourselves
            ehs = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
            if isinstance(ehs, tuple):  # IP-Adapter passes (text, image embeds)
                ehs = ehs[0]
            if ehs is None:
                return
            if self.attn.norm_cross:
                ehs = self.attn.norm_encoder_hidden_states(ehs)
            with torch.no_grad():
                k = nn.functional.linear(ehs, self.attn.to_k.weight, self.attn.to_k.bias)
        if q.dim() != 3:
            return
        call = self.capture.current
        frames = call.frames if call is not None else 1
        if frames > 1 and (call.batch * frames != q.shape[0] or k.shape[0] != q.shape[0]):
            return  # not the per-frame rows of this call
        batch = q.shape[0] // frames
        if self.sink.wants_queries(self.layer, q.shape[1]):
            self._queries(q, batch, frames)
        if not self.sink.wants(self.layer, q.shape[1]):
            return
        n, n_text = int(q.shape[1]), int(k.shape[1])
        qv = q.view(batch, frames, n, q.shape[-1])
        kv = k.reshape(k.shape[0] // frames, frames, n_text, k.shape[-1]) if k.shape[0] == q.shape[0] else None
        heads, total = int(self.attn.heads), frames * n
        for branch, rows in self.sink.branch_rows(batch).items():
            b = len(range(*rows.indices(batch)))
            # k rows broadcast over frames where the caller passed one key row per sample
            kb = kv[rows] if kv is not None else k[rows].unsqueeze(1).expand(b, frames, n_text, k.shape[-1])
            size = self.sink.query_chunk(total, n, b * heads * n_text * 4, q.device)
            for start, stop, chunk in query_chunks(total, size):
                with torch.no_grad():
                    probs = self._probs(qv[rows], kb, start, stop, n)
                self.sink.on_attention(self.layer, probs, branch, chunk)

    def _queries(self, q: torch.Tensor, batch: int, frames: int) -> None:
        """Each branch's image queries (b, heads, frames * n, d), frame-major, with the module's q norm
        applied after the head split as its processor does."""
        attn = self.attn
        heads = int(attn.heads)
        norm = getattr(attn, "norm_q", None)
        for branch, rows in self.sink.branch_rows(batch).items():
            qb = q.view(batch, frames, q.shape[1], heads, -1)[rows].permute(0, 3, 1, 2, 4).flatten(2, 3)
            with torch.no_grad():
                qb = norm(qb) if norm is not None else qb
            self.sink.on_image_queries(self.layer, ImageQueries(attn, qb, float(attn.scale), branch))

    def _probs(self, q: torch.Tensor, k: torch.Tensor, start: int, stop: int, n: int) -> torch.Tensor:
        """(b, heads, stop - start, T) for the frame-major queries ``start:stop`` of q (b, F, n, C)
        with each frame's keys k (b, F, T, C): whole frames in one product, split frames apart."""
        attn = self.attn
        norms = (getattr(attn, "norm_q", None), getattr(attn, "norm_k", None))
        pieces = []
        while start < stop:
            f = start // n
            if start == f * n and stop >= (f + 1) * n:
                g = stop // n
                p = attention_probs(q[:, f:g].flatten(0, 1), k[:, f:g].flatten(0, 1), attn.heads, attn.scale, *norms)
                p = p.unflatten(0, (q.shape[0], g - f)).transpose(1, 2).flatten(2, 3)
                start = g * n
            else:
                end = min(stop, (f + 1) * n)
                p = attention_probs(q[:, f, start - f * n: end - f * n], k[:, f], attn.heads, attn.scale, *norms)
                start = end
            pieces.append(p)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=2)


class UNetCapture:
    """Installs and removes the hooks on one UNet."""

    family = "unet"
    repeated_timestep_is_negative = False
    cond_first = False

    def __init__(self, unet: nn.Module):
        self.denoiser = unet
        self.modules = cross_attention_layers(unet)
        if not self.modules:
            raise ValueError("this UNet has no cross-attention layers: it is not a text-conditioned UNet")
        self.layers = [
            LayerInfo(name=name, block=_block_of(name), index=i, heads=int(m.heads))
            for i, (name, m) in enumerate(self.modules)
        ]
        self.hooks = HookSet()
        self.current: DenoiserCall | None = None

    def attach(self, sink: CaptureSink) -> None:
        try:
            self.current = None
            pre = DenoiserPreHook(sink, capture=self)
            self.hooks.add(self.denoiser.register_forward_pre_hook(pre, with_kwargs=True))
            for layer, (_, attn) in zip(self.layers, self.modules, strict=True):
                _LayerTap(layer, attn, sink, self).install(self.hooks, attn.to_k)
        except BaseException:
            self.hooks.remove()
            raise

    def detach(self) -> None:
        self.hooks.remove()

    def layer_factors(self) -> dict[str, int]:
        """Each layer's downsampling factor (its grid is the latent grid divided by it), read off the
        UNet's resamplers: a down block sees the latent after the downsamplers of the blocks before it,
        an up block after the upsamplers of the up blocks before it."""
        def resamples(block: nn.Module, attr: str) -> bool:
            return bool(getattr(block, attr, None))

        down = list(getattr(self.denoiser, "down_blocks", []))
        up = list(getattr(self.denoiser, "up_blocks", []))
        total = sum(resamples(b, "downsamplers") for b in down)
        factors = {}
        for layer in self.layers:
            parts = layer.name.split(".")
            if layer.block == "down":
                level = sum(resamples(b, "downsamplers") for b in down[: int(parts[1])])
            elif layer.block == "up":
                level = total - sum(resamples(b, "upsamplers") for b in up[: int(parts[1])])
            else:
                level = total
            factors[layer.name] = 2 ** max(level, 0)
        return factors

    def cell_pixels(self, pipe: Any) -> int:
        """Pixels per latent cell along each side."""
        return int(getattr(pipe, "vae_scale_factor", 8))

    def time_axis(self, pipe: Any, frames: int) -> TimeAxis | None:
        """A motion UNet denoises every frame of the video at once; its VAE decodes frame by frame."""
        return TimeAxis(frames) if frames > 1 else None

    def text_parts(self, called: list[str]) -> list[TextPart]:
        """The text encoder whose tokens index the cross-attention keys.

        SD/SDXL concatenate the encoders along features, not tokens: one encoder's ids index them all
        (the SDXL refiner has only the second).
        """
        enc = called[0] if called else "text_encoder"
        return [TextPart(enc, enc.replace("text_encoder", "tokenizer"))]
