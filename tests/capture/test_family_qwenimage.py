"""Tracing Qwen-Image: joint [text, image] attention of QwenImageTransformer2DModel in QwenImagePipeline,
QwenImageImg2ImgPipeline and QwenImageEditPipeline (reference image: vision tokens in the text, latents
after the generated image's tokens)."""

from __future__ import annotations

import pytest
import torch
from family_checks import (
    RowHandSet,
    assert_maps_for_every_word,
    assert_peaks_in_region,
    assert_restored,
    pipeline_state,
    region_mask,
    traced_equals_untraced,
)
from PIL import Image

from daamkit import trace
from daamkit.testing.families.qwenimage import qwen2_5_vl_tokenizer, tiny_qwenimage, tiny_qwenimage_edit

PROMPT = "a red dog on a bench"
WORDS = ["a", "red", "dog", "on", "bench"]
CLOSING = ["<|im_end|>", "\u010a", "<|im_start|>", "assistant", "\u010a"]  # template tokens after the prompt
VISION = 12  # <|image_pad|> tokens of the tiny processor for a 3:2 reference
JOINT = [(r"transformer_blocks\.\d+\.attn", "to_q", 0)]
TEXT_KEYS = [(r"transformer_blocks\.\d+\.attn", "add_k_proj", 0)]
SLOW_PAIR = 6  # the frame axis' slowest RoPE pair (axes 8, 4, 4): text keys barely turn


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen2_5_vl_tokenizer")
    qwen2_5_vl_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def pipe(tok_dir):
    p = tiny_qwenimage(tok_dir)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def edit(tok_dir):
    p = tiny_qwenimage_edit(tok_dir)
    p.set_progress_bar_config(disable=True)
    return p


def run(pipe, prompt=PROMPT, steps=2, h=32, w=48, **kw):
    return pipe(prompt=prompt, num_inference_steps=steps, height=h, width=w, generator=torch.Generator().manual_seed(0),
                output_type="np", **kw).images


def run_edit(edit, prompt=PROMPT, steps=2, h=32, w=48, **kw):
    # a 3:2 reference: the pipeline VAE-encodes it at about 1 MP whatever height and width are
    return run(edit, prompt, steps, h, w, image=Image.new("RGB", (48, 32), (200, 30, 30)), **kw)


def rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Complex rotation of interleaved pairs, x (B, S, H, D), freqs (S, D/2) complex."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs[None, :, None, :]).flatten(3)


class Oracle:
    """One joint block's image-query x text-key probabilities recomputed from its projections, with its
    RMSNorms, RoPE and text mask applied here."""

    def __init__(self, m, n_image: int):
        self.m, self.n_image, self.calls, self.out = m, n_image, [], {}
        self.handles = [m.register_forward_pre_hook(self._pre), m.register_forward_hook(self._post, with_kwargs=True)]
        for attr in ("to_q", "to_k", "add_k_proj"):
            self.handles.append(getattr(m, attr).register_forward_hook(self._save(attr)))

    def _pre(self, mod, args):
        self.out = {}

    def _save(self, attr):
        def hook(mod, args, out):
            self.out[attr] = out.detach()
        return hook

    def _post(self, mod, args, kwargs, output):
        m = self.m
        split = lambda x: x.unflatten(-1, (m.heads, -1))  # noqa: E731
        img_freqs, txt_freqs = kwargs["image_rotary_emb"]
        q = rope(m.norm_q(split(self.out["to_q"])), img_freqs)[:, : self.n_image]
        kt = rope(m.norm_added_k(split(self.out["add_k_proj"])), txt_freqs)
        keys = torch.cat([kt, rope(m.norm_k(split(self.out["to_k"])), img_freqs)], 1)
        t = kt.shape[1]
        scores = torch.einsum("bqhd,bkhd->bhqk", q, keys) * q.shape[-1] ** -0.5
        mask = kwargs.get("encoder_hidden_states_mask")
        if mask is not None:
            valid = torch.cat([mask.bool(), torch.ones(mask.shape[0], keys.shape[1] - t, dtype=torch.bool)], 1)
            scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
        self.calls.append({"text": scores[..., :t].softmax(-1), "model": scores.softmax(-1)[..., :t], "mask": mask})

    def remove(self):
        for h in self.handles:
            h.remove()


