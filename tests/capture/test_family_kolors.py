"""Kolors (``KolorsPipeline``): an SDXL-style UNet traced by the ``unet`` entry, whose keys are ChatGLM's 256
tokens, left-padded, with ``[gMASK] sop`` before the prompt and no mask on the padding."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cross_checks import CrossHandSet, CrossOracle, expected_maps
from family_checks import (
    assert_maps_for_every_word,
    assert_peaks_in_region,
    assert_restored,
    pipeline_state,
    traced_equals_untraced,
)

from daamkit import trace
from daamkit.capture.families import family_of
from daamkit.tokens import align

PROMPT = "A Red dog sitting on a wooden bench"
WORDS = ["a", "red", "dog", "sitting", "on", "wooden", "bench"]
SITE = r".*\.attn2"
GRID = (16, 24)  # 64x96 px, latent 32x48 (VAE factor 2); every cross-attention of the tiny UNet is at 1/2


@pytest.fixture(scope="module")
def chatglm_dir(tmp_path_factory) -> str:
    from daamkit.testing.families.kolors import chatglm_tokenizer

    d = tmp_path_factory.mktemp("chatglm_tokenizer")
    chatglm_tokenizer(d)
    return str(d)


@pytest.fixture(scope="module")
def pipe(chatglm_dir):
    from daamkit.testing.families.kolors import tiny_kolors

    return tiny_kolors(chatglm_dir)


def run(pipe, prompt=PROMPT, h=64, w=96, steps=2, **kw):
    return pipe(prompt, num_inference_steps=steps, height=h, width=w, generator=torch.Generator().manual_seed(0),
                output_type="np", **kw).images


def test_chatglm_alignment_skips_left_padding_and_the_glm_prefix(pipe):
    tok = pipe.tokenizer
    ids = tok(PROMPT, padding="max_length", max_length=16, truncation=True).input_ids
    assert tok.convert_ids_to_tokens(ids)[5:8] == ["", "[gMASK]", "sop"]
    for prompt in (None, PROMPT):  # read off the ids, or re-tokenized from the prompt (no offsets here)
        a = align(tok, ids, prompt)
        assert [w.text for w in a.words] == ["a", "red", "dog", "sitting", "on", "a", "wooden", "bench"]
        assert [w.positions for w in a.words] == [(i,) for i in range(8, 16)]


def test_traced_equals_untraced_and_words_at_the_end_of_the_keys(pipe):
    fam, _ = family_of(pipe)
    assert fam.name == "unet" and "KolorsPipeline" in fam.pipelines
    tc = traced_equals_untraced(pipe, lambda: run(pipe, negative_prompt="blue cat"), negative=True)
    hm = tc.heat_maps(0)
    assert hm.image_size == (64, 96) and tuple(hm.maps.shape) == (256, 32, 48)
    assert_maps_for_every_word(hm, WORDS)
    # left padding, [gMASK] sop, then the prompt's 8 tokens as the last keys
    assert [w.positions for w in hm.alignment.words] == [(248 + i,) for i in range(8)]
    assert hm.tokens[246:249] == ("[gMASK]", "sop", "▁A")
    assert hm.maps[:246].sum() > 0  # no mask: the padding keys take attention too
    neg = tc.heat_maps(0, branch="negative")
    assert neg.words == ["blue", "cat"] and neg.word("cat").positions == (255,)
    assert tc.heat_maps(0, prompt=PROMPT).alignment.words == hm.alignment.words


def test_prompt_embeds_with_the_prompt_given(pipe):
    emb, _, pooled, _ = pipe.encode_prompt(PROMPT, device="cpu", do_classifier_free_guidance=False)
    with trace(pipe) as tc:
        pipe(prompt_embeds=emb, pooled_prompt_embeds=pooled, num_inference_steps=1, height=64, width=96,
             guidance_scale=1.0, output_type="np")
        hm = tc.heat_maps(0, prompt=PROMPT)
    assert hm.words == WORDS and hm.word("bench").positions == (255,)


def test_restored_after_an_exception_in_the_step_callback(pipe):
    before = pipeline_state(pipe)

    def boom(p, i, t, kw):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), trace(pipe):
        run(pipe, callback_on_step_end=boom)
    assert_restored(pipe, before)


def test_hand_set_token_owns_a_region(pipe):
    token = 250  # "dog"
    hand = CrossHandSet(pipe.unet, GRID, token, [(SITE, "to_q", 0)], [(SITE, "to_k", 0)])
    try:
        with trace(pipe, grid=GRID) as tc:
            run(pipe)
            hm = tc.heat_maps(0)
    finally:
        hand.remove()
    assert hm.word("dog").positions == (token,)
    assert_peaks_in_region(hm.maps, token, hand.mask)


@pytest.mark.parametrize("probabilities", ["text", "model"])
def test_probabilities_match_a_recomputation(pipe, probabilities):
    layer = "up_blocks.0.attentions.1.transformer_blocks.0.attn2"
    oracle = CrossOracle(pipe.unet.get_submodule(layer))
    try:
        with trace(pipe, steps=[0], layers=[layer], grid=GRID, probabilities=probabilities) as tc:
            run(pipe, negative_prompt="blue cat")
            maps = tc.heat_maps(0).maps
    finally:
        oracle.remove()
    torch.testing.assert_close(maps, expected_maps(oracle.calls[0], 1, GRID), rtol=1e-4, atol=1e-7)


def test_cfg_rows_and_a_batch_of_prompts(pipe):
    # rows [neg 0, neg 1, cond 0, cond 1]: negatives own "cat" (255), image 0 "dog" (254), image 1 "red" (253)
    def token_of(r, b):
        n = b // 2
        return 255 if r < n else (254, 253)[r - n]

    hand = CrossHandSet(pipe.unet, GRID, 0, [(SITE, "to_q", 0)], [(SITE, "to_k", 0)], token_of=token_of)
    try:
        with trace(pipe, negative=True, grid=GRID) as tc:
            run(pipe, prompt=["a dog sitting", "a red cat sitting"], negative_prompt=["blue cat"] * 2, steps=1)
            maps = [tc.heat_maps(i) for i in range(2)]
            neg = tc.heat_maps(1, branch="negative")
    finally:
        hand.remove()
    inside = hand.mask.reshape(GRID)
    assert [int(hm.maps[:, inside].mean(-1).argmax()) for hm in maps] == [254, 253]
    assert int(neg.maps[:, inside].mean(-1).argmax()) == 255
    assert maps[0].words == ["a", "dog", "sitting"] and maps[1].words == ["a", "red", "cat", "sitting"]
    assert maps[1].word("red").positions == (253,) and neg.words == ["blue", "cat"]


def test_img2img(pipe):
    from diffusers import KolorsImg2ImgPipeline

    i2i = KolorsImg2ImgPipeline(**pipe.components)
    i2i.set_progress_bar_config(disable=True)
    image = np.random.default_rng(0).random((1, 64, 96, 3)).astype(np.float32)
    tc = traced_equals_untraced(i2i, lambda: run(i2i, image=image, strength=1.0))
    hm = tc.heat_maps(0)
    assert hm.image_size == (64, 96)
    assert_maps_for_every_word(hm, WORDS)
    assert hm.word("bench").positions == (255,)
