"""Sana-Video (``SanaVideoTransformer3DModel``): cross-attention ``attn2`` of the (1, 2, 2) patches,
frame-major, to Gemma keys picked as Sana's ([<bos>, prompt, pad], the instruction cut off, padding
masked by a -10000 bias); the causal Wan VAE decodes n latent frames to 1 + 4 (n - 1) video frames;
image to video puts the image's latents in latent frame 0 with timestep 0 there."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cross_checks import CrossHandSet, split_heads
from family_checks import (
    assert_maps_for_every_word,
    assert_peaks_in_region,
    assert_restored,
    pipeline_state,
    traced_equals_untraced,
)

from daamkit import trace
from daamkit.capture.families import family_of
from daamkit.frames import TimeAxis

PROMPT = "A Red dog sitting on a wooden bench"
WORDS = ["a", "red", "dog", "sitting", "on", "wooden", "bench"]  # the pipeline lower-cases the prompt
SITE = r"transformer_blocks\.\d+\.attn2"
FRAMES = 9  # 3 latent frames: 1 + 2 x 4 video frames
GRID = (3, 4, 6)  # 64x96 px: 16 px per token side (Wan VAE 8, patch 2)
TIME = TimeAxis(3, compression=4, causal=True)


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory) -> str:
    from daamkit.testing.families.sana_video import sana_video_tokenizer

    d = tmp_path_factory.mktemp("gemma_tokenizer")
    sana_video_tokenizer(d)
    return str(d)


@pytest.fixture(scope="module")
def sv(gemma_dir):
    from daamkit.testing.families.sana_video import tiny_sana_video

    return tiny_sana_video(gemma_dir)


@pytest.fixture(scope="module")
def i2v(gemma_dir):
    from daamkit.testing.families.sana_video import tiny_sana_video

    return tiny_sana_video(gemma_dir, image_to_video=True)


def run(pipe, prompt=PROMPT, h=64, w=96, binning=False, **kw):
    return pipe(prompt=prompt, num_inference_steps=2, height=h, width=w, frames=FRAMES,
                use_resolution_binning=binning, generator=torch.Generator().manual_seed(0), output_type="np",
                **kw).frames


def test_entry(sv, i2v):
    for pipe in (sv, i2v):
        fam, _ = family_of(pipe)
        assert fam.name == "sana_video"
        with trace(pipe) as tc:
            assert [layer.name for layer in tc.layers] == ["transformer_blocks.0.attn2", "transformer_blocks.1.attn2"]


def test_traced_equals_untraced_and_the_video_maps(sv):
    tc = traced_equals_untraced(sv, lambda: run(sv, negative_prompt="blue cat"), negative=True)
    out = run(sv)
    assert out.shape == (1, FRAMES, 64, 96, 3)
    hm = tc.heat_maps(0)
    assert hm.is_video and tuple(hm.maps.shape) == (300, *GRID)
    assert hm.time == TIME and hm.num_frames == out.shape[1] and hm.image_size == (64, 96)
    assert hm.time.index() == [0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert_maps_for_every_word(hm, WORDS)
    assert hm.tokens[:10] == ("<bos>", "▁a", "▁red", "▁dog", "▁sitting", "▁on", "▁a", "▁wooden", "▁bench", "<pad>")
    assert "video" not in hm.words and "prompt" not in hm.words  # no instruction word
    assert hm.maps[9:].abs().max() == 0  # padding is masked
    assert hm.word("dog").expand().shape == (FRAMES, 64, 96)
    neg = tc.heat_maps(0, branch="negative")
    assert neg.words == ["blue", "cat"] and tuple(neg.maps.shape) == (300, *GRID)


def test_wan_vae_time_mapping(sv):
    """Latent frame 0 decodes to video frame 0 alone, latent frame j > 0 to frames 4j-3..4j: a change in
    the last latent frame reaches only the last four video frames (the VAE is causal)."""
    z = torch.randn(1, 16, 3, 8, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = sv.vae.decode(z).sample
        z[:, :, 2] += 1.0
        b = sv.vae.decode(z).sample
    assert a.shape[2] == TIME.num_frames
    changed = [i for i in range(a.shape[2]) if not torch.equal(a[:, :, i], b[:, :, i])]
    assert changed == [i for i in range(FRAMES) if TIME.latent_frame(i) == 2]


def test_hand_set_token_owns_a_region_in_one_token_frame(sv):
    token = 3  # "dog" after <bos>, "a", "red"
    hand = CrossHandSet(sv.transformer, GRID, token, queries=[(SITE, "to_q", 0)], keys=[(SITE, "to_k", 0)],
                        frames=(1, 2))
    try:
        with trace(sv) as tc:
            run(sv)
            hm = tc.heat_maps(0)
    finally:
        hand.remove()
    assert hm.word("dog").positions == (token,)
    assert_peaks_in_region(hm.maps, token, hand.mask)
    scores = hm.word("dog").frame_scores()  # token frame 1 lies on video frames 1..4
    assert scores[1:5].min() > 20 * max(scores[0], scores[5:].max())


@pytest.mark.parametrize("mib", [0.01, 0.12])  # 4 queries a chunk (a frame is 24), then 2 whole frames
def test_chunked_maps_equal_the_whole_call(sv, mib):
    with trace(sv, negative=True) as tc:
        run(sv, negative_prompt="blue cat")
        ref = [tc.heat_maps(0), tc.heat_maps(0, branch="negative")]
    seen = []
    with trace(sv, negative=True, chunk_mib=mib) as tc:
        orig = tc.on_attention
        tc.on_attention = lambda layer, probs, branch, chunk=None: (seen.append(chunk), orig(layer, probs, branch, chunk))
        run(sv, negative_prompt="blue cat")
        got = [tc.heat_maps(0), tc.heat_maps(0, branch="negative")]
    assert all(c is not None for c in seen)
    assert max(c.stop - c.start for c in seen) == (4 if mib < 0.1 else 48)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a.maps, b.maps, rtol=1e-6, atol=1e-9)


def test_probabilities_match_a_recomputation(sv):
    layer = "transformer_blocks.1.attn2"
    m = sv.transformer.get_submodule(layer)
    seen = {}

    def pre(mod, args, kwargs):
        seen["mask"] = kwargs.get("attention_mask")

    handles = [
        m.register_forward_pre_hook(pre, with_kwargs=True),
        m.to_q.register_forward_hook(lambda mod, a, out: seen.setdefault("q", out.detach())),
        m.to_k.register_forward_hook(lambda mod, a, out: seen.setdefault("k", out.detach())),
    ]
    try:
        with trace(sv, steps=[0], layers=[layer]) as tc:
            run(sv, negative_prompt="blue cat")
            maps = tc.heat_maps(0).maps
    finally:
        for h in handles:
            h.remove()
    # SanaAttnProcessor2_0: q/k RMSNorm over all heads' features, then the head split; bias mask (B, 1, L)
    q, k = split_heads(m.norm_q(seen["q"]), m.heads), split_heads(m.norm_k(seen["k"]), m.heads)
    scores = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + seen["mask"][:, None]
    probs = scores.softmax(-1)[1].mean(0)  # [negative, cond]: the cond row, head mean, (N, 300)
    expected = probs.T.reshape(300, *GRID)
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-7)
    assert maps[:9].sum(0).sub(1).abs().max() < 1e-4


def test_image_to_video(sv, i2v):
    image = torch.rand(1, 3, 64, 96, generator=torch.Generator().manual_seed(1))
    tc = traced_equals_untraced(i2v, lambda: run(i2v, image=image, negative_prompt="blue cat"))
    hm = tc.heat_maps(0)
    assert hm.time == TIME and hm.num_frames == FRAMES and tuple(hm.maps.shape) == (300, *GRID)
    assert_maps_for_every_word(hm, WORDS)
    # the conditioning frame's tokens have timestep 0; the steps are counted by the noisy tokens' time
    with trace(sv) as ref:
        run(sv, negative_prompt="blue cat")
    assert tc.num_steps == 2 and tc.generation.timesteps == ref.generation.timesteps


def test_resolution_binning_crops_the_maps_as_the_video(sv, monkeypatch):
    """64x96 requested -> the 64x128 bin; the decoded video is cropped by 16 px (one token) a side."""
    import diffusers.pipelines.sana_video.pipeline_sana_video as module

    monkeypatch.setattr(module, "ASPECT_RATIO_480_BIN", {"0.5": [64.0, 128.0], "1.0": [64.0, 64.0]})
    with trace(sv) as tc:
        full = run(sv, h=64, w=128)
        ref = tc.heat_maps(0)
    before = pipeline_state(sv)
    tc = traced_equals_untraced(sv, lambda: run(sv, binning=True))
    assert "resize_and_crop_tensor" not in vars(sv.video_processor)
    assert_restored(sv, before)
    out = run(sv, binning=True)
    np.testing.assert_array_equal(out, full[:, :, :, 16:112])
    hm = tc.heat_maps(0)
    assert hm.image_size == (64, 96) and hm.meta["generated_size"] == [64, 128]
    torch.testing.assert_close(hm.maps, ref.maps[..., 1:7], rtol=1e-5, atol=1e-7)
