"""HunyuanVideo 1.5 (``HunyuanVideo15Transformer3DModel``): dual-stream blocks attending over [video, the
sample's packed conditions]; each sample packs [valid image tokens, valid ByT5 glyph tokens, valid Qwen
tokens, masked rest], so the Qwen keys start after that row's image and glyph tokens. Only the Qwen
tokens are text keys; the cond and uncond batches are separate calls (the guider)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cross_checks import CrossHandSet
from family_checks import assert_maps_for_every_word, assert_peaks_in_region, traced_equals_untraced

from daamkit import trace
from daamkit.capture.families import family_of
from daamkit.frames import TimeAxis

PROMPT = "a red dog on a wooden bench"
WORDS = ["a", "red", "dog", "on", "wooden", "bench"]
QUOTED = 'a photo of "red star" on a wooden bench'
GLYPH = 18  # ByT5 ids of 'Text "red star". ' (bytes and </s>), the glyph text the pipeline makes of QUOTED
GRID = (3, 4, 6)  # 9 frames -> 3 latent frames; 64x96 px -> 4x6 latents (16x), patch 1
TEXT = 1000  # the pipeline's tokenizer_max_length
SITE = r"transformer_blocks\.\d+\.attn"


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> str:
    from daamkit.testing.families.hunyuanvideo15 import hunyuan_qwen_tokenizer

    d = tmp_path_factory.mktemp("hunyuan_qwen")
    hunyuan_qwen_tokenizer(d)
    return str(d)


@pytest.fixture(scope="module")
def pipe(qwen_dir):
    from daamkit.testing.families.hunyuanvideo15 import tiny_hunyuan_video15

    return tiny_hunyuan_video15(qwen_dir)


def run(pipe, prompt=PROMPT, output_type="np", **kw):
    return pipe(prompt, num_inference_steps=2, height=64, width=96, num_frames=9,
                generator=torch.Generator().manual_seed(0), output_type=output_type, **kw).frames


def test_entry(pipe):
    fam, _ = family_of(pipe)
    assert fam.name == "hunyuanvideo15"
    with trace(pipe) as tc:
        assert [(layer.name, layer.block) for layer in tc.layers] == [
            ("transformer_blocks.0.attn", "double"), ("transformer_blocks.1.attn", "double")
        ]


def test_traced_equals_untraced_words_and_time(pipe):
    tc = traced_equals_untraced(pipe, lambda: run(pipe, negative_prompt="blue cat"), negative=True)
    hm = tc.heat_maps(0)
    assert hm.is_video and tuple(hm.maps.shape) == (TEXT, *GRID)
    assert hm.num_frames == 9 and hm.image_size == (64, 96)
    assert hm.time == TimeAxis(3, compression=4, causal=True)
    assert_maps_for_every_word(hm, WORDS)
    # the 108 system-turn ids are cut: the keys start with the prompt
    assert hm.tokens[:8] == ("a", "Ġred", "Ġdog", "Ġon", "Ġa", "Ġwooden", "Ġbench", "<|im_end|>")
    assert [w.positions for w in hm.alignment.words] == [(i,) for i in range(7)]
    # prompt, <|im_end|>, "\n", <|im_start|>, "assistant", "\n" are the valid Qwen keys; past them the
    # key slice holds masked tokens, which get nothing
    assert (hm.maps[:12].flatten(1).sum(1) > 0).all() and hm.maps[12:].abs().max() == 0
    neg = tc.heat_maps(0, branch="negative")
    assert neg.words == ["blue", "cat"] and neg.word("cat").positions == (1,)


def _hand(pipe, token, lead, frames=(1, 2), token_of=None):
    """Token ``token`` of the Qwen keys, which start ``lead`` tokens into the packed conditions."""
    return CrossHandSet(
        pipe.transformer, GRID, token, queries=[(SITE, "to_q", 0)], keys=[(SITE, "add_k_proj", lead)],
        dim=6,  # the slowest rotary pair (columns): dims 0-1 turn a radian per frame
        frames=frames, token_of=token_of,
    )


def test_hand_set_token_after_the_glyph_tokens_owns_a_region_in_some_frames(pipe):
    token = 6  # "star" after "a", "photo", "of", " ", '"', "red"
    hand = _hand(pipe, token, GLYPH)
    try:
        with trace(pipe) as tc:
            run(pipe, QUOTED)
            hm = tc.heat_maps(0)
    finally:
        hand.remove()
    assert hm.word("star").positions == (token,)
    assert_peaks_in_region(hm.maps, token, hand.mask)
    scores = hm.word("star").frame_scores()
    own = [1, 2, 3, 4]  # the video frames of token frame 1
    assert [f for f in hm.time.index()] == [0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert min(scores[i] for i in own) > 5 * max(s for i, s in enumerate(scores) if i not in own)


# a query's probabilities are 4 heads x 1000 keys x 4 bytes: 0.05 MiB holds 3 of a frame's 24 queries
def test_chunked_delivery_gives_the_same_maps(pipe):
    with trace(pipe) as tc:
        run(pipe, QUOTED)
        ref = tc.heat_maps(0).maps
    with trace(pipe, chunk_mib=0.05) as tc:
        run(pipe, QUOTED)
        maps = tc.heat_maps(0).maps
    torch.testing.assert_close(maps, ref, rtol=1e-6, atol=0)


def test_probabilities_match_a_recomputation_for_rows_packed_differently(pipe):
    """Two prompts in one call: the first has glyph text, so its Qwen keys sit GLYPH tokens later."""
    from diffusers.models.embeddings import apply_rotary_emb

    layer = "transformer_blocks.1.attn"
    m = pipe.transformer.get_submodule(layer)
    seen = {}

    def pre(mod, args, kwargs):
        seen.setdefault("attn", kwargs)

    def top(mod, args, kwargs):
        seen.setdefault("denoiser", kwargs)

    handles = [m.register_forward_pre_hook(pre, with_kwargs=True),
               pipe.transformer.register_forward_pre_hook(top, with_kwargs=True)]
    try:
        with torch.no_grad(), trace(pipe, steps=[0], layers=[layer]) as tc:
            # the VAE's attention fails on a batch of two videos: the maps need no decoding
            run(pipe, [QUOTED, PROMPT], output_type="latent")
            maps = [tc.heat_maps(i).maps for i in range(2)]
    finally:
        for h in handles:
            h.remove()
    kw, top_kw = seen["attn"], seen["denoiser"]
    glyph = top_kw["encoder_attention_mask_2"].sum(1).tolist()
    qwen = top_kw["encoder_attention_mask"].sum(1).long().tolist()
    assert glyph == [GLYPH, 0]
    with torch.no_grad():
        q = m.norm_q(m.to_q(kw["hidden_states"]).unflatten(2, (m.heads, -1)))
        q = apply_rotary_emb(q, kw["image_rotary_emb"], sequence_dim=1).transpose(1, 2)
        k = m.norm_added_k(m.add_k_proj(kw["encoder_hidden_states"]).unflatten(2, (m.heads, -1))).transpose(1, 2)
    for row in range(2):
        keys = k[row, :, int(glyph[row]): int(glyph[row]) + qwen[row]]
        probs = ((q[row] @ keys.transpose(-1, -2)) * q.shape[-1] ** -0.5).softmax(-1)
        expected = probs.mean(0).T.reshape(-1, *GRID)
        torch.testing.assert_close(maps[row][: qwen[row]], expected, rtol=1e-4, atol=1e-7)
        assert maps[row][qwen[row]:].abs().max() == 0


@pytest.fixture(scope="module")
def i2v(qwen_dir):
    from daamkit.testing.families.hunyuanvideo15 import tiny_hunyuan_video15_i2v

    return tiny_hunyuan_video15_i2v(qwen_dir)


def test_image_to_video_skips_the_image_tokens(i2v):
    """I2V: 16 SigLIP tokens lead the conditions (not text keys); the conditioning image enters the
    latents as channels of frame 0, so every video token stays a query."""
    from PIL import Image

    image = Image.fromarray((np.random.RandomState(0).rand(64, 96, 3) * 255).astype("uint8"))
    grid = (3, 3, 4)  # the pipeline sizes the video from the image and target_size 64: 48x64 px

    def call():
        return i2v(image=image, prompt=PROMPT, num_inference_steps=2, num_frames=9,
                   generator=torch.Generator().manual_seed(0), output_type="np").frames

    tc = traced_equals_untraced(i2v, call)
    hm = tc.heat_maps(0)
    assert tuple(hm.maps.shape) == (TEXT, *grid) and hm.num_frames == 9 and hm.image_size == (48, 64)
    assert_maps_for_every_word(hm, WORDS)
    token = 2  # "dog"
    hand = CrossHandSet(i2v.transformer, grid, token, queries=[(SITE, "to_q", 0)], keys=[(SITE, "add_k_proj", 16)],
                        dim=6, frames=(0, 1))
    try:
        with trace(i2v) as tc:
            call()
            hm = tc.heat_maps(0)
    finally:
        hand.remove()
    assert_peaks_in_region(hm.maps, token, hand.mask)
