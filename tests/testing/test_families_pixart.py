"""The tiny PixArt-α and PixArt-Σ pipelines run their own T5 prompt encoding end to end."""

from __future__ import annotations

import pytest
import torch


@pytest.mark.parametrize("name, text_len", [("tiny_pixart_alpha", 120), ("tiny_pixart_sigma", 300)])
def test_tiny_pixart_generates(t5_tokenizer_dir, name, text_len):
    from daamkit.testing.families import pixart

    pipe = getattr(pixart, name)(t5_tokenizer_dir)
    seen = []
    pipe.transformer.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["encoder_hidden_states"].shape), with_kwargs=True
    )
    out = pipe(
        "a red dog sitting on a wooden bench", negative_prompt="blue cat", num_inference_steps=2, height=32, width=48,
        use_resolution_binning=False, clean_caption=False, output_type="np", generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (1, 32, 48, 3)
    assert seen[0] == (2, text_len, 32)  # CFG batch [negative, positive], T5 padded to the pipeline's max length
