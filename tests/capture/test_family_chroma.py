"""Chroma (``ChromaTransformer2DModel``): Flux's blocks, T5 only, true CFG as a separate call, and a float 0/1 text
mask that the model ADDS to its attention scores (padding is damped by e^-1, not masked)."""

from __future__ import annotations

import numpy as np
import PIL.Image
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
from daamkit.testing.families import chroma

PROMPT = "a red dog on a bench"
WORDS = ["a", "red", "dog", "on", "bench"]
TEXT = 16  # max_sequence_length
DOUBLE, SINGLE = "transformer_blocks.0.attn", "single_transformer_blocks.0.attn"


@pytest.fixture(scope="module")
def pipe(t5_tokenizer_dir):
    return chroma.tiny_chroma(t5_tokenizer_dir)


def run(pipe, prompt=PROMPT, steps=1, h=32, w=48, **kw):
    kw.setdefault("max_sequence_length", TEXT)
    return pipe(prompt=prompt, num_inference_steps=steps, height=h, width=w, output_type="np",
                generator=torch.Generator().manual_seed(0), **kw).images


def test_traced_images_are_untraced_ones_and_the_pipeline_is_restored(pipe):
    tc = traced_equals_untraced(pipe, lambda: run(pipe, steps=2, negative_prompt="a blue car"), negative=True)
    assert tc.num_steps == 2 and tc.num_images == 1 and tc.generation.separate
    hm = tc.heat_maps(0)
    assert_maps_for_every_word(hm, WORDS)
    # T5: no BOS, the prompt's tokens first, then </s> and padding
    assert [w.positions for w in hm.alignment.words] == [(0,), (1,), (2,), (3,), (4,), (5,)]
    assert hm.tokens[:7] == ("▁a", "▁red", "▁dog", "▁on", "▁a", "▁bench", "</s>")
    assert tc.heat_maps(0, branch="negative").words == ["a", "blue", "car"]

    def boom(p, i, t, kw):
        raise KeyboardInterrupt

    before = pipeline_state(pipe)
    with pytest.raises(KeyboardInterrupt), trace(pipe):
        run(pipe, steps=2, callback_on_step_end=boom)
    assert_restored(pipe, before)


def hand_set(pipe, grid, token):
    return HandSet(
        pipe.transformer, grid, token,
        queries=[(r"transformer_blocks\.\d+\.attn", "to_q", 0), (r"single_transformer_blocks\.\d+\.attn", "to_q", TEXT)],
        keys=[(r"transformer_blocks\.\d+\.attn", "add_k_proj", 0), (r"single_transformer_blocks\.\d+\.attn", "to_k", 0)],
    )


def test_hand_set_token_owns_its_region_in_both_block_kinds(pipe):
    hand = hand_set(pipe, (16, 24), token=2)  # "dog"
    try:
        with trace(pipe, keep_layers=True) as tc:
            run(pipe)
            for block in ("double", "single"):
                assert_peaks_in_region(tc.heat_maps(0, layers=[block]).maps, 2, hand.mask)
    finally:
        hand.remove()


def test_cfg_calls_and_batches_give_each_image_its_own_cond_maps(pipe):
    with trace(pipe, steps=[0]) as tc:
        run(pipe, prompt=["a dog", "a red cat"], guidance_scale=1.0)  # no CFG: one call a step
        plain = [tc.heat_maps(i).maps for i in range(2)]
    with trace(pipe, steps=[0], negative=True) as tc:
        run(pipe, prompt=["a dog", "a red cat"], negative_prompt="a blue car")
        assert tc.num_images == 2  # two prompts, not [negative, cond] halves of one
        for i, words in enumerate([["a", "dog"], ["a", "red", "cat"]]):
            assert tc.heat_maps(i).words == words
            torch.testing.assert_close(tc.heat_maps(i).maps, plain[i])  # step 0: same latents, cond only
        assert tc.heat_maps(1, branch="negative").words == ["a", "blue", "car"]


