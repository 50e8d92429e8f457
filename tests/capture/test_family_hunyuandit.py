"""HunyuanDiT (``HunyuanDiT2DModel``): cross-attention ``blocks.N.attn2`` over [BERT (77) | mT5 (256)] keys
whose padding holds a learned vector (attended, never masked); queries carry the image RoPE."""

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
WORDS = ["a", "red", "dog", "sitting", "on", "wooden", "bench"]
SITE = r"blocks\.\d+\.attn2"
GRID = (4, 6)  # 64x96 px: 16 px per token side (VAE factor 8, patch 2)
BERT = 77


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from daamkit.testing.families.hunyuandit import bert_tokenizer, mt5_tokenizer, tiny_hunyuandit

    bert, mt5 = tmp_path_factory.mktemp("bert"), tmp_path_factory.mktemp("mt5")
    bert_tokenizer(bert)
    mt5_tokenizer(mt5)
    return tiny_hunyuandit(str(bert), str(mt5))


def run(pipe, prompt=PROMPT, h=64, w=96, steps=2, binning=False, **kw):
    return pipe(prompt, num_inference_steps=steps, height=h, width=w, use_resolution_binning=binning,
                generator=torch.Generator().manual_seed(0), output_type="np", **kw).images


def test_traced_equals_untraced_and_words_pool_both_encoders(pipe):
    assert family_of(pipe)[0].name == "hunyuandit"
    tc = traced_equals_untraced(pipe, lambda: run(pipe, negative_prompt="blue cat"), negative=True)
    assert [layer.name for layer in tc.layers] == [f"blocks.{i}.attn2" for i in range(4)]
    assert tc.num_steps == 2 and tc.generation.timesteps[0] > tc.generation.timesteps[1]  # positional timestep
    hm = tc.heat_maps(0)
    assert hm.image_size == (64, 96) and tuple(hm.maps.shape) == (BERT + 256, *GRID)
    assert_maps_for_every_word(hm, WORDS)
    # each word: its BERT position (after [CLS]) and its mT5 position (from 77 on)
    assert [w.positions for w in hm.alignment.words] == [(1 + i, BERT + i) for i in range(8)]
    assert hm.tokens[:3] == ("[CLS]", "a", "red") and hm.tokens[9] == "[SEP]"
    assert hm.tokens[BERT: BERT + 3] == ("▁A", "▁Red", "▁dog") and hm.tokens[BERT + 8] == "</s>"
    dog = hm.word("dog")
    torch.testing.assert_close(dog.value, hm.maps[[3, BERT + 2]].mean(0))
    # padding keys are the learned padding vector, attended like any key
    assert hm.maps[10:BERT].sum() > 0 and hm.maps[BERT + 9:].sum() > 0
    assert tc.heat_maps(0, branch="negative").words == ["blue", "cat"]


def test_restored_after_an_exception_in_the_step_callback(pipe):
    before = pipeline_state(pipe)

    def boom(p, i, t, kw):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), trace(pipe):
        run(pipe, callback_on_step_end=boom)
    assert_restored(pipe, before)


@pytest.mark.parametrize("token", [3, BERT + 2])  # "dog" in the BERT part and in the mT5 part
def test_hand_set_token_owns_a_region(pipe, token):
    # the query vector sits on dimension 2, a slow pair of the row RoPE (queries carry RoPE, keys do not)
    hand = CrossHandSet(pipe.transformer, GRID, token, [(SITE, "to_q", 0)], [(SITE, "to_k", 0)], dim=2)
    try:
        with trace(pipe) as tc:
            run(pipe)
            hm = tc.heat_maps(0)
    finally:
        hand.remove()
    assert token in hm.word("dog").positions
    assert_peaks_in_region(hm.maps, token, hand.mask)


def _prepare(m, q, k, kwargs):
    # HunyuanAttnProcessor2_0: head split, per-head LayerNorm, RoPE on the (image) queries only
    from diffusers.models.embeddings import apply_rotary_emb

    q, k = m.norm_q(split_heads(q, m.heads)), m.norm_k(split_heads(k, m.heads))
    return apply_rotary_emb(q, kwargs["image_rotary_emb"]), k


