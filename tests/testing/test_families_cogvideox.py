"""The tiny CogVideoX and Mochi pipelines run their own T5 prompt encoding and VAE decode end to end."""

from __future__ import annotations

import PIL.Image
import pytest
import torch


@pytest.mark.parametrize(
    "name, kw, frames, returned, latents",
    [
        ("tiny_cogvideox", {}, 9, 9, (2, 3, 4, 8, 12)),  # (B, F, C, H, W), CFG rows
        ("tiny_cogvideox", {"version": "1.5"}, 9, 9, (2, 4, 4, 8, 12)),  # 3 latent frames padded to 4
        ("tiny_cogvideox_i2v", {}, 9, 9, (2, 3, 8, 8, 12)),  # image latents on channels
        ("tiny_mochi", {}, 13, 13, (2, 12, 3, 4, 6)),  # (B, C, F, H, W), 6x causal VAE
    ],
)
def test_tiny_pipelines_generate(t5_tokenizer_dir, name, kw, frames, returned, latents):
    from daamkit.testing.families import cogvideox

    pipe = getattr(cogvideox, name)(t5_tokenizer_dir, **kw)
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(k["hidden_states"].shape), with_kwargs=True)
    extra = {"image": PIL.Image.new("RGB", (48, 32), (200, 30, 30))} if "i2v" in name else {}
    out = pipe(prompt="a red dog", negative_prompt="blue cat", num_inference_steps=2, height=32, width=48,
               num_frames=frames, output_type="pt", generator=torch.Generator().manual_seed(0), **extra).frames
    assert tuple(out.shape) == (1, returned, 3, 32, 48)
    assert len(seen) == 2 and tuple(seen[0]) == latents
