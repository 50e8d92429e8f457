"""Lumina-Image 2.0: each sample packed as [its caption, image, zeros], a system prompt before the prompt,
cond and uncond as separate calls (the uncond one dropped past ``cfg_trunc_ratio``)."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb
from family_checks import (
    HandSet,
    assert_maps_for_every_word,
    assert_peaks_in_region,
    assert_restored,
    pipeline_state,
    traced_equals_untraced,
)

from daamkit import trace
from daamkit.testing.families.lumina2 import gemma_tokenizer, tiny_lumina2

PROMPT = "a red dog on a bench"
WORDS = ["a", "red", "dog", "on", "bench"]
GRID = (4, 6)  # 64x96 px: the pipeline's VAE factor 8, patch 2
LAYER = "layers.0.attn"
SITE = r"layers\.\d+\.attn"
HEAD_DIM = 8


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    d = tmp_path_factory.mktemp("gemma")
    gemma_tokenizer(d)
    return tiny_lumina2(d)


def run(pipe, prompt=PROMPT, steps=2, h=64, w=96, **kw):
    kw.setdefault("guidance_scale", 1.0)
    return pipe(prompt, num_inference_steps=steps, height=h, width=w, generator=torch.Generator().manual_seed(0),
                output_type="np", **kw)


def caption_len(pipe, prompt):
    return len(pipe.tokenizer(pipe.system_prompt + " <Prompt Start> " + prompt).input_ids)


def test_traced_images_identical_and_pipeline_restored_also_after_an_error(pipe):
    tc = traced_equals_untraced(pipe, lambda: run(pipe, guidance_scale=3.0, negative_prompt="blurry"))
    assert tc.num_steps == 2 and tc.generation.separate
    assert sorted(tc.generation.accumulator.layers) == ["layers.0.attn", "layers.1.attn"]  # no refiner
    before = pipeline_state(pipe)

    def boom(p, i, t, kw):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"), trace(pipe):
        run(pipe, guidance_scale=3.0, callback_on_step_end=boom)
    assert_restored(pipe, before)


def test_words_are_the_prompt_after_the_system_prompt(pipe):
    with trace(pipe) as tc:
        run(pipe, steps=1)
        hm = tc.heat_maps(0)
    c = caption_len(pipe, PROMPT)
    assert_maps_for_every_word(hm, WORDS)
    assert hm.maps.shape[0] == c  # the caption's own tokens: its padding is cut, not masked
    assert hm.tokens[0] == "<bos>" and hm.tokens[-6:] == ("▁a", "▁red", "▁dog", "▁on", "▁a", "▁bench")
    assert hm.word("dog").positions == (c - 4,) and hm.word("a").positions == (c - 6, c - 2)
    # another system prompt, made of prompt-like words, stays out of the words too
    with trace(pipe) as tc:
        run(pipe, steps=1, system_prompt="a photo of a dog on a bench")
        assert tc.heat_maps(0).words == WORDS


def test_batch_rows_with_their_own_caption_lengths(pipe):
    prompts = ["a dog", "a photo of a yellow bird sitting on a wooden bench"]
    lengths = [caption_len(pipe, p) for p in prompts]
    with trace(pipe) as tc:
        run(pipe, prompt=prompts, steps=1)
        first, second = tc.heat_maps(0), tc.heat_maps(1)
    assert lengths[0] < lengths[1] == first.maps.shape[0] == second.maps.shape[0]
    assert first.words == ["a", "dog"]
    assert second.words == ["a", "photo", "of", "yellow", "bird", "sitting", "on", "wooden", "bench"]
    assert first.word("dog").positions == (lengths[0] - 1,) and second.word("bench").positions == (lengths[1] - 1,)
    # past its caption, row 0's keys are its own image tokens (and the mask's padding): no text probability
    assert (first.maps[lengths[0]:] == 0).all() and (first.maps[: lengths[0]].sum((1, 2)) > 0).all()
    assert (second.maps.sum((1, 2)) > 0).all()


class RowHandSet(HandSet):
    """Unit vectors on head dimension 2: its rotary pair turns with the caption axis at 1/100 of dim 0's
    rate, and the image tokens all sit at caption position c_i there, so RoPE leaves the score nearly
    whole. Queries start at each row's own caption length; keys and queries use 8-dim heads (GQA: the key
    projection has fewer heads)."""

    def __init__(self, pipe, token_of_row, offsets, **kw):
        self.offsets = offsets
        super().__init__(pipe.transformer, GRID, token=0, queries=[(SITE, "to_q", 0)], keys=[(SITE, "to_k", 0)],
                         norms=("norm_q", "norm_k"), **kw)
        self.token_of_row = token_of_row

    @staticmethod
    def _unit(heads, c, like):
        u = torch.zeros(c, dtype=like.dtype)
        u[2::HEAD_DIM] = 1.0
        return u

    def _q(self, heads, offset):
        def hook(mod, args, out):
            q = torch.zeros_like(out)
            n = self.mask.numel()
            if out.shape[1] != max(self.offsets) + n:  # another call: the negative prompt's
                return q
            for r, start in enumerate(self.offsets):
                block = q[r, start: start + n]
                block[self.mask] = self._unit(heads, out.shape[-1], out)
            return q

        return hook

    def _k(self, heads, offset):
        def hook(mod, args, out):
            k = torch.zeros_like(out)
            if out.shape[1] != max(self.offsets) + self.mask.numel():
                return k
            for r in range(out.shape[0]):
                token = self.token_of_row(r)
                if token is not None:
                    k[r, token] = self._unit(heads, out.shape[-1], out)
            return k

        return hook


def test_hand_set_token_owns_its_region(pipe):
    c = caption_len(pipe, PROMPT)
    hand = RowHandSet(pipe, lambda r: c - 4, offsets=[c])  # "dog"
    try:
        with trace(pipe) as tc:
            run(pipe, guidance_scale=3.0)
            hm = tc.heat_maps(0)
    finally:
        hand.remove()
    assert tuple(hm.maps.shape[-2:]) == GRID and hm.image_size == (64, 96)
    assert_peaks_in_region(hm.maps, c - 4, hand.mask)


def test_hand_set_rows_at_their_own_offsets(pipe):
    prompts = ["a dog", "a photo of a yellow bird sitting on a wooden bench"]
    lengths = [caption_len(pipe, p) for p in prompts]
    # row 0: "dog" (its last token); row 1: "bird"
    tokens = [lengths[0] - 1, lengths[1] - 6]
    hand = RowHandSet(pipe, lambda r: tokens[r], offsets=lengths)
    try:
        with trace(pipe) as tc:
            run(pipe, prompt=prompts, steps=1)
            maps = [tc.heat_maps(i) for i in range(2)]
    finally:
        hand.remove()
    assert maps[1].tokens[tokens[1]] == "▁bird"
    for i in range(2):
        assert_peaks_in_region(maps[i].maps[: lengths[i]], tokens[i], hand.mask)


class Oracle:
    """``layers.0.attn``'s probabilities per row recomputed from its projections, norms, RoPE and GQA."""

    def __init__(self, module, lengths):
        self.m, self.lengths, self.calls, self.out = module, lengths, [], {}
        self.handles = [module.register_forward_pre_hook(self._pre, with_kwargs=True),
                        module.register_forward_hook(self._post)]
        for attr in ("to_q", "to_k"):
            self.handles.append(getattr(module, attr).register_forward_hook(self._save(attr)))

    def _pre(self, mod, args, kwargs):
        self.out = {"rope": kwargs["image_rotary_emb"], "mask": kwargs["attention_mask"]}

    def _save(self, attr):
        def hook(mod, args, out):
            self.out[attr] = out.detach().unflatten(-1, (-1, HEAD_DIM))

        return hook

    def _post(self, mod, args, out):
        m, n = self.m, GRID[0] * GRID[1]
        q = apply_rotary_emb(m.norm_q(self.out["to_q"]), self.out["rope"], use_real=False)
        k = apply_rotary_emb(m.norm_k(self.out["to_k"]), self.out["rope"], use_real=False)
        k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * HEAD_DIM**-0.5
        mask = self.out["mask"]
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        top = max(self.lengths)
        call = {"text": [], "model": []}
        for r, c in enumerate(self.lengths):
            s = scores[r, :, c: c + n]
            for kind, p in (("text", s[..., :c].softmax(-1)), ("model", s.softmax(-1)[..., :c])):
                call[kind].append(torch.nn.functional.pad(p, (0, top - c)))
        self.calls.append(call)

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("prompts", [PROMPT, ["a dog", "a photo of a yellow bird sitting on a wooden bench"]])
def test_text_and_model_probabilities_match_a_recomputation(pipe, prompts):
    batch = [prompts] if isinstance(prompts, str) else prompts
    lengths = [caption_len(pipe, p) for p in batch]
    module = pipe.transformer.get_submodule(LAYER)
    maps = {}
    for probabilities in ("text", "model"):
        oracle = Oracle(module, lengths)
        try:
            with trace(pipe, steps=[0], layers=[LAYER], probabilities=probabilities, grid=None) as tc:
                run(pipe, prompt=prompts, steps=1)
                maps[probabilities] = [tc.heat_maps(i).maps for i in range(len(batch))]
        finally:
            oracle.remove()
        assert (oracle.out["mask"] is not None) == (len(set(lengths)) > 1)
        for i in range(len(batch)):
            expected = oracle.calls[0][probabilities][i].mean(0).T.reshape(-1, *GRID)
            torch.testing.assert_close(maps[probabilities][i], expected, rtol=1e-4, atol=1e-7)
    for i, c in enumerate(lengths):
        assert (maps["model"][i][:c].sum(0) < maps["text"][i][:c].sum(0) - 1e-3).all()
        torch.testing.assert_close(maps["text"][i].sum(0), torch.ones(GRID), rtol=1e-4, atol=1e-4)


