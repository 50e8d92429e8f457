"""Tracing Z-Image: the single-stream ``layers.N.attention`` of ZImageTransformer2DModel over one sequence
[image, image pads, caption, caption pads] per sample (pads: learnt, unmasked tokens up to a multiple of 32),
in ZImagePipeline and ZImageImg2ImgPipeline; batched CFG with the conditional rows first."""

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
from daamkit.testing.families.zimage import ZIMAGE_PROMPT_TEMPLATE, qwen3_tokenizer, tiny_zimage

PROMPT = "a red dog on a bench"
WORDS = ["a", "red", "dog", "on", "bench"]
OPENING = ["<|im_start|>", "user", "\u010a"]  # the chat template's tokens before the prompt
CLOSING = ["<|im_end|>", "\u010a", "<|im_start|>", "assistant", "\u010a"]
CAPTION_START = 32  # a few image tokens, padded to 32
QUERIES = [(r"layers\.\d+\.attention", "to_q", 0)]
KEYS = [(r"layers\.\d+\.attention", "to_k", CAPTION_START)]
SLOW_PAIR = 6  # the frame axis' slowest RoPE pair (axes 8, 4, 4)
LONG = " ".join(["a red dog on a wooden bench in the park"] * 3)  # 30 words: the caption takes two 32-blocks


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen3_tokenizer")
    qwen3_tokenizer(d)
    return d


@pytest.fixture(scope="module")
def pipe(tok_dir):
    p = tiny_zimage(tok_dir)
    p.set_progress_bar_config(disable=True)
    return p


def run(pipe, prompt=PROMPT, steps=2, h=32, w=48, **kw):
    return pipe(prompt=prompt, num_inference_steps=steps, height=h, width=w,
                generator=torch.Generator().manual_seed(0), output_type="np", **kw).images


def caption_len(pipe, prompt: str) -> int:
    return len(pipe.tokenizer(ZIMAGE_PROMPT_TEMPLATE.format(prompt))["input_ids"])


class Oracle:
    """One layer's image-query x caption-key probabilities recomputed from its projections, with its
    RMSNorms, RoPE and mask applied here; captions of the given lengths from ``CAPTION_START`` on."""

    def __init__(self, m, n_image: int, lengths: list[int]):
        self.m, self.n_image, self.lengths, self.calls, self.out = m, n_image, lengths, [], {}
        self.handles = [m.register_forward_hook(self._post, with_kwargs=True)]
        for attr in ("to_q", "to_k"):
            self.handles.append(getattr(m, attr).register_forward_hook(self._save(attr)))

    def _save(self, attr):
        def hook(mod, args, out):
            self.out[attr] = out.detach()
        return hook

    def _post(self, mod, args, kwargs, output):
        m = self.m
        freqs = kwargs["freqs_cis"]

        def rope(x):
            xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
            return torch.view_as_real(xc * freqs[:, :, None, :]).flatten(3)

        split = lambda x: x.unflatten(-1, (m.heads, -1))  # noqa: E731
        q = rope(m.norm_q(split(self.out["to_q"])))[:, : self.n_image]
        k = rope(m.norm_k(split(self.out["to_k"])))
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * q.shape[-1] ** -0.5
        mask = kwargs.get("attention_mask")
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        text, model = [], []
        for r, n in enumerate(self.lengths):
            keys = slice(CAPTION_START, CAPTION_START + n)
            text.append(scores[r, ..., keys].softmax(-1))
            model.append(scores[r].softmax(-1)[..., keys])
        self.calls.append({"text": text, "model": model, "mask": mask})

    def remove(self):
        for h in self.handles:
            h.remove()


def test_traced_equals_untraced_and_words_are_the_prompts(pipe):
    tc = traced_equals_untraced(pipe, lambda: run(pipe))
    hm = tc.heat_maps(0)
    assert hm.meta["family"] == "zimage" and hm.image_size == (32, 48)
    # t runs from 0 up to 1: two steps, CFG rows batched in each call
    assert tc.num_steps == 2 and tc.generation.cfg and not tc.generation.separate
    assert_maps_for_every_word(hm, WORDS)
    # the caption is every token of the chat-templated prompt; the template's are no words
    tok = pipe.tokenizer
    assert list(hm.alignment.tokens) == OPENING + tok.convert_ids_to_tokens(tok(PROMPT)["input_ids"]) + CLOSING
    assert [p for w in hm.alignment.words for p in w.positions] == list(range(3, 9))
    assert hm.maps.shape == (3 + 6 + 5, 2, 3)
    # the image-only and caption-only refiners are not text-image attention
    assert [layer.name for layer in tc.layers] == ["layers.0.attention", "layers.1.attention"]


