"""AuraFlow: [8 register tokens, text, image] in joint and single-stream blocks, CFG batched [uncond, cond]."""

from __future__ import annotations

import pytest
import torch
from family_checks import (
    HandSet,
    assert_maps_for_every_word,
    assert_peaks_in_region,
    assert_restored,
    pipeline_state,
    traced_equals_untraced,
)

from daamkit import trace
from daamkit.testing.families.auraflow import pile_t5_tokenizer, tiny_auraflow

PROMPT = "a red dog on a bench"
WORDS = ["a", "red", "dog", "on", "bench"]
TEXT = 16  # max_sequence_length in these tests
REGISTERS = 8
GRID = (16, 24)  # 32x48 px: VAE scale 1, patch 2
JOINT, SINGLE = r"joint_transformer_blocks\.\d+\.attn", r"single_transformer_blocks\.\d+\.attn"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    d = tmp_path_factory.mktemp("pile_t5")
    pile_t5_tokenizer(d)
    return tiny_auraflow(d)


def run(pipe, prompt=PROMPT, steps=2, h=32, w=48, **kw):
    kw.setdefault("guidance_scale", 1.0)
    kw.setdefault("max_sequence_length", TEXT)
    return pipe(prompt, num_inference_steps=steps, height=h, width=w, generator=torch.Generator().manual_seed(0),
                output_type="np", **kw)


def test_traced_images_identical_and_pipeline_restored_also_after_an_error(pipe):
    tc = traced_equals_untraced(pipe, lambda: run(pipe, guidance_scale=3.0, negative_prompt="blurry"))
    assert tc.num_steps == 2 and tc.generation.cfg
    assert sorted(tc.generation.accumulator.layers) == [
        "joint_transformer_blocks.0.attn", "single_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"
    ]
    before = pipeline_state(pipe)

    def boom(p, i, t, kw):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"), trace(pipe):
        run(pipe, guidance_scale=3.0, callback_on_step_end=boom)
    assert_restored(pipe, before)


def test_words_index_the_text_keys_after_the_registers(pipe):
    with trace(pipe) as tc:
        run(pipe, steps=1, max_sequence_length=256)  # the pipeline's default length
        hm = tc.heat_maps(0)
    assert_maps_for_every_word(hm, WORDS)
    assert hm.maps.shape[0] == 256  # the registers are no keys of any word
    assert hm.tokens[:7] == ("▁a", "▁red", "▁dog", "▁on", "▁a", "▁bench", "</s>")
    assert set(hm.tokens[7:]) == {"<unk>"}  # the tokenizer's pad (embeddings zeroed by the pipeline)
    assert hm.word("dog").positions == (2,) and hm.word("a").positions == (0, 4)


@pytest.mark.parametrize("blocks", ["joint", "single"])
def test_hand_set_token_owns_its_region(pipe, blocks):
    n = GRID[0] * GRID[1]
    if blocks == "joint":  # image queries alone; text keys after the registers in the added projection
        queries, keys = [(JOINT, "to_q", 0)], [(JOINT, "add_k_proj", REGISTERS)]
    else:  # one [registers, text, image] sequence
        queries, keys = [(SINGLE, "to_q", lambda length: length - n)], [(SINGLE, "to_k", REGISTERS)]
    # q/k LayerNorms have no weight: the other text keys get the opposite vector instead
    hand = HandSet(pipe.transformer, GRID, token=2, queries=queries, keys=keys, text_len=TEXT, others=-1.0)
    try:
        with trace(pipe, layers=[blocks]) as tc:
            run(pipe, guidance_scale=3.0)
            hm = tc.heat_maps(0)
    finally:
        hand.remove()
    assert tuple(hm.maps.shape[-2:]) == GRID and hm.image_size == (32, 48)
    assert_peaks_in_region(hm.maps, 2, hand.mask)


class Oracle:
    """One attention module's image-query x text-key probabilities recomputed from its projections."""

    def __init__(self, module, single):
        self.m, self.single, self.calls, self.out = module, single, [], {}
        self.handles = [module.register_forward_hook(self._post)]
        for attr in ("to_q", "to_k", "add_k_proj"):
            if getattr(module, attr, None) is not None:
                self.handles.append(getattr(module, attr).register_forward_hook(self._save(attr)))

    def _save(self, attr):
        def hook(mod, args, out):
            self.out[attr] = out.detach().unflatten(-1, (self.m.heads, -1))

        return hook

    def _post(self, mod, args, out):
        m, n = self.m, GRID[0] * GRID[1]
        q, k = m.norm_q(self.out["to_q"]), m.norm_k(self.out["to_k"])
        if self.single:
            q = q[:, -n:]
        else:
            k = torch.cat([m.norm_added_k(self.out["add_k_proj"]), k], 1)
        text = slice(REGISTERS, REGISTERS + TEXT)
        scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * q.shape[-1] ** -0.5
        self.calls.append({"text": scores[..., text].softmax(-1), "model": scores.softmax(-1)[..., text]})

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("layer", ["joint_transformer_blocks.0.attn", "single_transformer_blocks.1.attn"])
def test_text_and_model_probabilities_match_a_recomputation(pipe, layer):
    module = pipe.transformer.get_submodule(layer)
    maps = {}
    for probabilities in ("text", "model"):
        oracle = Oracle(module, single=layer.startswith("single"))
        try:
            with trace(pipe, steps=[0], layers=[layer], probabilities=probabilities, grid=None) as tc:
                run(pipe, steps=1, guidance_scale=3.0, negative_prompt="blurry")
                maps[probabilities] = tc.heat_maps(0).maps
        finally:
            oracle.remove()
        p = oracle.calls[0][probabilities]
        assert p.shape[0] == 2  # [uncond, cond]
        expected = p[1].mean(0).T.reshape(-1, *GRID)
        torch.testing.assert_close(maps[probabilities], expected, rtol=1e-4, atol=1e-7)
    # the model's softmax also spends on the registers and the image keys
    assert (maps["model"].sum(0) < maps["text"].sum(0) - 1e-3).all()
    # the padded text keys are zero vectors, not masked: they keep probability
    assert (maps["text"][7:].sum((1, 2)) > 0).all()


def test_cfg_rows_and_a_batch_of_prompts(pipe):
    prompts = ["a dog", "a red cat on a bench"]
    # row 3 = cond of image 1 in [uncond 0, uncond 1, cond 0, cond 1]: only its key at 1 is set
    hand = HandSet(pipe.transformer, GRID, token=1, queries=[(JOINT, "to_q", 0)],
                   keys=[(JOINT, "add_k_proj", REGISTERS)], text_len=TEXT, others=-1.0, rows=[3])
    try:
        with trace(pipe, negative=True, layers=["joint"]) as tc:
            run(pipe, prompt=prompts, steps=1, guidance_scale=3.0, negative_prompt=["blurry", "dark"])
            assert tc.num_images == 2 and tc.generation.cfg
            maps = [tc.heat_maps(i) for i in range(2)]
            negs = [tc.heat_maps(i, branch="negative") for i in range(2)]
    finally:
        hand.remove()
    assert maps[0].words == ["a", "dog"] and maps[1].words == ["a", "red", "cat", "on", "bench"]
    assert negs[0].words == ["blurry"] and negs[1].words == ["dark"]
    assert_peaks_in_region(maps[1].maps, 1, hand.mask)
    inside = hand.mask.reshape(GRID)
    for other in (maps[0], negs[0], negs[1]):
        assert other.maps[1][inside].mean() < 0.2  # zero keys: a uniform 1/16
