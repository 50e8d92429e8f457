"""CogVideoX (``CogVideoXTransformer3DModel``): joint attention over [T5 text (226), video frame-major],
latents (B, F, C, H, W); 1.0 (sin-cos or rotary positions), 1.5 (temporal patch 2, padding at the start),
image-to-video (image latents on channels)."""

from __future__ import annotations

import PIL.Image
import pytest
import torch
from family_checks import (
    HandSet,
    assert_maps_for_every_word,
    assert_peaks_in_region,
    traced_equals_untraced,
)

from daamkit import trace
from daamkit.capture.families import family_of

PROMPT = "a red dog sitting on a wooden bench"
WORDS = ["a", "red", "dog", "sitting", "on", "wooden", "bench"]
SITE = r"transformer_blocks\.\d+\.attn1"
TEXT = 226
HW = (4, 6)  # 32x48 px: 8 px per token side (VAE 4, patch 2)


@pytest.fixture(scope="module")
def pipes(t5_tokenizer_dir):
    from daamkit.testing.families.cogvideox import tiny_cogvideox, tiny_cogvideox_i2v

    return {
        "1.0": tiny_cogvideox(t5_tokenizer_dir),
        "2b": tiny_cogvideox(t5_tokenizer_dir, rotary=False),
        "1.5": tiny_cogvideox(t5_tokenizer_dir, version="1.5"),
        "i2v": tiny_cogvideox_i2v(t5_tokenizer_dir),
        "i2v-1.5": tiny_cogvideox_i2v(t5_tokenizer_dir, version="1.5"),
    }


def run(pipe, frames=9, prompt=PROMPT, **kw):
    if "I2V" in type(pipe).__name__ or "ImageToVideo" in type(pipe).__name__:
        kw.setdefault("image", PIL.Image.new("RGB", (48, 32), (200, 30, 30)))
    return pipe(prompt=prompt, num_inference_steps=2, height=32, width=48, num_frames=frames,
                generator=torch.Generator().manual_seed(0), output_type="pt", **kw).frames


@pytest.mark.parametrize("kind", ["1.0", "i2v"])
def test_traced_equals_untraced_and_maps(pipes, kind):
    pipe = pipes[kind]
    assert family_of(pipe)[0].name == "cogvideox"
    tc = traced_equals_untraced(pipe, lambda: run(pipe, negative_prompt="blue cat"), negative=True)
    hm = tc.heat_maps(0)
    assert [layer.name for layer in tc.layers] == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    assert hm.is_video and tuple(hm.maps.shape) == (TEXT, 3, *HW) and hm.image_size == (32, 48)
    assert hm.time.num_frames == 9 and hm.time.index() == [0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert_maps_for_every_word(hm, WORDS)
    for w in WORDS:
        assert hm.word(w).value.shape == (3, *HW) and hm.word(w).value.min() > 0
    assert tuple(hm.word("dog").expand().shape[:1]) == (9,)
    assert tc.heat_maps(0, branch="negative").words == ["blue", "cat"]


@pytest.mark.parametrize(
    "kind, frames, tokens, returned, index",
    [
        ("1.0", 13, 4, 16, [i // 4 for i in range(16)]),  # 4 latent frames: the VAE decodes pairs, no lone first
        ("1.5", 9, 2, 9, [0] + [1] * 8),  # 3 latent frames padded to 4 at the start
        ("1.5", 13, 2, 16, [i // 8 for i in range(16)]),  # 4 latent frames, no padding, even: not causal
        ("i2v-1.5", 9, 2, 9, [0] + [1] * 8),
    ],
)
def test_time_axis(pipes, kind, frames, tokens, returned, index):
    pipe = pipes[kind]
    with trace(pipe) as tc:
        out = run(pipe, frames=frames)
    hm = tc.heat_maps(0)
    assert out.shape[1] == returned == hm.time.num_frames
    assert hm.maps.shape[1] == tokens and hm.time.index() == index
    assert_maps_for_every_word(hm, WORDS)


def test_hand_set_region_in_some_frames(pipes):
    """2b (sin-cos positions, no rotary): q/k set by hand through the LayerNorm q/k norms."""
    pipe = pipes["2b"]
    grid = (3, *HW)
    hand = HandSet(pipe.transformer, grid, token=2, queries=[(SITE, "to_q", TEXT)], keys=[(SITE, "to_k", 0)],
                   frames=(1, 2), region=(0.0, 0.5, 0.5, 1.0))
    try:
        with trace(pipe) as tc:
            run(pipe, guidance_scale=1.0)
    finally:
        hand.remove()
    hm = tc.heat_maps(0)
    assert hm.words[:3] == ["a", "red", "dog"]
    assert_peaks_in_region(hm.maps, 2, hand.mask)
    scores = hm.word("dog").frame_scores()
    on = [i for i, f in enumerate(hm.time.index()) if f == 1]
    off = [i for i in range(len(scores)) if i not in on]
    assert min(float(scores[i]) for i in on) > 5 * max(float(scores[i]) for i in off)


def test_chunked_delivery_matches(pipes):
    pipe = pipes["1.0"]
    with trace(pipe) as tc:
        run(pipe)
    ref = tc.heat_maps(0).maps
    for mib in (0.05, 0.002):  # a frame per chunk, then a few queries (sub-frame)
        with trace(pipe, chunk_mib=mib) as tc:
            run(pipe)
        assert torch.allclose(tc.heat_maps(0).maps, ref, rtol=1e-6, atol=1e-9)


def test_recomputed_probabilities(pipes):
    """Layer 0, step 0, cond row: q/k from the module's projections, LayerNorm and rotary embedding."""
    from diffusers.models.embeddings import apply_rotary_emb

    pipe = pipes["1.0"]
    attn = pipe.transformer.transformer_blocks[0].attn1
    seen = {}

    def grab(mod, args, kwargs):
        seen.setdefault("in", (kwargs["hidden_states"], kwargs["encoder_hidden_states"], kwargs["image_rotary_emb"]))

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with trace(pipe, steps=[0], layers=["transformer_blocks.0.attn1"]) as tc:
            run(pipe)
    finally:
        handle.remove()
    hidden, text, rope = seen["in"]
    x = torch.cat([text, hidden], dim=1)[1:2]  # CFG rows are [negative, cond]
    heads = attn.heads
    q = attn.norm_q(attn.to_q(x).unflatten(2, (heads, -1)).transpose(1, 2))
    k = attn.norm_k(attn.to_k(x).unflatten(2, (heads, -1)).transpose(1, 2))
    q = apply_rotary_emb(q[:, :, TEXT:], rope)
    probs = (q @ k[:, :, :TEXT].transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
    expected = probs[0].mean(0).T.reshape(TEXT, 3, *HW)
    assert torch.allclose(tc.heat_maps(0).maps, expected, rtol=1e-4, atol=1e-7)
