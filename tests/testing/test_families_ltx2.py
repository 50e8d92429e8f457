"""The tiny LTX-2 pipeline runs 2 steps and returns 1 + 8 (latent frames - 1) video frames and audio."""

from __future__ import annotations

import numpy as np
import torch


def test_tiny_ltx2_generates(tmp_path):
    from daamkit.testing.families.ltx2 import tiny_ltx2
    from daamkit.testing.families.sana import gemma_tokenizer

    gemma_tokenizer(tmp_path, extra_text=())
    pipe = tiny_ltx2(str(tmp_path))
    assert pipe.vae_temporal_compression_ratio == 8 and pipe.vae_spatial_compression_ratio == 8
    assert pipe.connectors.video_connector.num_learnable_registers == 128
    out = pipe(prompt="a red dog on a bench", negative_prompt="blue cat", num_inference_steps=2, height=32, width=64,
               num_frames=17, max_sequence_length=128, output_type="np", generator=torch.Generator().manual_seed(0))
    assert out.frames.shape == (1, 17, 32, 64, 3) and np.isfinite(out.frames).all()
    assert out.audio.shape[:2] == (1, 2)