def test_negative_prompt_calls_and_cfg_truncation(pipe):
    with trace(pipe) as tc:
        run(pipe, steps=1)
        plain = tc.heat_maps(0).maps
    with trace(pipe, negative=True) as tc:
        run(pipe, steps=1, guidance_scale=3.0, negative_prompt="a blurry photo")
        assert tc.num_steps == 1
        cond, neg = tc.heat_maps(0), tc.heat_maps(0, branch="negative")
    torch.testing.assert_close(cond.maps, plain)  # the first call of the step is the positive one
    # the negative prompt has no system prompt: [<bos>, its tokens], its own length
    assert neg.words == ["a", "blurry", "photo"] and neg.tokens[0] == "<bos>"
    assert neg.maps.shape[0] == len(pipe.tokenizer("a blurry photo").input_ids) < cond.maps.shape[0]
    # the default negative prompt "" is <bos> alone
    with trace(pipe, negative=True) as tc:
        run(pipe, steps=1, guidance_scale=3.0)
        assert tc.heat_maps(0, branch="negative").maps.shape[0] == 1 and tc.heat_maps(0).words == WORDS
    # cfg_trunc_ratio drops the uncond call from step 2 on: still two steps, each its own
    with trace(pipe, negative=True, keep_steps=True) as tc:
        run(pipe, steps=3, guidance_scale=3.0, cfg_trunc_ratio=0.5, negative_prompt="a blurry photo")
        assert tc.num_steps == 3
        assert tc.heat_maps(0, steps=[2]).maps.sum() > 0
        assert tc.heat_maps(0, branch="negative", steps=[0]).maps.sum() > 0
