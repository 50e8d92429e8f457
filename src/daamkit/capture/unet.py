"""Cross-attention capture for UNet pipelines: SD 1.x / 2.x, SDXL, their img2img / inpainting /
ControlNet variants.

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
    DenoiserPreHook,
    HookSet,
    LayerInfo,
    ProjectionTap,
    attention_probs,
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
    """Cross-attention: image queries from ``to_q``, text keys from ``to_k``."""

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
        if q.dim() != 3 or not self.sink.wants(self.layer, q.shape[1]):
            return
        attn = self.attn
        for branch, rows in self.sink.branch_rows(q.shape[0]).items():
            with torch.no_grad():
                probs = attention_probs(
                    q[rows], k[rows], attn.heads, attn.scale, getattr(attn, "norm_q", None), getattr(attn, "norm_k", None)
                )
            self.sink.on_attention(self.layer, probs, branch)


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

    def attach(self, sink: CaptureSink) -> None:
        try:
            self.hooks.add(self.denoiser.register_forward_pre_hook(DenoiserPreHook(sink), with_kwargs=True))
            for layer, (_, attn) in zip(self.layers, self.modules, strict=True):
                _LayerTap(layer, attn, sink).install(self.hooks, attn.to_k)
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
