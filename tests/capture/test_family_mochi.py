"""Mochi (``MochiTransformer3DModel``): asymmetric joint attention called once per batch row over
[video frame-major, that row's valid T5 tokens]; timesteps rise; the VAE compresses time 6x, causally."""

from __future__ import annotations

import pytest
import torch
from cross_checks import CrossHandSet
from family_checks import assert_maps_for_every_word, assert_peaks_in_region, traced_equals_untraced

from daamkit import trace
from daamkit.capture.families import family_of

PROMPT = "a red dog sitting on a wooden bench"
WORDS = ["a", "red", "dog", "sitting", "on", "wooden", "bench"]
SITE = r"transformer_blocks\.\d+\.attn1"
TEXT = 256
GRID = (3, 4, 6)  # 13 frames: 3 latent frames; 64x96 px: 8 px per latent, patch 2


@pytest.fixture(scope="module")
def pipe(t5_tokenizer_dir):
    from daamkit.testing.families.cogvideox import tiny_mochi

    return tiny_mochi(t5_tokenizer_dir)


def run(pipe, prompt=PROMPT, **kw):
    return pipe(prompt=prompt, num_inference_steps=2, height=64, width=96, num_frames=13,
                generator=torch.Generator().manual_seed(0), output_type="pt", **kw).frames


def test_traced_equals_untraced_and_maps(pipe):
    assert family_of(pipe)[0].name == "mochi"
    tc = traced_equals_untraced(pipe, lambda: run(pipe, negative_prompt="blue cat"), negative=True)
    assert tc.num_steps == 2  # rising timesteps: one generation
    hm = tc.heat_maps(0)
    assert hm.is_video and tuple(hm.maps.shape) == (TEXT, *GRID) and hm.image_size == (64, 96)
    assert hm.time.num_frames == 13 and hm.time.index() == [0] + [1] * 6 + [2] * 6
    assert_maps_for_every_word(hm, WORDS)
    for w in WORDS:
        assert hm.word(w).value.min() > 0
    # the row's masked T5 padding is no key: no probability past </s>
    assert hm.maps[9:].abs().max() == 0
    neg = tc.heat_maps(0, branch="negative")
    assert neg.words == ["blue", "cat"] and neg.maps[4:].abs().max() == 0


def test_hand_set_region_in_some_frames(pipe):
    """RoPE frequencies zeroed (the identity) while q/k are set by hand through the RMSNorm weights."""
    saved = pipe.transformer.pos_frequencies.detach().clone()
    # queries outside the region point away from the token: a zero query would give it 1/9 of 9 keys
    hand = CrossHandSet(pipe.transformer, GRID, token=2, queries=[(SITE, "to_q", 0)], keys=[(SITE, "add_k_proj", 0)],
                   frames=(1, 2))
    try:
        with torch.no_grad():
            pipe.transformer.pos_frequencies.zero_()
        with trace(pipe) as tc:
            run(pipe, guidance_scale=1.0)
    finally:
        hand.remove()
        with torch.no_grad():
            pipe.transformer.pos_frequencies.copy_(saved)
    hm = tc.heat_maps(0)
    assert_peaks_in_region(hm.maps[:9], 2, hand.mask)
    scores = hm.word("dog").frame_scores()
    on = [i for i, f in enumerate(hm.time.index()) if f == 1]
    off = [i for i in range(len(scores)) if i not in on]
    assert min(float(scores[i]) for i in on) > 5 * max(float(scores[i]) for i in off)


def test_chunked_delivery_matches(pipe):
    with trace(pipe, negative=True) as tc:
        run(pipe, negative_prompt="blue cat")
    ref, ref_neg = tc.heat_maps(0).maps, tc.heat_maps(0, branch="negative").maps
    for mib in (0.05, 0.001):  # about a frame per chunk, then a few queries (sub-frame)
        with trace(pipe, chunk_mib=mib, negative=True) as tc:
            run(pipe, negative_prompt="blue cat")
        assert torch.allclose(tc.heat_maps(0).maps, ref, rtol=1e-6, atol=1e-9)
        assert torch.allclose(tc.heat_maps(0, branch="negative").maps, ref_neg, rtol=1e-6, atol=1e-9)


def test_recomputed_probabilities(pipe):
    """Layer 1 (context-pre-only), step 0, cond row: q/k from the module's projections, RMSNorms and
    RoPE; softmax over the row's valid text tokens."""
    attn = pipe.transformer.transformer_blocks[1].attn1
    seen = {}

    def grab(mod, args, kwargs):
        seen.setdefault("in", kwargs)

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with trace(pipe, steps=[0], layers=["transformer_blocks.1.attn1"]) as tc:
            run(pipe, negative_prompt="blue cat")
    finally:
        handle.remove()
    kw = seen["in"]
    row = 1  # CFG rows are [negative, cond]
    x, text = kw["hidden_states"][row:row + 1], kw["encoder_hidden_states"][row:row + 1]
    valid = kw["attention_mask"][row].bool()
    cos, sin = kw["image_rotary_emb"]

    def rope(t):
        even, odd = t[..., 0::2].float(), t[..., 1::2].float()
        return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)

    q = rope(attn.norm_q(attn.to_q(x).unflatten(2, (attn.heads, -1)))).transpose(1, 2)
    k = attn.norm_added_k(attn.add_k_proj(text).unflatten(2, (attn.heads, -1))).transpose(1, 2)[:, :, valid]
    probs = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)[0].mean(0)
    expected = torch.zeros(TEXT, q.shape[2])
    expected[valid] = probs.T
    assert int(valid.sum()) == 9
    assert torch.allclose(tc.heat_maps(0).maps, expected.reshape(TEXT, *GRID), rtol=1e-4, atol=1e-7)