# ------------------------------------------------------------------------------------- text to image
def test_traced_equals_untraced_and_words_are_the_prompts(pipe):
    tc = traced_equals_untraced(pipe, lambda: run(pipe))
    hm = tc.heat_maps(0)
    assert hm.meta["family"] == "qwenimage" and tc.num_steps == 2
    assert hm.image_size == (32, 48) and hm.maps.shape == (6 + 5, 2, 3)
    assert_maps_for_every_word(hm, WORDS)
    # the keys are the Qwen2.5-VL tokens after the dropped system part: the prompt's, then the template's
    tok = pipe.tokenizer
    assert list(hm.alignment.tokens) == tok.convert_ids_to_tokens(tok(PROMPT)["input_ids"]) + CLOSING
    assert [p for w in hm.alignment.words for p in w.positions] == list(range(6))
    assert hm.word("dog").positions == (2,) and hm.alignment.positions("a") == [0, 4]
    assert [layer.name for layer in tc.layers] == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]


def test_template_words_in_the_prompt_are_only_the_prompts(pipe):
    # "the", "color" and "of" are words of the system prompt too, "user" and "assistant" of the template
    prompt = "the color of the user dog"
    with trace(pipe) as tc:
        run(pipe, prompt, steps=1)
        hm = tc.heat_maps(0)
    assert hm.words == ["the", "color", "of", "user", "dog"]
    assert hm.alignment.positions("color") == [1] and hm.alignment.positions("the") == [0, 3]
    assert "assistant" not in hm.words and "describe" not in hm.words


def test_restored_after_an_error_in_a_step_callback(pipe):
    run(pipe, steps=1)  # the text encoder's own hooks come with its first call
    before = pipeline_state(pipe)

    def boom(p, i, t, kw):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), trace(pipe):
        run(pipe, callback_on_step_end=boom)
    assert_restored(pipe, before)


def test_hand_set_token_owns_its_region(pipe):
    grid = (4, 6)  # 64x96 px, 16 px per token
    token = 2  # "dog"
    hand = RowHandSet(pipe.transformer, grid, lambda r, n: token, JOINT, TEXT_KEYS, dim=SLOW_PAIR)
    try:
        with trace(pipe) as tc:
            run(pipe, h=64, w=96)
            maps = tc.heat_maps(0).maps
    finally:
        hand.remove()
    assert maps.shape[-2:] == grid
    assert_peaks_in_region(maps, token, hand.mask)


@pytest.mark.parametrize("probabilities", ["text", "model"])
def test_probabilities_match_a_recomputation_from_the_projections(pipe, probabilities):
    layer = "transformer_blocks.1.attn"
    prompts = [PROMPT, "a cat"]  # 11 and 7 kept tokens: the second row's last 4 text keys are masked
    oracle = Oracle(pipe.transformer.get_submodule(layer), n_image=2 * 3)
    try:
        with trace(pipe, steps=[0], layers=[layer], probabilities=probabilities, grid=None) as tc:
            run(pipe, prompts, steps=1)
            maps = [tc.heat_maps(i).maps for i in range(2)]
    finally:
        oracle.remove()
    call = oracle.calls[0]
    assert call["mask"] is not None and call["mask"].sum(1).tolist() == [11, 7]
    for i in range(2):
        expected = call[probabilities][i].mean(0).T.reshape(-1, 2, 3)
        torch.testing.assert_close(maps[i], expected, rtol=1e-4, atol=1e-6)
    assert (maps[1][7:] == 0).all() and (maps[0] > 0).all()
    assert maps[1].shape[0] == 11 and tc.heat_maps(1).words == ["a", "cat"]
    total = maps[0].sum(0)
    if probabilities == "text":
        torch.testing.assert_close(total, torch.ones_like(total), rtol=1e-4, atol=1e-4)
    else:
        assert (total < 1 - 1e-3).all()  # the image keys keep the rest of the mass


