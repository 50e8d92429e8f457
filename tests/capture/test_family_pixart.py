"""PixArt-α and PixArt-Σ (``PixArtTransformer2DModel``): cross-attention ``attn2`` over T5 keys with the
padding masked (bias -10000), resolution binning."""

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

PROMPT = "A Red dog sitting on a wooden bench"
WORDS = ["a", "red", "dog", "sitting", "on", "wooden", "bench"]  # the pipeline lower-cases the prompt
SITE = r"transformer_blocks\.\d+\.attn2"
GRID = (8, 12)  # 32x48 px: 4 px per token side (VAE factor 2, patch 2)
KINDS = ["alpha", "sigma"]


@pytest.fixture(scope="module")
def pipes(t5_tokenizer_dir):
    from daamkit.testing.families.pixart import tiny_pixart_alpha, tiny_pixart_sigma

    return {"alpha": tiny_pixart_alpha(t5_tokenizer_dir), "sigma": tiny_pixart_sigma(t5_tokenizer_dir)}


def run(pipe, prompt=PROMPT, h=32, w=48, steps=2, binning=False, **kw):
    kw.setdefault("clean_caption", False)  # without bs4/ftfy the cleaning is lower() + strip() anyway
    return pipe(prompt, num_inference_steps=steps, height=h, width=w, use_resolution_binning=binning,
                generator=torch.Generator().manual_seed(0), output_type="np", **kw).images


@pytest.mark.parametrize("kind", KINDS)
def test_traced_equals_untraced_and_words(pipes, kind):
    pipe = pipes[kind]
    assert family_of(pipe)[0].name == "pixart"
    tc = traced_equals_untraced(pipe, lambda: run(pipe, negative_prompt="blue cat"), negative=True)
    hm = tc.heat_maps(0)
    assert [layer.name for layer in tc.layers] == ["transformer_blocks.0.attn2", "transformer_blocks.1.attn2"]
    assert hm.image_size == (32, 48) and tuple(hm.maps.shape) == ({"alpha": 120, "sigma": 300}[kind], *GRID)
    assert_maps_for_every_word(hm, WORDS)
    # T5 keys: the prompt's tokens from position 0, </s>, then masked padding
    assert [w.positions for w in hm.alignment.words] == [(i,) for i in range(8)]
    assert hm.tokens[7:10] == ("▁bench", "</s>", "<pad>")
    assert hm.maps[8].sum() > 0 and hm.maps[9:].abs().max() == 0
    assert tc.heat_maps(0, branch="negative").words == ["blue", "cat"]


@pytest.mark.parametrize("kind", KINDS)
def test_restored_after_an_exception_in_the_step_callback(pipes, kind):
    pipe = pipes[kind]
    before = pipeline_state(pipe)

    def boom(step, t, latents):  # PixArt has the older per-step ``callback``
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), trace(pipe):
        run(pipe, callback=boom)
    assert_restored(pipe, before)
    assert "resize_and_crop_tensor" not in vars(pipe.image_processor)


@pytest.mark.parametrize("kind", KINDS)
def test_hand_set_token_owns_a_region(pipes, kind):
    pipe = pipes[kind]
    token = 2  # "dog"
    hand = CrossHandSet(pipe.transformer, GRID, token, [(SITE, "to_q", 0)], [(SITE, "to_k", 0)])
    try:
        with trace(pipe) as tc:
            run(pipe)
            hm = tc.heat_maps(0)
    finally:
        hand.remove()
    assert hm.word("dog").positions == (token,)
    assert_peaks_in_region(hm.maps, token, hand.mask)


@pytest.mark.parametrize("probabilities", ["text", "model"])
def test_probabilities_match_a_recomputation(pipes, probabilities):
    pipe = pipes["sigma"]
    layer = "transformer_blocks.0.attn2"
    oracle = CrossOracle(pipe.transformer.get_submodule(layer))  # AttnProcessor2_0, no q/k norms
    try:
        with trace(pipe, steps=[0], layers=[layer], probabilities=probabilities) as tc:
            run(pipe, negative_prompt="blue cat")
            maps = tc.heat_maps(0).maps
    finally:
        oracle.remove()
    torch.testing.assert_close(maps, expected_maps(oracle.calls[0], 1, GRID), rtol=1e-4, atol=1e-7)
    assert maps[9:].abs().max() == 0


def test_cfg_rows_and_a_batch_of_prompts(pipes):
    pipe = pipes["alpha"]

    def token_of(r, b):  # rows [neg 0, neg 1, cond 0, cond 1]
        n = b // 2
        return 0 if r < n else 2 - (r - n)

    hand = CrossHandSet(pipe.transformer, GRID, 0, [(SITE, "to_q", 0)], [(SITE, "to_k", 0)], token_of=token_of)
    try:
        with trace(pipe, negative=True) as tc:
            run(pipe, prompt=["a dog sitting", "a red cat sitting"], negative_prompt="blue cat")
            maps = [tc.heat_maps(i) for i in range(2)]
            neg = tc.heat_maps(1, branch="negative")
    finally:
        hand.remove()
    inside = hand.mask.reshape(GRID)
    assert [int(hm.maps[:, inside].mean(-1).argmax()) for hm in maps] == [2, 1]
    assert int(neg.maps[:, inside].mean(-1).argmax()) == 0
    assert maps[0].words == ["a", "dog", "sitting"] and maps[1].words == ["a", "red", "cat", "sitting"]


@pytest.mark.parametrize("kind", KINDS)
def test_resolution_binning_crops_the_maps_as_the_image(pipes, kind, monkeypatch):
    """Tiny bins keep it cheap: 32x48 requested -> the 32x64 bin, centre-cropped by 8 px (2 tokens) a side."""
    import diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha as alpha
    import diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma as sigma

    bins = {"0.5": [32.0, 64.0], "1.0": [48.0, 48.0], "2.0": [64.0, 32.0]}
    monkeypatch.setattr(alpha if kind == "alpha" else sigma, "ASPECT_RATIO_1024_BIN", bins)
    pipe = pipes[kind]
    with trace(pipe) as tc:
        full = run(pipe, h=32, w=64)
        ref = tc.heat_maps(0)
    tc = traced_equals_untraced(pipe, lambda: run(pipe, binning=True))
    assert "resize_and_crop_tensor" not in vars(pipe.image_processor)
    out = run(pipe, binning=True)
    np.testing.assert_array_equal(out, full[:, :, 8:56])  # the same generation (α: the bin's resolution), cropped
    hm = tc.heat_maps(0)
    assert hm.image_size == out.shape[1:3] == (32, 48)
    assert hm.meta["generated_size"] == [32, 64] and tuple(hm.maps.shape[-2:]) == (8, 12)
    torch.testing.assert_close(hm.maps, ref.maps[:, :, 2:14], rtol=1e-5, atol=1e-7)