@pytest.mark.parametrize("probabilities", ["text", "model"])
def test_probabilities_match_a_recomputation(pipe, probabilities):
    layer = "blocks.3.attn2"  # the block with the long skip
    oracle = CrossOracle(pipe.transformer.get_submodule(layer), _prepare)
    try:
        with trace(pipe, steps=[0], layers=[layer], probabilities=probabilities) as tc:
            run(pipe, negative_prompt="blue cat")
            maps = tc.heat_maps(0).maps
    finally:
        oracle.remove()
    torch.testing.assert_close(maps, expected_maps(oracle.calls[0], 1, GRID), rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(maps.sum(0), torch.ones(GRID), rtol=1e-4, atol=1e-4)  # no key is masked


def test_cfg_rows_and_a_batch_of_prompts(pipe):
    # rows [neg 0, neg 1, cond 0, cond 1]: negatives own BERT "blue", image 0 BERT "dog", image 1 mT5 "cat"
    def token_of(r, b):
        n = b // 2
        return 1 if r < n else (2, BERT + 2)[r - n]

    hand = CrossHandSet(pipe.transformer, GRID, 0, [(SITE, "to_q", 0)], [(SITE, "to_k", 0)], token_of=token_of, dim=2)
    try:
        with trace(pipe, negative=True) as tc:
            run(pipe, prompt=["a dog sitting", "a red cat sitting"], negative_prompt=["blue cat"] * 2)
            maps = [tc.heat_maps(i) for i in range(2)]
            neg = tc.heat_maps(1, branch="negative")
    finally:
        hand.remove()
    inside = hand.mask.reshape(GRID)
    assert [int(hm.maps[:, inside].mean(-1).argmax()) for hm in maps] == [2, BERT + 2]
    assert int(neg.maps[:, inside].mean(-1).argmax()) == 1
    assert maps[0].words == ["a", "dog", "sitting"] and maps[1].words == ["a", "red", "cat", "sitting"]
    assert maps[1].word("cat").positions == (3, BERT + 2)


def test_resolution_binning_returns_the_bin(pipe, monkeypatch):
    """HunyuanDiT generates at the standard shape and returns it as it is: the maps cover the image.
    Tiny standard shapes keep it cheap: 64x80 requested -> 64x96 (4:3)."""
    import diffusers.pipelines.hunyuandit.pipeline_hunyuandit as module

    shapes = [[(64, 64)], [(96, 64)], [(64, 96)], [(112, 64)], [(64, 112)]]  # (width, height)
    monkeypatch.setattr(module, "STANDARD_SHAPE", shapes)
    monkeypatch.setattr(module, "STANDARD_AREA", [np.array([w * h for w, h in s]) for s in shapes])
    tc = traced_equals_untraced(pipe, lambda: run(pipe, h=64, w=80, binning=True))
    hm = tc.heat_maps(0)
    assert hm.image_size == (64, 96) and tuple(hm.maps.shape[-2:]) == GRID
    assert "generated_size" not in hm.meta


def test_wordpiece_words_pool_their_pieces_in_both_parts(pipe):
    """BERT marks a word's continuation (``##``), not its start; mT5 the start (``▁``): the same words."""
    with trace(pipe) as tc:
        run(pipe, prompt="two dogs on a benchdog", steps=1)
        hm = tc.heat_maps(0)
    assert hm.tokens[1:4] == ("t", "##w", "##o") and hm.tokens[7:11] == ("bench", "##d", "##o", "##g")
    assert hm.words == ["two", "dogs", "on", "a", "benchdog"]
    assert hm.word("two").positions == (1, 2, 3, BERT, BERT + 1, BERT + 2, BERT + 3)
    assert hm.word("benchdog").positions == (7, 8, 9, 10, BERT + 7, BERT + 8, BERT + 9, BERT + 10)