def test_true_cfg_negative_calls_and_batches(pipe):
    prompts, negatives = ["a red dog", "a cat on a bench"], ["blue", "a tree"]
    # cond calls have 10 text keys (8 and 10 kept tokens), negative calls 7
    cond_len = 10

    def token_of(r, n):
        return (2, 1)[r] if n == cond_len else 0  # "dog", "cat"; the negatives' first token

    grid = (2, 3)
    hand = RowHandSet(pipe.transformer, grid, token_of, JOINT, TEXT_KEYS, dim=SLOW_PAIR)
    try:
        with trace(pipe, negative=True) as tc:
            run(pipe, prompts, negative_prompt=negatives, true_cfg_scale=4.0)
            assert tc.num_images == 2 and tc.num_steps == 2 and tc.generation.separate
            cond = [tc.heat_maps(i) for i in range(2)]
            neg = [tc.heat_maps(i, branch="negative") for i in range(2)]
    finally:
        hand.remove()
    inside = region_mask(grid).reshape(grid)
    assert [hm.words for hm in cond] == [["a", "red", "dog"], ["a", "cat", "on", "bench"]]
    assert neg[1].words == ["a", "tree"] and neg[0].words == ["blue"]
    assert cond[0].maps.shape[0] == cond_len and neg[0].maps.shape[0] < cond_len
    assert [int(hm.maps[:, inside].mean(-1).argmax()) for hm in cond] == [2, 1]
    assert [int(hm.maps[:, inside].mean(-1).argmax()) for hm in neg] == [0, 0]

    # the positive call of a step is the same with and without a negative prompt
    with trace(pipe) as tc:
        run(pipe, steps=1)
        plain = tc.heat_maps(0).maps
    with trace(pipe) as tc:
        run(pipe, steps=1, negative_prompt="blue", true_cfg_scale=4.0)
        torch.testing.assert_close(tc.heat_maps(0).maps, plain)


def test_img2img_shares_the_entry(pipe):
    from diffusers import QwenImageImg2ImgPipeline

    i2i = QwenImageImg2ImgPipeline(**pipe.components)
    i2i.set_progress_bar_config(disable=True)
    image = Image.new("RGB", (48, 32), (30, 120, 200))
    tc = traced_equals_untraced(i2i, lambda: run(i2i, image=image, strength=0.9))
    assert_maps_for_every_word(tc.heat_maps(0), WORDS)
    assert tc.heat_maps(0).maps.shape[-2:] == (2, 3)


# ---------------------------------------------------------------------------------------------- edit
@pytest.mark.slow
def test_edit_reference_tokens_are_neither_words_nor_image_queries(edit):
    tc = traced_equals_untraced(edit, lambda: run_edit(edit))
    hm = tc.heat_maps(0)
    assert_maps_for_every_word(hm, WORDS)
    tokens = hm.alignment.tokens
    # the text keys open with the reference's vision tokens, which belong to no word
    assert tokens[0] == "<|vision_start|>" and tokens[1: VISION + 1] == ("<|image_pad|>",) * VISION
    assert tokens[VISION + 1] == "<|vision_end|>" and list(tokens[-5:]) == CLOSING
    assert [p for w in hm.alignment.words for p in w.positions] == list(range(VISION + 2, VISION + 8))
    assert hm.maps.shape == (VISION + 2 + 6 + 5, 2, 3)

    # the image stream is [generated, reference]: only the generated tokens are queries
    grid = (2, 3)
    token = VISION + 2 + 2  # "dog"
    hand = RowHandSet(edit.transformer, grid, lambda r, n: token, JOINT, TEXT_KEYS, dim=SLOW_PAIR)
    try:
        with trace(edit) as tc:
            run_edit(edit, steps=1)
            maps = tc.heat_maps(0).maps
    finally:
        hand.remove()
    assert_peaks_in_region(maps, token, hand.mask)

