"""The tiny Wan pipelines run their own UMT5 prompt encoding, image conditioning and expert switch end to end."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

# (builder, keyword arguments, pixel size, image-to-video, transformer in-channels)
CASES = {
    "wan21_t2v": ("tiny_wan", {}, (48, 64), False, 16),
    "wan21_i2v": ("tiny_wan_i2v", {}, (48, 64), True, 36),
    "wan22_t2v": ("tiny_wan22", {}, (48, 64), False, 16),
    "wan22_i2v": ("tiny_wan22_i2v", {}, (48, 64), True, 36),
    "wan22_ti2v_t2v": ("tiny_wan22_ti2v", {}, (64, 96), False, 48),
    "wan22_ti2v_i2v": ("tiny_wan22_ti2v", {"image": True}, (64, 96), True, 48),
}


@pytest.mark.parametrize("case", list(CASES))
def test_tiny_wan_generates(t5_tokenizer_dir, case):
    from daamkit.testing.families import wan

    name, kw, (h, w), i2v, channels = CASES[case]
    pipe = getattr(wan, name)(t5_tokenizer_dir, **kw)
    seen = []
    experts = [pipe.transformer, getattr(pipe, "transformer_2", None)]
    for i, d in enumerate(e for e in experts if e is not None):
        d.register_forward_pre_hook(
            lambda m, a, k, i=i: seen.append((i, tuple(k["hidden_states"].shape), k["encoder_hidden_states"].shape[1])),
            with_kwargs=True,
        )
    extra = {"image": Image.new("RGB", (w, h), (200, 40, 40))} if i2v else {}
    out = pipe(
        prompt="a red dog sitting on a wooden bench", negative_prompt="blue cat", num_frames=9, height=h, width=w,
        num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0), **extra,
    )
    assert out.frames.shape == (1, 9, h, w, 3)  # causal VAE: 1 + (3 - 1) * 4 frames from 3 latent frames
    assert len(seen) == 4 and all(s[1][:3] == (1, channels, 3) and s[2] == 512 for s in seen)  # cond, then uncond
    # A14B: step 0 (t >= 875) on the high-noise transformer, step 1 on transformer_2
    assert [s[0] for s in seen] == ([0, 0, 1, 1] if pipe.config.boundary_ratio else [0, 0, 0, 0])