def test_template_words_in_the_prompt_are_only_the_prompts(pipe):
    prompt = "the user and the assistant"
    with trace(pipe) as tc:
        run(pipe, prompt, steps=1, guidance_scale=0.0)
        hm = tc.heat_maps(0)
        assert not tc.generation.cfg
    assert hm.words == ["the", "user", "and", "assistant"]
    own = len(pipe.tokenizer(prompt)["input_ids"])
    assert [p for w in hm.alignment.words for p in w.positions] == list(range(3, 3 + own))
    assert hm.alignment.positions("user")[0] == 4 and hm.alignment.tokens[1] == "user"


def test_restored_after_an_error_in_a_step_callback(pipe):
    run(pipe, steps=1)
    before = pipeline_state(pipe)

    def boom(p, i, t, kw):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), trace(pipe):
        run(pipe, callback_on_step_end=boom)
    assert_restored(pipe, before)


def test_hand_set_token_owns_its_region(pipe):
    grid = (4, 6)  # 64x96 px: 24 image tokens, still padded to 32
    token = 3 + 2  # "dog"
    hand = RowHandSet(pipe.transformer, grid, lambda r, n: token, QUERIES, KEYS, dim=SLOW_PAIR)
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
    layer = "layers.1.attention"
    prompts = [LONG, "a cat"]
    lengths = [caption_len(pipe, p) for p in prompts]
    assert lengths[0] > 32 > lengths[1]  # rows of different lengths: masked; the short caption's pads are not
    oracle = Oracle(pipe.transformer.get_submodule(layer), n_image=2 * 3, lengths=lengths)
    try:
        with trace(pipe, steps=[0], layers=[layer], probabilities=probabilities, grid=None) as tc:
            run(pipe, prompts, steps=1, guidance_scale=0.0)
            maps = [tc.heat_maps(i).maps for i in range(2)]
    finally:
        oracle.remove()
    call = oracle.calls[0]
    assert call["mask"] is not None
    for i, n in enumerate(lengths):
        expected = call[probabilities][i].mean(0).T.reshape(-1, 2, 3)
        assert maps[i].shape[0] == lengths[0]
        torch.testing.assert_close(maps[i][:n], expected, rtol=1e-4, atol=1e-6)
        assert (maps[i][n:] == 0).all()  # the short caption's learnt pad tokens are no text
    total = maps[1].sum(0)
    if probabilities == "text":
        torch.testing.assert_close(total, torch.ones_like(total), rtol=1e-4, atol=1e-4)
    else:
        assert (total < 1 - 1e-3).all()


def test_cfg_rows_are_cond_first_and_batches_keep_their_words(pipe):
    prompts, negatives = ["a red dog", "a cat on a bench"], ["blue", "a tree"]
    n = len(prompts)

    def token_of(r, length):
        return 3 + ((2, 1)[r] if r < n else 0)  # "dog", "cat"; the negatives' first word

    grid = (2, 3)
    hand = RowHandSet(pipe.transformer, grid, token_of, QUERIES, KEYS, dim=SLOW_PAIR)
    try:
        with trace(pipe, negative=True) as tc:
            run(pipe, prompts, negative_prompt=negatives, guidance_scale=4.0)
            assert tc.num_images == 2 and tc.num_steps == 2 and tc.generation.cfg
            cond = [tc.heat_maps(i) for i in range(2)]
            neg = [tc.heat_maps(i, branch="negative") for i in range(2)]
    finally:
        hand.remove()
    inside = region_mask(grid).reshape(grid)
    assert [hm.words for hm in cond] == [["a", "red", "dog"], ["a", "cat", "on", "bench"]]
    assert [hm.words for hm in neg] == [["blue"], ["a", "tree"]]
    assert [int(hm.maps[:, inside].mean(-1).argmax()) for hm in cond] == [5, 4]
    assert [int(hm.maps[:, inside].mean(-1).argmax()) for hm in neg] == [3, 3]


def test_img2img_shares_the_entry(pipe):
    from diffusers import ZImageImg2ImgPipeline

    i2i = ZImageImg2ImgPipeline(**pipe.components)
    i2i.set_progress_bar_config(disable=True)
    image = Image.new("RGB", (48, 32), (30, 120, 200))
    tc = traced_equals_untraced(i2i, lambda: run(i2i, image=image, strength=0.9))
    assert_maps_for_every_word(tc.heat_maps(0), WORDS)
    assert tc.heat_maps(0).maps.shape[-2:] == (2, 3)
