"""Sana (``SanaTransformer2DModel``): cross-attention ``attn2`` with the -10000 padding bias, keys
[<bos>, prompt, pad] cut out of the complex human instruction's sequence, resolution binning."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cross_checks import CrossHandSet, CrossOracle, expected_maps, split_heads
from family_checks import (
    assert_maps_for_every_word,
    assert_peaks_in_region,
    assert_restored,
    pipeline_state,
    traced_equals_untraced,
)

from daamkit import trace
from daamkit.capture.families import family_of

PROMPT = "A Red dog sitting on a wooden bench"
WORDS = ["a", "red", "dog", "sitting", "on", "wooden", "bench"]  # the pipeline lower-cases the prompt
SITE = r"transformer_blocks\.\d+\.attn2"
GRID = (16, 32)  # 32x64 px: 2 px per token side (DC-AE factor 2, patch 1); sides must be multiples of 32


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory) -> str:
    from daamkit.testing.families.sana import gemma_tokenizer

    d = tmp_path_factory.mktemp("gemma_tokenizer")
    gemma_tokenizer(d)
    return str(d)


@pytest.fixture(scope="module")
def sana(gemma_dir):
    from daamkit.testing.families.sana import tiny_sana

    return tiny_sana(gemma_dir)


@pytest.fixture(scope="module")
def sana_qk(gemma_dir):
    """Sana 1.5's q/k RMSNorm across heads."""
    from daamkit.testing.families.sana import tiny_sana

    return tiny_sana(gemma_dir, qk_norm="rms_norm_across_heads")


def run(pipe, prompt=PROMPT, h=32, w=64, steps=2, binning=False, **kw):
    return pipe(prompt, num_inference_steps=steps, height=h, width=w, use_resolution_binning=binning,
                generator=torch.Generator().manual_seed(0), output_type="np", **kw).images


def test_entry(sana):
    fam, _ = family_of(sana)
    assert fam.name == "sana"
    with trace(sana) as tc:
        assert [layer.name for layer in tc.layers] == ["transformer_blocks.0.attn2", "transformer_blocks.1.attn2"]
        assert {layer.block for layer in tc.layers} == {"cross"}


def test_traced_equals_untraced_and_words_skip_the_instruction(sana):
    tc = traced_equals_untraced(sana, lambda: run(sana, negative_prompt="blue cat"), negative=True)
    hm = tc.heat_maps(0)
    assert hm.image_size == (32, 64) and tuple(hm.maps.shape) == (300, *GRID)
    assert_maps_for_every_word(hm, WORDS)
    # keys: <bos>, the prompt's own tokens from position 1, then padding; no instruction word anywhere
    assert hm.tokens[:10] == ("<bos>", "▁a", "▁red", "▁dog", "▁sitting", "▁on", "▁a", "▁wooden", "▁bench", "<pad>")
    assert [w.positions for w in hm.alignment.words] == [(i,) for i in range(1, 9)]
    assert "user" not in hm.words and "prompt" not in hm.words
    assert hm.maps[9:].abs().max() == 0  # padding is masked (bias -10000): no probability
    neg = tc.heat_maps(0, branch="negative")  # encoded without the instruction
    assert neg.words == ["blue", "cat"] and neg.word("cat").positions == (2,)


def test_without_the_instruction_the_keys_are_the_prompt(sana):
    with trace(sana) as tc:
        run(sana, complex_human_instruction=None)
        hm = tc.heat_maps(0)
    assert hm.words == WORDS and hm.tokens[:3] == ("<bos>", "a", "▁red")
    assert hm.word("red").positions == (2,)


def test_restored_after_an_exception_in_the_step_callback(sana):
    before = pipeline_state(sana)

    def boom(p, i, t, kw):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), trace(sana):
        run(sana, callback_on_step_end=boom)
    assert_restored(sana, before)
    assert "resize_and_crop_tensor" not in vars(sana.image_processor)


