"""SD3 / SD3.5 (MM-DiT): joint attention over [image, text], text keys from ``add_k_proj``."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from daamkit.capture.joint import JointCapture


class SD3Capture(JointCapture):
    """SD3 / SD3.5: every ``transformer_blocks.i.attn`` (``context_pre_only`` blocks included; the
    SD3.5 image-only ``attn2`` has no text keys and is skipped)."""

    family = "sd3"

    def _find(self, transformer: nn.Module) -> list[tuple[str, nn.Module, str]]:
        return [
            (name, m, "sd3")
            for name, m in transformer.named_modules()
            if name.endswith(".attn") and getattr(m, "add_k_proj", None) is not None and hasattr(m, "to_q")
        ]

    def grid_of(self, x: torch.Tensor, kwargs: dict) -> tuple[int, int]:
        p = int(self.denoiser.config.patch_size)
        return int(x.shape[-2]) // p, int(x.shape[-1]) // p

    def cell_pixels(self, pipe: Any) -> int:
        return int(getattr(pipe, "vae_scale_factor", 8)) * int(self.denoiser.config.patch_size)

    def context_encoders(self, called: list[str]) -> list[str]:
        # the joint context is [CLIP-L|CLIP-G features (77 tokens) ; T5 tokens]
        return [e for e in ("text_encoder", "text_encoder_3") if e in called]