class Oracle:
    """One module's scores recomputed from its projections, norms and RoPE, with the model's float text mask
    (the transformer's ``attention_mask`` (B, text + image) as an outer product) added as the model does."""

    def __init__(self, transformer, layer):
        self.m, self.single = transformer.get_submodule(layer), layer.startswith("single")
        self.out, self.calls = {}, []
        self.handles = [
            transformer.register_forward_pre_hook(self._denoiser, with_kwargs=True),
            self.m.register_forward_pre_hook(self._pre, with_kwargs=True),
            self.m.register_forward_hook(self._post),
        ]
        for attr in ("to_q", "to_k") + (() if self.single else ("add_q_proj", "add_k_proj")):
            self.handles.append(getattr(self.m, attr).register_forward_hook(self._save(attr)))

    def _denoiser(self, mod, args, kwargs):
        self.mask = kwargs["attention_mask"]

    def _pre(self, mod, args, kwargs):
        self.out, self.rope = {}, kwargs["image_rotary_emb"]

    def _save(self, attr):
        def hook(mod, args, out):
            self.out[attr] = out.detach()
        return hook

    def _post(self, mod, args, out):
        from diffusers.models.embeddings import apply_rotary_emb

        m = self.m
        split = lambda x: x.unflatten(-1, (m.heads, -1))  # noqa: E731
        q, k = m.norm_q(split(self.out["to_q"])), m.norm_k(split(self.out["to_k"]))
        if not self.single:
            q = torch.cat([m.norm_added_q(split(self.out["add_q_proj"])), q], 1)
            k = torch.cat([m.norm_added_k(split(self.out["add_k_proj"])), k], 1)
        q, k = (apply_rotary_emb(x, self.rope, sequence_dim=1) for x in (q, k))
        scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * q.shape[-1] ** -0.5
        pairs = self.mask[:, None, :, None] * self.mask[:, None, None, :]
        self.calls.append((scores + pairs.float(), self.mask))

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("layer", [DOUBLE, SINGLE])
def test_probabilities_reproduce_the_model_with_its_additive_float_mask(pipe, layer):
    n = 16 * 24
    for probabilities in ("text", "model"):
        oracle = Oracle(pipe.transformer, layer)
        try:
            with trace(pipe, steps=[0], layers=[layer], grid=None, probabilities=probabilities) as tc:
                run(pipe)
                maps = tc.heat_maps(0).maps
        finally:
            oracle.remove()
        scores, mask = oracle.calls[0]  # step 0, the cond call (the uncond call follows it)
        assert mask.dtype.is_floating_point and int(mask[0, :TEXT].sum()) == 8  # 6 tokens, </s>, one pad
        image = scores[0, :, TEXT: TEXT + n]
        p = image[..., :TEXT].softmax(-1) if probabilities == "text" else image.softmax(-1)[..., :TEXT]
        torch.testing.assert_close(maps, p.mean(0).T.reshape(TEXT, 16, 24), rtol=1e-4, atol=1e-6)
        # as in the model, the "masked" padding keys keep their (damped) probability
        assert (maps[8:] > 0).all()
        if probabilities == "text":
            bool_masked = image[..., :TEXT].masked_fill(mask[0, :TEXT] == 0, float("-inf")).softmax(-1)
            assert not torch.allclose(maps, bool_masked.mean(0).T.reshape(TEXT, 16, 24), rtol=1e-3)


def test_img2img_shares_the_family(pipe):
    from diffusers import ChromaImg2ImgPipeline

    i2i = ChromaImg2ImgPipeline(**{k: v for k, v in pipe.components.items()})
    i2i.set_progress_bar_config(disable=True)
    init = PIL.Image.fromarray((np.random.default_rng(0).random((32, 48, 3)) * 255).astype(np.uint8))
    tc = traced_equals_untraced(i2i, lambda: run(i2i, steps=4, image=init, strength=0.5))
    assert tc.num_steps == 2
    hm = tc.heat_maps(0)
    assert_maps_for_every_word(hm, WORDS)
    assert hm.maps.shape == (TEXT, 16, 24) and hm.image_size == (32, 48)
