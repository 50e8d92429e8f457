"""Wan 2.1 / 2.2 (``WanTransformer3DModel``): video cross-attention ``attn2`` over UMT5 keys padded to 512
with zero embeddings (unmasked), frame-major video tokens, the causal 4x VAE; 2.1 I2V's image-context
keys in a call of their own, 2.2 A14B's two experts, TI2V-5B's per-token timesteps."""

from __future__ import annotations

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
SITE = r"blocks\.\d+\.attn2"
FRAMES, GRID = 3, (3, 4)  # 9 frames of 48x64 px: 3 latent frames, 6x8 latents, patch 2x2


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> str:
    from daamkit.testing.families.wan import wan_tokenizer

    d = tmp_path_factory.mktemp("wan_tokenizer")
    wan_tokenizer(d)
    return str(d)


@pytest.fixture(scope="module")
def wan(tok_dir):
    from daamkit.testing.families.wan import tiny_wan

    return tiny_wan(tok_dir)


def run(pipe, prompt=PROMPT, h=48, w=64, frames=9, steps=2, **kw):
    return pipe(prompt=prompt, num_frames=frames, height=h, width=w, num_inference_steps=steps, output_type="np",
                generator=torch.Generator().manual_seed(0), **kw).frames


def test_entry(wan):
    fam, _ = family_of(wan)
    assert fam.name == "wan"
    with trace(wan) as tc:
        assert [layer.name for layer in tc.layers] == ["blocks.0.attn2", "blocks.1.attn2"]
        assert {layer.block for layer in tc.layers} == {"cross"}


def test_traced_equals_untraced_and_video_maps(wan):
    tc = traced_equals_untraced(wan, lambda: run(wan, negative_prompt="blue cat"), negative=True)
    hm = tc.heat_maps(0)
    assert hm.is_video and tuple(hm.maps.shape) == (512, FRAMES, *GRID)
    assert hm.num_frames == 9 and hm.image_size == (48, 64)
    assert hm.time == TimeAxis(frames=3, patch=1, compression=4, causal=True)
    assert hm.time.index() == [0, 1, 1, 1, 1, 2, 2, 2, 2]  # causal: video frame 0 alone from latent frame 0
    assert_maps_for_every_word(hm, WORDS)
    assert hm.tokens[:10] == ("▁a", "▁red", "▁dog", "▁sitting", "▁on", "▁a", "▁wooden", "▁bench", "</s>", "<pad>")
    # padding keys are zero embeddings the model attends to unmasked: they keep probability
    assert hm.maps[9:].sum() > 0
    assert tuple(hm.word("dog").expand().shape) == (9, 48, 64)
    neg = tc.heat_maps(0, branch="negative")
    assert neg.words == ["blue", "cat"]


# ---- hand-set queries and keys: one token owns a region in some token frames only --------------------
def _hand(pipe_or_denoiser, token, frames=(1, 2), region=(0.0, 0.5, 0.5, 1.0), grid=(FRAMES, *GRID)):
    denoiser = getattr(pipe_or_denoiser, "transformer", pipe_or_denoiser)
    return CrossHandSet(denoiser, grid, token, queries=[(SITE, "to_q", 0)], keys=[(SITE, "to_k", 0)],
                        region=region, frames=frames)


def test_hand_set_token_owns_a_region_in_some_frames(wan):
    token = 2  # "dog" after "a", "red"
    hand = _hand(wan, token)
    try:
        with trace(wan) as tc:
            run(wan)
            hm = tc.heat_maps(0)
    finally:
        hand.remove()
    assert hm.word("dog").positions == (token,)
    assert_peaks_in_region(hm.maps, token, hand.mask)
    # token frame 1 lies on video frames 1..4 (causal VAE, 4x): high there, low on frame 0 and 5..8
    scores = hm.word("dog").frame_scores()
    assert scores.shape == (9,)
    assert scores[1:5].min() > 10 * max(scores[0], scores[5:].max())


def test_chunked_queries_give_the_same_maps(wan):
    with trace(wan) as tc:
        run(wan)
        ref = tc.heat_maps(0).maps
    per_query = 2 * 512 * 4  # heads x text keys x fp32, one row
    for queries in (5, 30):  # under a frame (12 queries), and whole frames (24)
        with trace(wan, chunk_mib=queries * per_query / 2**20) as tc:
            run(wan)
            maps = tc.heat_maps(0).maps
        torch.testing.assert_close(maps, ref, rtol=1e-6, atol=0)


def _prepare(m, q, k, kwargs):
    # WanAttnProcessor: RMSNorm across heads on the full inner dim, then the head split; no rotary in attn2
    return split_heads(m.norm_q(q), m.heads), split_heads(m.norm_k(k), m.heads)


def _expected(probs: torch.Tensor, row: int = 0, grid=(FRAMES, *GRID)) -> torch.Tensor:
    """(B, H, N, L) -> one row's (L, F, h, w), frame-major."""
    n = grid[0] * grid[1] * grid[2]
    return probs[row].mean(0)[:n].T.reshape(-1, *grid)


def test_probabilities_match_a_recomputation(wan):
    layer = "blocks.1.attn2"
    oracle = CrossOracle(wan.transformer.get_submodule(layer), _prepare)
    try:
        with trace(wan, steps=[1], layers=[layer]) as tc:
            run(wan, negative_prompt="blue cat")
            maps = tc.heat_maps(0).maps
    finally:
        oracle.remove()
    assert len(oracle.calls) == 4 and oracle.calls[2].shape == (1, 2, 36, 512)  # [cond, uncond] per step
    torch.testing.assert_close(maps, _expected(oracle.calls[2]), rtol=1e-4, atol=1e-7)
    assert maps.sum(0).sub(1).abs().max() < 1e-4  # every key is text (padding included)