@pytest.mark.parametrize("qk", [False, True])
def test_hand_set_token_owns_a_region(sana, sana_qk, qk):
    pipe = sana_qk if qk else sana
    token = 3  # "dog" after <bos>, "a", "red"
    hand = CrossHandSet(pipe.transformer, GRID, token, queries=[(SITE, "to_q", 0)], keys=[(SITE, "to_k", 0)])
    try:
        with trace(pipe) as tc:
            run(pipe)
            hm = tc.heat_maps(0)
    finally:
        hand.remove()
    assert hm.word("dog").positions == (token,)
    assert_peaks_in_region(hm.maps, token, hand.mask)


def _prepare(m, q, k, kwargs):
    # SanaAttnProcessor2_0: norms on the full inner dim, then the head split
    if m.norm_q is not None:
        q, k = m.norm_q(q), m.norm_k(k)
    return split_heads(q, m.heads), split_heads(k, m.heads)


@pytest.mark.parametrize("probabilities", ["text", "model"])
def test_probabilities_match_a_recomputation(sana_qk, probabilities):
    layer = "transformer_blocks.1.attn2"
    oracle = CrossOracle(sana_qk.transformer.get_submodule(layer), _prepare)
    try:
        with trace(sana_qk, steps=[0], layers=[layer], probabilities=probabilities) as tc:
            run(sana_qk, negative_prompt="blue cat")
            maps = tc.heat_maps(0).maps
    finally:
        oracle.remove()
    assert oracle.calls[0].shape[0] == 2  # [negative, positive]
    torch.testing.assert_close(maps, expected_maps(oracle.calls[0], 1, GRID), rtol=1e-4, atol=1e-7)
    assert maps[9:].abs().max() == 0 and maps[:9].sum(0).sub(1).abs().max() < 1e-4


def test_cfg_rows_and_a_batch_of_prompts(sana):
    # rows [neg 0, neg 1, cond 0, cond 1]: image i's cond row owns token 3 - i, the negative rows token 1
    def token_of(r, b):
        n = b // 2
        return 1 if r < n else 3 - (r - n)

    hand = CrossHandSet(sana.transformer, GRID, 0, [(SITE, "to_q", 0)], [(SITE, "to_k", 0)], token_of=token_of)
    try:
        with trace(sana, negative=True) as tc:
            run(sana, prompt=["a dog sitting", "a red cat sitting"], negative_prompt="blue cat")
            maps = [tc.heat_maps(i) for i in range(2)]
            neg = tc.heat_maps(1, branch="negative")
    finally:
        hand.remove()
    inside = hand.mask.reshape(GRID)
    assert [int(hm.maps[:, inside].mean(-1).argmax()) for hm in maps] == [3, 2]
    assert int(neg.maps[:, inside].mean(-1).argmax()) == 1
    assert maps[0].words == ["a", "dog", "sitting"] and maps[1].words == ["a", "red", "cat", "sitting"]
    assert neg.words == ["blue", "cat"]


def test_resolution_binning_crops_the_maps_as_the_image(sana, monkeypatch):
    """The tokens cover the aspect-ratio bin; the pipeline resizes and centre-crops the decoded image to
    the requested size, and the maps follow. Tiny bins keep it cheap: 32x48 requested -> 32x64 bin."""
    import diffusers.pipelines.sana.pipeline_sana as module

    monkeypatch.setattr(module, "ASPECT_RATIO_1024_BIN", {"0.5": [32.0, 64.0], "1.0": [64.0, 64.0], "2.0": [64.0, 32.0]})
    with trace(sana) as tc:
        full = run(sana, h=32, w=64)
        ref = tc.heat_maps(0)
    before = pipeline_state(sana)
    tc = traced_equals_untraced(sana, lambda: run(sana, h=32, w=48, binning=True))
    assert "resize_and_crop_tensor" not in vars(sana.image_processor)
    assert_restored(sana, before)
    out = run(sana, h=32, w=48, binning=True)
    np.testing.assert_array_equal(out, full[:, :, 8:56])  # the same generation, cropped by 8 px a side
    hm = tc.heat_maps(0)
    assert hm.image_size == out.shape[1:3] == (32, 48)
    assert hm.meta["generated_size"] == [32, 64] and hm.meta["latent_hw"] == list(GRID)
    torch.testing.assert_close(hm.maps, ref.maps[:, :, 4:28], rtol=1e-5, atol=1e-7)  # 4 tokens a side
    assert hm.words == WORDS
