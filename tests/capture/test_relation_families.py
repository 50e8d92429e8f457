"""Relation maps on the joint families whose text sits at an offset the capture locates per call: Z-Image
([image, image pads, caption, caption pads]) and AuraFlow ([registers, text, image]), and text->text on a
video model (CogVideoX). Each relation is checked against the probabilities recomputed from the q and k
the layer's own attention call received, at positions these tests work out from the model's layout;
images unchanged, hooks removed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.overrides import TorchFunctionMode

from daamkit import UnsupportedPipelineError, trace

PROMPT = "a red dog on a bench"
SDPA = torch.nn.functional.scaled_dot_product_attention


class FirstAttentionCall(TorchFunctionMode):
    """The q, k and mask of a module's first scaled-dot-product attention call in each forward.

    Installed inside the trace: the pre-hook goes first (this mode below the capture's) and the
    post-hook last, so the two modes leave in the order they came."""

    def __init__(self, module):
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
        self.seen = False
        self.handles = [module.register_forward_pre_hook(self._pre, prepend=True),
                        module.register_forward_hook(self._post, always_call=True)]

    def _pre(self, module, args):
        self.seen = False
        self.__enter__()

    def _post(self, module, args, output):
        self.__exit__(None, None, None)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is SDPA and not self.seen:
            self.seen = True
            named = dict(zip(("query", "key", "value", "attn_mask"), args, strict=False)) | kwargs
            q, k, mask = named["query"], named["key"], named.get("attn_mask")
            self.calls.append((q.detach().float(), k.detach().float(), mask))
        return func(*args, **kwargs)

    def remove(self):
        for h in self.handles:
            h.remove()


def softmax_block(q, k, mask, queries, keys):
    """Head-mean probabilities of ``queries`` over ``keys`` only (daamkit's default ``"text"`` form)."""
    scores = q[:, :, queries] @ k[:, :, keys].transpose(-1, -2) * q.shape[-1] ** -0.5
    if mask is not None:
        m = mask.bool()
        m = m[:, None, None, :] if m.dim() == 2 else m
        scores = scores.masked_fill(~m[..., keys].expand_as(scores), float("-inf"))
    return scores.softmax(-1).mean(1)


# ---- the two families, with where their text and image tokens lie -----------------------------------
@pytest.fixture(scope="module")
def zimage(tmp_path_factory):
    from daamkit.testing.families.zimage import ZIMAGE_PROMPT_TEMPLATE, qwen3_tokenizer, tiny_zimage

    d = tmp_path_factory.mktemp("qwen3_rel")
    qwen3_tokenizer(d)
    pipe = tiny_zimage(d)
    pipe.set_progress_bar_config(disable=True)
    n_text = len(pipe.tokenizer(ZIMAGE_PROMPT_TEMPLATE.format(PROMPT))["input_ids"])
    # 32x48 px: a 2x3 token grid, padded to 32 tokens; the caption follows
    layout = {"layer": "layers.0.attention", "grid": (2, 3), "image": slice(0, 6), "text": slice(32, 32 + n_text),
              "kw": {"guidance_scale": 0.0}}
    return pipe, layout


@pytest.fixture(scope="module")
def auraflow(tmp_path_factory):
    from daamkit.testing.families.auraflow import pile_t5_tokenizer, tiny_auraflow

    d = tmp_path_factory.mktemp("pile_t5_rel")
    pile_t5_tokenizer(d)
    pipe = tiny_auraflow(d)
    pipe.set_progress_bar_config(disable=True)
    # 8 register tokens, then max_sequence_length text tokens, then the 16x24 image grid (VAE scale 1, patch 2)
    layout = {"layer": "single_transformer_blocks.0.attn", "grid": (16, 24), "image": slice(24, 24 + 16 * 24),
              "text": slice(8, 24), "kw": {"guidance_scale": 1.0, "max_sequence_length": 16}}
    return pipe, layout


def run(pipe, layout, steps=1):
    return pipe(PROMPT, num_inference_steps=steps, height=32, width=48, generator=torch.Generator().manual_seed(0),
                output_type="np", **layout["kw"]).images


@pytest.mark.parametrize("family", ["zimage", "auraflow"])
def test_image_and_text_relations_match_the_attention_calls(family, request):
    pipe, layout = request.getfixturevalue(family)
    plain = run(pipe, layout)
    point = (5, 20)  # pixel (y, x)
    gh, gw = layout["grid"]
    cell = (point[0] * gh // 32) * gw + point[1] * gw // 48
    module = pipe.transformer.get_submodule(layout["layer"])
    before = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in pipe.transformer.modules())
    with trace(pipe, steps=[0], layers=[layout["layer"]], relations=["image->image", "text->text"], query=point) as tc:
        oracle = FirstAttentionCall(module)
        try:
            traced = run(pipe, layout)
        finally:
            oracle.remove()
        rel, mat = tc.relation(0, "image->image"), tc.relation(0, "text->text")
        hm = tc.heat_maps(0)
    np.testing.assert_array_equal(plain, traced)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in pipe.transformer.modules()) == before

    assert len(oracle.calls) == 1  # one step, no classifier-free guidance: one row
    q, k, mask = oracle.calls[0]
    image, text = layout["image"], layout["text"]
    row = softmax_block(q, k, mask, slice(image.start + cell, image.start + cell + 1), image)[0, 0]
    assert rel.maps.shape[1:] == (gh, gw) and rel.image_size == (32, 48)
    torch.testing.assert_close(rel.map, row.reshape(gh, gw), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(mat.matrix, softmax_block(q, k, mask, text, text)[0], rtol=1e-4, atol=1e-6)
    # the matrix's tokens are the word maps' tokens: the same alignment labels both
    assert mat.alignment.tokens == hm.alignment.tokens and mat.matrix.shape == (len(hm.alignment.tokens),) * 2
    labels, words = mat.words()
    assert labels == ["a", "red", "dog", "on", "a#2", "bench"] and words.shape == (6, 6)
    dog, bench = (mat.alignment.find(w)[0].positions for w in ("dog", "bench"))
    torch.testing.assert_close(words[2, 5], mat.matrix[list(dog)][:, list(bench)].sum(1).mean())


def test_families_that_pack_each_row_differently_are_refused(tmp_path):
    """Lumina 2 packs each sample as [its caption, image] at its own offset: no one layout for a call."""
    from daamkit.testing.families.lumina2 import gemma_tokenizer, tiny_lumina2

    gemma_tokenizer(tmp_path)
    pipe = tiny_lumina2(tmp_path)
    with pytest.raises(UnsupportedPipelineError, match="text->text relations need a joint-attention transformer"):
        with trace(pipe, relations=["text->text"]):
            pass


def test_text_relation_of_a_video_model_matches_its_attention_call(t5_tokenizer_dir):
    """Token-to-token attention does not read the frames: CogVideoX ([text, video] in one sequence) gives
    the same matrix as its attention call; where a video relation is not defined (image->image), the
    trace says so before anything runs."""
    from daamkit.testing.families.cogvideox import tiny_cogvideox

    pipe = tiny_cogvideox(t5_tokenizer_dir)
    pipe.set_progress_bar_config(disable=True)
    layer = "transformer_blocks.0.attn1"
    module = pipe.transformer.get_submodule(layer)
    with trace(pipe, steps=[0], layers=[layer], relations=["text->text"]) as tc:
        oracle = FirstAttentionCall(module)
        try:
            pipe(prompt=PROMPT, num_inference_steps=1, height=32, width=48, num_frames=9, guidance_scale=1.0,
                 generator=torch.Generator().manual_seed(0), output_type="np")
        finally:
            oracle.remove()
        mat = tc.relation(0, "text->text")
    q, k, mask = oracle.calls[0]
    n = mat.matrix.shape[0]
    assert n == 226 and n < q.shape[2]  # the padded T5 caption first, then the video's tokens
    torch.testing.assert_close(mat.matrix, softmax_block(q, k, mask, slice(0, n), slice(0, n))[0], rtol=1e-4, atol=1e-6)
    assert mat.words()[0] == ["a", "red", "dog", "on", "a#2", "bench"]
    with pytest.raises(UnsupportedPipelineError, match="image->image relations need"):
        trace(pipe, relations=["image->image"], query=(0, 0))