# ---- Wan 2.1 image-to-video: the CLIP image-context keys are not text keys -------------------------------
@pytest.fixture(scope="module")
def wan_i2v(tok_dir):
    from daamkit.testing.families.wan import tiny_wan_i2v

    return tiny_wan_i2v(tok_dir)


def _image(h=48, w=64):
    return Image.new("RGB", (w, h), (200, 40, 40))


def test_i2v_image_context_keys_are_not_text(wan_i2v):
    layer = "blocks.0.attn2"
    m = wan_i2v.transformer.get_submodule(layer)
    img_keys = []
    m.add_k_proj.register_forward_hook(lambda mod, a, out: img_keys.append(out.shape[1]))
    oracle = CrossOracle(m, _prepare)
    try:
        tc = traced_equals_untraced(wan_i2v, lambda: run(wan_i2v, image=_image(), negative_prompt="blue cat"),
                                    steps=[0], layers=[layer])
    finally:
        oracle.remove()
        m.add_k_proj._forward_hooks.clear()
    assert img_keys[0] == 17  # CLIP tokens, attended in a call of their own before the text
    hm = tc.heat_maps(0)
    assert not tc.capture.missed
    assert tuple(hm.maps.shape) == (512, FRAMES, *GRID) and hm.num_frames == 9
    assert_maps_for_every_word(hm, WORDS)
    # the last oracle calls are the traced run's step 0: [cond, uncond]
    torch.testing.assert_close(hm.maps, _expected(oracle.calls[-4]), rtol=1e-4, atol=1e-7)


def test_i2v_hand_set(wan_i2v):
    token = 6  # "wooden"
    hand = _hand(wan_i2v, token, frames=(2, 3), region=(0.5, 1.0, 0.0, 0.5))
    try:
        with trace(wan_i2v) as tc:
            run(wan_i2v, image=_image())
            hm = tc.heat_maps(0)
    finally:
        hand.remove()
    assert_peaks_in_region(hm.maps, token, hand.mask)


# ---- Wan 2.2 A14B: two experts take turns ---------------------------------------------------------------
@pytest.fixture(scope="module")
def wan22(tok_dir):
    from daamkit.testing.families.wan import tiny_wan22

    return tiny_wan22(tok_dir)


@pytest.mark.parametrize("i2v", [False, True])
def test_experts_both_contribute(tok_dir, wan22, i2v):
    """Step 0 (t >= 875) runs on ``transformer``, step 1 on ``transformer_2``: each expert's hand-set token
    owns its region in its own steps, and both are in the maps of the whole call."""
    if i2v:
        from daamkit.testing.families.wan import tiny_wan22_i2v

        pipe, extra = tiny_wan22_i2v(tok_dir), {"image": _image()}
    else:
        pipe, extra = wan22, {}
    ran = []
    handles = [d.register_forward_pre_hook(lambda m, a, i=i: ran.append(i)) for i, d in
               enumerate((pipe.transformer, pipe.transformer_2))]
    high = _hand(pipe.transformer, 1, frames=(0, 1), region=(0.0, 0.5, 0.0, 0.5))  # "red", token frame 0
    low = _hand(pipe.transformer_2, 2, frames=(1, 3), region=(0.5, 1.0, 0.5, 1.0))  # "dog", token frames 1, 2
    try:
        tc = traced_equals_untraced(pipe, lambda: run(pipe, negative_prompt="blue cat", **extra),
                                    keep_steps=True, negative=True)
    finally:
        high.remove()
        low.remove()
        for h in handles:
            h.remove()
    assert ran == [0, 0, 1, 1] * 2  # untraced and traced: [cond, uncond] on each step's expert
    first, second, both = (tc.heat_maps(0, steps=s) for s in ([0], [1], None))
    assert first.meta["num_steps"] == 2 and both.words == WORDS
    assert_peaks_in_region(first.maps, 1, high.mask)
    assert_peaks_in_region(second.maps, 2, low.mask)
    for position, mask in ((1, high.mask), (2, low.mask)):
        inside = mask.reshape(FRAMES, *GRID)
        assert both.maps[position][inside].mean() > 5 * both.maps[position][~inside].mean()
    assert tc.heat_maps(0, branch="negative").words == ["blue", "cat"]


# ---- Wan 2.2 TI2V-5B: 16x VAE, a timestep per token -----------------------------------------------------
@pytest.mark.parametrize("image", [False, True])
def test_ti2v(tok_dir, image):
    from daamkit.testing.families.wan import tiny_wan22_ti2v

    pipe = tiny_wan22_ti2v(tok_dir, image=image)
    extra = {"image": _image(64, 96)} if image else {}
    tc = traced_equals_untraced(pipe, lambda: run(pipe, h=64, w=96, negative_prompt="blue cat", **extra),
                                negative=True)
    hm = tc.heat_maps(0)
    # the I2V run's first latent frame is the image's, at timestep 0: the step still counts by the rest
    assert hm.meta["num_steps"] == 2 and hm.image_size == (64, 96) and hm.num_frames == 9
    assert tuple(hm.maps.shape) == (512, 3, 2, 3)
    assert_maps_for_every_word(hm, WORDS)
    assert tc.heat_maps(0, branch="negative").words == ["blue", "cat"]
