"""LTX-Video (``LTXVideoTransformer3DModel``): cross-attention ``attn2`` from packed video tokens (frame-major)
to T5 keys with a -10000 padding bias; a causal VAE with temporal compression 8; image-to-video (the image
is the first latent frame, at timestep 0) and LTXConditionPipeline (tokens of a condition at a later frame
precede the video's and are neither queries nor keys)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cross_checks import CrossHandSet, CrossOracle, split_heads
from family_checks import assert_maps_for_every_word, assert_peaks_in_region, traced_equals_untraced
from PIL import Image

from daamkit import trace
from daamkit.capture.families import family_of
from daamkit.frames import TimeAxis

PROMPT = "a red dog sitting on a wooden bench"
WORDS = ["a", "red", "dog", "sitting", "on", "wooden", "bench"]
SITE = r"transformer_blocks\.\d+\.attn2"
GRID = (3, 4, 8)  # 17 frames of 32x64 px: 1 + 8 * 2 frames -> 3 latent frames; 8 px per latent cell
N = 3 * 4 * 8
TIME = TimeAxis(frames=3, compression=8, causal=True)


@pytest.fixture(scope="module")
def ltx(t5_tokenizer_dir):
    from daamkit.testing.families.ltx import tiny_ltx

    return tiny_ltx(t5_tokenizer_dir)


@pytest.fixture(scope="module")
def i2v(t5_tokenizer_dir):
    from daamkit.testing.families.ltx import tiny_ltx_i2v

    return tiny_ltx_i2v(t5_tokenizer_dir)


@pytest.fixture(scope="module")
def cond(t5_tokenizer_dir):
    from daamkit.testing.families.ltx import tiny_ltx_condition

    return tiny_ltx_condition(t5_tokenizer_dir)


@pytest.fixture(scope="module")
def image():
    return Image.fromarray((np.random.RandomState(0).rand(32, 64, 3) * 255).astype("uint8"))


def run(pipe, prompt=PROMPT, steps=2, **kw):
    return pipe(prompt=prompt, num_inference_steps=steps, height=32, width=64, num_frames=17,
                generator=torch.Generator().manual_seed(0), output_type="np", **kw).frames


def conditions(image):
    from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXVideoCondition

    # frame 0 overwrites the first latent frame; frame 8 becomes one latent frame of extra tokens (4x8)
    return [LTXVideoCondition(image=image, frame_index=0), LTXVideoCondition(image=image, frame_index=8)]


def test_entry(ltx):
    fam, _ = family_of(ltx)
    assert fam.name == "ltx"
    with trace(ltx) as tc:
        assert [layer.name for layer in tc.layers] == ["transformer_blocks.0.attn2", "transformer_blocks.1.attn2"]
        assert {layer.block for layer in tc.layers} == {"cross"}


def test_traced_equals_untraced_and_the_video_maps(ltx):
    tc = traced_equals_untraced(ltx, lambda: run(ltx, negative_prompt="blue cat"), negative=True)
    frames = run(ltx)
    hm = tc.heat_maps(0)
    assert hm.is_video and tuple(hm.maps.shape) == (128, *GRID)
    assert hm.num_frames == frames.shape[1] == 17 and hm.image_size == (32, 64)
    assert hm.time == TIME
    assert hm.time.index() == [0] + [1] * 8 + [2] * 8  # the causal first frame, then 8 per latent frame
    assert_maps_for_every_word(hm, WORDS)
    assert hm.maps[9:].abs().max() == 0  # T5 padding is masked
    assert hm.word("dog").expand().shape == (17, 32, 64)
    assert tc.heat_maps(0, branch="negative").words == ["blue", "cat"]
    assert tc.generation.timesteps[0] == 1000.0


def _hand(pipe, token, frames, offset=0):
    return CrossHandSet(pipe.transformer, GRID, token, queries=[(SITE, "to_q", offset)], keys=[(SITE, "to_k", 0)],
                        frames=frames)


def test_hand_set_token_owns_a_region_in_some_frames(ltx):
    token = 2  # "dog" after "a", "red" (T5: no BOS)
    hand = _hand(ltx, token, frames=(1, 2))
    try:
        with trace(ltx) as tc:
            run(ltx)
            hm = tc.heat_maps(0)
    finally:
        hand.remove()
    assert hm.word("dog").positions == (token,)
    assert_peaks_in_region(hm.maps, token, hand.mask)
    scores = hm.word("dog").frame_scores()
    on = torch.tensor(TIME.index()) == 1  # video frames 1..8 come from token frame 1
    assert on.sum() == 8 and scores[on].min() > 10 * scores[~on].max()


def test_chunks_give_the_same_maps(ltx):
    with trace(ltx) as tc:
        run(ltx)
        ref = tc.heat_maps(0).maps
    # one cond row, 2 heads, 128 keys: 1 KiB per query; 20 queries (under a frame of 32) and 32 (one frame)
    for queries in (20, 40):
        with trace(ltx, chunk_mib=queries * 1024 / 2**20) as tc:
            run(ltx)
            torch.testing.assert_close(tc.heat_maps(0).maps, ref, rtol=1e-6, atol=0)


def _prepare(m, q, k, kwargs):
    # LTXVideoAttnProcessor: RMSNorm over all heads, no rotary embedding in attn2, then the head split
    return split_heads(m.norm_q(q), m.heads), split_heads(m.norm_k(k), m.heads)


def _expected(probs, row, start=0):
    f, h, w = GRID
    return probs[row].mean(0)[start: start + N].T.reshape(-1, f, h, w)


def test_probabilities_match_a_recomputation(ltx):
    layer = "transformer_blocks.1.attn2"
    oracle = CrossOracle(ltx.transformer.get_submodule(layer), _prepare)
    try:
        with trace(ltx, steps=[1], layers=[layer]) as tc:
            run(ltx, negative_prompt="blue cat")
            maps = tc.heat_maps(0).maps
    finally:
        oracle.remove()
    assert oracle.calls[1].shape[0] == 2  # [negative, cond]
    torch.testing.assert_close(maps, _expected(oracle.calls[1], 1), rtol=1e-4, atol=1e-7)


def test_image_to_video(i2v, image):
    tc = traced_equals_untraced(i2v, lambda: run(i2v, image=image))
    hm = tc.heat_maps(0)
    # the image is the first latent frame of the video: its tokens are the video's first token frame, at
    # timestep 0 while the others denoise; the step's timestep is the video's
    assert tuple(hm.maps.shape) == (128, *GRID) and hm.time == TIME and hm.num_frames == 17
    assert_maps_for_every_word(hm, WORDS)
    assert tc.generation.timesteps[0] == 1000.0 and tc.num_steps == 2
    hand = _hand(i2v, 2, frames=(2, 3))
    try:
        with trace(i2v) as tc:
            run(i2v, image=image)
            hm = tc.heat_maps(0)
    finally:
        hand.remove()
    assert_peaks_in_region(hm.maps, 2, hand.mask)


def test_condition_tokens_are_not_queries(cond, image):
    seen = []
    handle = cond.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(k), with_kwargs=True)
    try:
        tc = traced_equals_untraced(cond, lambda: run(cond, conditions=conditions(image)))
    finally:
        handle.remove()
    assert seen[0]["hidden_states"].shape[1] == 32 + N and seen[0].get("num_frames") is None
    hm = tc.heat_maps(0)
    assert tuple(hm.maps.shape) == (256, *GRID) and hm.time == TIME and hm.num_frames == 17
    assert_maps_for_every_word(hm, WORDS)
    # the condition's 32 tokens come first: a region set on the last N queries is found where it was set
    hand = _hand(cond, 2, frames=(1, 3), offset=lambda n: n - N)
    try:
        with trace(cond) as tc:
            run(cond, conditions=conditions(image))
            hm = tc.heat_maps(0)
    finally:
        hand.remove()
    assert_peaks_in_region(hm.maps, 2, hand.mask)


def test_condition_probabilities_match_a_recomputation(cond, image):
    layer = "transformer_blocks.0.attn2"
    oracle = CrossOracle(cond.transformer.get_submodule(layer), _prepare)
    try:
        with trace(cond, steps=[0], layers=[layer]) as tc:
            run(cond, conditions=conditions(image))
            maps = tc.heat_maps(0).maps
    finally:
        oracle.remove()
    torch.testing.assert_close(maps, _expected(oracle.calls[0], 1, start=32), rtol=1e-4, atol=1e-7)
