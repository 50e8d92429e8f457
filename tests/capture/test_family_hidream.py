"""HiDream-I1: keys [image (padded to the model's maximum for non-square sizes), T5, Llama last layer, Llama
layer of the block], attention called with positional arguments, CFG batched [uncond, cond]."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.transformers.transformer_hidream_image import apply_rope
from family_checks import (
    HandSet,
    assert_maps_for_every_word,
    assert_peaks_in_region,
    assert_restored,
    pipeline_state,
    traced_equals_untraced,
)

from daamkit import trace
from daamkit.testing.families.hidream import llama3_tokenizer, tiny_hidream

PROMPT = "a red dog on a bench"
WORDS = ["a", "red", "dog", "on", "bench"]
L = 16  # max_sequence_length here: T5 and Llama ids are padded to it
TEXT = 3 * L  # [T5, Llama last, Llama of the block]
GRID = (13, 19)  # 32x48 asked, 26x38 made (the pipeline keeps its area), VAE scale 1, patch 2
DOUBLE, SINGLE = r"double_stream_blocks\.\d+\.block\.attn1", r"single_stream_blocks\.\d+\.block\.attn1"
NORMS = ("q_rms_norm", "k_rms_norm", "q_rms_norm_t", "k_rms_norm_t")


@pytest.fixture(scope="module")
def pipe(tmp_path_factory, clip_tokenizer_dir, clip_tokenizer_2_dir, t5_tokenizer_dir):
    d = tmp_path_factory.mktemp("llama3")
    llama3_tokenizer(d)
    return tiny_hidream(clip_tokenizer_dir, clip_tokenizer_2_dir, t5_tokenizer_dir, d)


def run(pipe, prompt=PROMPT, steps=2, h=32, w=48, **kw):
    kw.setdefault("guidance_scale", 1.0)
    kw.setdefault("max_sequence_length", L)
    return pipe(prompt, num_inference_steps=steps, height=h, width=w, generator=torch.Generator().manual_seed(0),
                output_type="np", **kw)


def test_traced_images_identical_and_pipeline_restored_also_after_an_error(pipe):
    tc = traced_equals_untraced(pipe, lambda: run(pipe, guidance_scale=3.0, negative_prompt="blurry"))
    assert tc.num_steps == 2 and tc.generation.cfg
    assert sorted(tc.generation.accumulator.layers) == [
        "double_stream_blocks.0.block.attn1", "double_stream_blocks.1.block.attn1",
        "single_stream_blocks.0.block.attn1", "single_stream_blocks.1.block.attn1",
    ]
    before = pipeline_state(pipe)

    def boom(p, i, t, kw):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"), trace(pipe):
        run(pipe, guidance_scale=3.0, callback_on_step_end=boom)
    assert_restored(pipe, before)


def test_words_pool_the_t5_and_both_llama_parts(pipe):
    with trace(pipe) as tc:
        run(pipe, steps=1, h=32, w=32, max_sequence_length=128)  # the pipeline's default length
        hm = tc.heat_maps(0)
    assert_maps_for_every_word(hm, WORDS)
    assert hm.maps.shape[0] == 3 * 128 and hm.image_size == (32, 32)
    dog = hm.word("dog").positions
    assert dog == (2, 128 + 3, 256 + 3)  # T5 has no BOS; Llama starts with <|begin_of_text|>
    assert [hm.tokens[p] for p in dog] == ["▁dog", "Ġdog", "Ġdog"]
    assert hm.tokens[128] == hm.tokens[256] == "<|begin_of_text|>" and hm.tokens[255] == "<|eot_id|>"
    torch.testing.assert_close(hm.word("dog").value, hm.maps[list(dog)].mean(0))


@pytest.mark.parametrize("blocks", ["double", "single"])
def test_hand_set_token_owns_its_region(pipe, blocks):
    if blocks == "double":  # image queries (padded to the model's maximum), text keys in the text stream
        queries, keys = [(DOUBLE, "to_q", 0)], [(DOUBLE, "to_k_t", 0)]
    else:  # one [image, padding, text] sequence
        queries, keys = [(SINGLE, "to_q", 0)], [(SINGLE, "to_k", lambda n: n - TEXT)]
    # "dog" in T5; head dims 0-3 turn with the first position id, 0 for every token: RoPE keeps the score
    hand = HandSet(pipe.transformer, GRID, token=2, queries=queries, keys=keys, norms=NORMS)
    try:
        with trace(pipe, layers=[blocks]) as tc:
            run(pipe, guidance_scale=3.0)
            hm = tc.heat_maps(0)
    finally:
        hand.remove()
    assert tuple(hm.maps.shape[-2:]) == GRID and hm.image_size == (26, 38)
    assert hm.maps.shape[0] == TEXT
    assert_peaks_in_region(hm.maps, 2, hand.mask)


def test_each_block_reads_its_own_llama_part_at_the_same_positions(pipe):
    """The last L keys are a different Llama layer's projection in every block; the hand-set key of
    block 0 sits in T5, that of block 1 in its own Llama part."""
    block_0 = HandSet(pipe.transformer, GRID, token=2, queries=[(r"double_stream_blocks\.0\.block\.attn1", "to_q", 0)],
                      keys=[(r"double_stream_blocks\.0\.block\.attn1", "to_k_t", 0)], norms=NORMS)
    block_1 = HandSet(pipe.transformer, GRID, token=2 * L + 3,
                      queries=[(r"double_stream_blocks\.1\.block\.attn1", "to_q", 0)],
                      keys=[(r"double_stream_blocks\.1\.block\.attn1", "to_k_t", 0)], norms=NORMS,
                      region=(0.5, 1.0, 0.0, 0.5))
    try:
        with trace(pipe, keep_layers=True) as tc:
            run(pipe, steps=1)
            first = tc.heat_maps(0, layers=["double_stream_blocks.0"])
            second = tc.heat_maps(0, layers=["double_stream_blocks.1"])
    finally:
        block_0.remove()
        block_1.remove()
    assert_peaks_in_region(first.maps, 2, block_0.mask)
    assert_peaks_in_region(second.maps, 2 * L + 3, block_1.mask)
    assert second.word("dog").positions == (2, L + 3, 2 * L + 3)


class Oracle:
    """One attention module's image-query x text-key probabilities recomputed from its projections, norms,
    image-padding mask and RoPE."""

    def __init__(self, module):
        self.m, self.calls, self.out = module, [], {}
        self.handles = [module.register_forward_pre_hook(self._pre, with_kwargs=True),
                        module.register_forward_hook(self._post)]
        for attr in ("to_q", "to_k", "to_k_t"):
            if getattr(module, attr, None) is not None:
                self.handles.append(getattr(module, attr).register_forward_hook(self._save(attr)))

    def _pre(self, mod, args, kwargs):
        self.out = {"masks": args[1], "rope": kwargs["image_rotary_emb"]}

    def _save(self, attr):
        def hook(mod, args, out):
            self.out[attr] = out.detach()

        return hook

    def _post(self, mod, args, out):
        m, o, n = self.m, self.out, GRID[0] * GRID[1]
        heads = lambda x: x.unflatten(-1, (m.heads, -1))  # noqa: E731
        q, k = heads(m.q_rms_norm(o["to_q"])), heads(m.k_rms_norm(o["to_k"]))
        if o["masks"] is not None:
            k = k * o["masks"][:, :, None, None]
        if not m.single:
            kt = heads(m.k_rms_norm_t(o["to_k_t"]))
            q = torch.cat([q, torch.zeros_like(kt)], 1)  # placeholders keep the rotary positions
            k = torch.cat([k, kt], 1)
        q, k = apply_rope(q, k, o["rope"])
        scores = torch.einsum("bqhd,bkhd->bhqk", q[:, :n].float(), k.float()) * q.shape[-1] ** -0.5
        self.calls.append({"text": scores[..., -TEXT:].softmax(-1), "model": scores.softmax(-1)[..., -TEXT:],
                           "keys": k.shape[1]})

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("layer", ["double_stream_blocks.0.block.attn1", "single_stream_blocks.1.block.attn1"])
def test_text_and_model_probabilities_match_a_recomputation(pipe, layer):
    module = pipe.transformer.get_submodule(layer)
    maps = {}
    for probabilities in ("text", "model"):
        oracle = Oracle(module)
        try:
            with trace(pipe, steps=[0], layers=[layer], probabilities=probabilities, grid=None) as tc:
                run(pipe, steps=1, guidance_scale=3.0, negative_prompt="blurry")
                maps[probabilities] = tc.heat_maps(0).maps
        finally:
            oracle.remove()
        call = oracle.calls[0]
        assert call["keys"] == (64 // 2) ** 2 + TEXT  # image padded to max_resolution / patch, squared
        assert call[probabilities].shape[0] == 2  # [uncond, cond]
        expected = call[probabilities][1].mean(0).T.reshape(-1, *GRID)
        torch.testing.assert_close(maps[probabilities], expected, rtol=1e-4, atol=1e-7)
    # the model's softmax also spends on the image keys, its zeroed padding included
    assert (maps["model"].sum(0) < maps["text"].sum(0) - 1e-3).all()
    # T5 and Llama padding is not masked: those keys keep probability
    assert (maps["text"][L - 1].sum() > 0) and (maps["text"][2 * L - 1].sum() > 0)


def test_cfg_rows_and_a_batch_of_prompts(pipe):
    prompts = ["a dog", "a red cat on a bench"]
    # row 3 = cond of image 1 in [uncond 0, uncond 1, cond 0, cond 1]: only its T5 key at 1 is set
    hand = HandSet(pipe.transformer, GRID, token=1, queries=[(DOUBLE, "to_q", 0)], keys=[(DOUBLE, "to_k_t", 0)],
                   norms=NORMS, rows=[3])
    try:
        with trace(pipe, negative=True, layers=["double"]) as tc:
            run(pipe, prompt=prompts, steps=1, guidance_scale=3.0, negative_prompt=["blurry", "dark"])
            assert tc.num_images == 2 and tc.generation.cfg
            maps = [tc.heat_maps(i) for i in range(2)]
            negs = [tc.heat_maps(i, branch="negative") for i in range(2)]
    finally:
        hand.remove()
    assert maps[0].words == ["a", "dog"] and maps[1].words == ["a", "red", "cat", "on", "bench"]
    assert negs[0].words == ["blurry"] and negs[1].words == ["dark"]
    assert maps[1].word("red").positions == (1, L + 2, 2 * L + 2)
    assert_peaks_in_region(maps[1].maps, 1, hand.mask)
    inside = hand.mask.reshape(GRID)
    for other in (maps[0], negs[0], negs[1]):
        assert other.maps[1][inside].mean() < 0.2  # zero keys: uniform over the text keys
