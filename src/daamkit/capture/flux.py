"""Flux: double-stream blocks (text keys from ``add_k_proj``) and single-stream blocks (one [text, image]
sequence through ``to_q``/``to_k``), RMSNorm on q/k and rotary embedding applied before the scores."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from daamkit.capture.joint import JointCapture


class FluxCapture(JointCapture):
    """Flux: double-stream ``transformer_blocks`` and single-stream ``single_transformer_blocks``."""

    family = "flux"
    repeated_timestep_is_negative = True  # true CFG runs the negative prompt as a second call per step

    def _find(self, transformer: nn.Module) -> list[tuple[str, nn.Module, str]]:
        found = []
        for name, m in transformer.named_modules():
            if not name.endswith(".attn") or not hasattr(m, "to_q"):
                continue
            if name.startswith("transformer_blocks") and getattr(m, "add_k_proj", None) is not None:
                found.append((name, m, "double"))
            elif name.startswith("single_transformer_blocks"):
                found.append((name, m, "single"))
        return found

    def grid_of(self, x: torch.Tensor, kwargs: dict) -> tuple[int, int]:
        ids = kwargs.get("img_ids")
        if ids is None:
            raise ValueError("Flux transformer called without img_ids: cannot place image tokens on a grid")
        if ids.ndim == 3:
            ids = ids[0]
        return int(ids[:, 1].max().item()) + 1, int(ids[:, 2].max().item()) + 1

    def cell_pixels(self, pipe: Any) -> int:
        return int(getattr(pipe, "vae_scale_factor", 8)) * 2  # latents are packed 2x2

    def context_encoders(self, called: list[str]) -> list[str]:
        return ["text_encoder_2"] if "text_encoder_2" in called else []  # T5; CLIP only gives a pooled vector
