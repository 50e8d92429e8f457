"""FLUX.2 (``Flux2Transformer2DModel``): dev (Mistral chat template, left padding, guidance-distilled) and
klein (Qwen3 chat template, right padding, true CFG as a separate call), reference images, the KV pipeline."""

from __future__ import annotations

import PIL.Image
import pytest
import torch
from family_checks import (
    assert_maps_for_every_word,
    assert_peaks_in_region,
    assert_restored,
    pipeline_state,
    region_mask,
    traced_equals_untraced,
)

from daamkit import trace
from daamkit.testing.families import flux2

PROMPT = "a red dog on a bench"
WORDS = ["a", "red", "dog", "on", "bench"]
TEXT = 64  # max_sequence_length: the text keys
DOUBLE, SINGLE = "transformer_blocks.0.attn", "single_transformer_blocks.0.attn"


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux2_tokenizers")
    flux2.mistral3_tokenizer(root / "mistral")
    flux2.qwen3_tokenizer(root / "qwen3")
    return str(root / "mistral"), str(root / "qwen3")


def warm(pipe):
    """transformers installs hooks on the text encoder's layers at its first call with
    ``output_hidden_states`` (its output recorders) and keeps them: make that call before counting hooks."""
    run(pipe, steps=1, h=16, w=16, max_sequence_length=8)
    return pipe


@pytest.fixture(scope="module")
def dev(tokenizer_dirs):
    return warm(flux2.tiny_flux2(tokenizer_dirs[0]))


@pytest.fixture(scope="module")
def klein(tokenizer_dirs):
    return warm(flux2.tiny_flux2_klein(tokenizer_dirs[1]))


def run(pipe, prompt=PROMPT, steps=1, h=32, w=48, **kw):
    kw.setdefault("max_sequence_length", TEXT)
    return pipe(prompt=prompt, num_inference_steps=steps, height=h, width=w, output_type="np",
                generator=torch.Generator().manual_seed(0), **kw).images


def reference(w=64, h=80):
    """The smallest reference FLUX.2 takes is 64 px a side; 2 px per token in the tiny pipelines."""
    return PIL.Image.new("RGB", (w, h), (200, 30, 30))


class Hand:
    """Hand-set queries and keys of every attention module of a FLUX.2 transformer.

    Generated-image queries inside ``region`` are a unit vector, every other query is zero; the keys are
    zero but for text position ``token_of(row, call)`` of each row (``call`` counts transformer calls, so
    a separate negative call can own another token). The double blocks' projections are hooked, and the
    single blocks' fused ``to_qkv_mlp_proj`` on its q and k columns; the q/k RMSNorm weights are raised,
    so the model's norms and rotary embedding shape the scores the capture must reproduce.
    """

    def __init__(self, transformer, grid, token_of, region=(0.0, 0.5, 0.5, 1.0), gain=6.0):
        self.mask, self.token_of, self.call = region_mask(grid, region), token_of, -1
        self.handles = [transformer.register_forward_pre_hook(self._count, with_kwargs=True)]
        self.saved = []
        for name, m in transformer.named_modules():
            if name.startswith("transformer_blocks.") and name.endswith(".attn"):
                self.handles.append(m.to_q.register_forward_hook(self._double_q(m)))
                self.handles.append(m.add_k_proj.register_forward_hook(self._double_k(m)))
                self.handles.append(m.to_k.register_forward_hook(lambda mod, a, out: torch.zeros_like(out)))
            elif name.startswith("single_transformer_blocks.") and name.endswith(".attn"):
                self.handles.append(m.to_qkv_mlp_proj.register_forward_hook(self._single(m)))
            else:
                continue
            for norm in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
                mod = getattr(m, norm, None)
                if mod is not None and getattr(mod, "weight", None) is not None:
                    self.saved.append((mod.weight, mod.weight.detach().clone()))
                    with torch.no_grad():
                        mod.weight.fill_(gain)

    def _count(self, mod, args, kwargs):
        self.call += 1
        self.text_len = kwargs["encoder_hidden_states"].shape[1]
        # the KV pipeline's step 0 puts the reference's tokens before the generated ones
        self.ref_first = kwargs.get("num_ref_tokens", 0) if kwargs.get("kv_cache_mode") == "extract" else 0

    @staticmethod
    def _unit(m, like):
        u = torch.zeros(m.head_dim, dtype=like.dtype)
        u[0] = 1.0
        return u.repeat(m.heads)

    def _set_q(self, q, m, start):
        block = q[:, start: start + self.mask.numel()]
        block[:, self.mask] = self._unit(m, q)

    def _set_k(self, k, m, start):
        for r in range(k.shape[0]):
            k[r, start + self.token_of(r, self.call)] = self._unit(m, k)

    def _double_q(self, m):
        def hook(mod, args, out):
            q = torch.zeros_like(out)
            self._set_q(q, m, self.ref_first)  # the image stream
            return q
        return hook

    def _double_k(self, m):
        def hook(mod, args, out):
            k = torch.zeros_like(out)
            self._set_k(k, m, 0)
            return k
        return hook

    def _single(self, m):
        def hook(mod, args, out):
            out = out.clone()
            q, k = out[..., : m.inner_dim], out[..., m.inner_dim: 2 * m.inner_dim]
            q.zero_()
            k.zero_()
            self._set_q(q, m, self.text_len + self.ref_first)  # one [text, image] sequence
            self._set_k(k, m, 0)
            return out
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()
        with torch.no_grad():
            for weight, value in self.saved:
                weight.copy_(value)


def hand_set_maps(pipe, grid, token_of, trace_kw=None, **run_kw):
    hand = Hand(pipe.transformer, grid, token_of)
    try:
        with trace(pipe, **(trace_kw or {})) as tc:
            run(pipe, **run_kw)
            return tc, hand.mask
    finally:
        hand.remove()


# ---- images, restoration ------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["dev", "klein"])
def test_traced_images_are_untraced_ones_and_the_pipeline_is_restored(which, dev, klein):
    pipe = dev if which == "dev" else klein
    tc = traced_equals_untraced(pipe, lambda: run(pipe, steps=2, guidance_scale=4.0))
    assert tc.num_steps == 2
    assert_maps_for_every_word(tc.heat_maps(0), WORDS)

    def boom(p, i, t, kw):
        raise KeyboardInterrupt

    before = pipeline_state(pipe)
    with pytest.raises(KeyboardInterrupt), trace(pipe):
        run(pipe, steps=2, callback_on_step_end=boom)
    assert_restored(pipe, before)


# ---- words in the chat templates ----------------------------------------------------------------------
def test_dev_words_are_the_prompts_tokens_at_the_left_padded_end(dev):
    """Mistral's template: ``<s>[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]prompt[/INST]``, padded on the left;
    nothing is dropped, so the key positions are the padded ids' positions."""
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input

    with trace(dev) as tc:
        run(dev)
        hm = tc.heat_maps(0)
    assert_maps_for_every_word(hm, WORDS)
    assert hm.maps.shape == (TEXT, 16, 24)
    ids = dev.tokenizer.apply_chat_template(
        format_input([PROMPT]), tokenize=True, return_dict=True, padding="max_length", truncation=True,
        max_length=TEXT,
    )["input_ids"][0]
    assert list(hm.tokens) == dev.tokenizer.convert_ids_to_tokens(ids)
    assert hm.tokens[0] == "<pad>" and hm.tokens[-1] == "[/INST]"
    positions = [p for w in hm.alignment.words for p in w.positions]
    assert positions == list(range(TEXT - 1 - 6, TEXT - 1))  # the six prompt tokens before [/INST]
    assert hm.tokens[hm.tokens.index("[INST]") + 1] == "a"
    assert [hm.tokens[p].lstrip("Ġ") for p in positions] == PROMPT.split()
    assert not {"inst", "system", "[inst]", "[/inst]", "mistral"} & set(hm.words)


def test_klein_words_follow_the_qwen3_user_turn(klein):
    with trace(klein) as tc:
        run(klein, guidance_scale=1.0)
        hm = tc.heat_maps(0)
    assert_maps_for_every_word(hm, WORDS)
    assert hm.tokens[:3] == ("<|im_start|>", "user", "Ċ") and hm.tokens[-1] == "<|endoftext|>"
    positions = [p for w in hm.alignment.words for p in w.positions]
    assert positions == list(range(3, 9))
    assert hm.tokens[9] == "<|im_end|>"
    assert not {"user", "assistant", "think", "im_start"} & set(hm.words)


# ---- hand-set q/k: norms, RoPE, slices, orientation ---------------------------------------------------
@pytest.mark.parametrize("with_reference", [False, True])
def test_dev_hand_set_token_owns_its_region_with_and_without_reference_tokens(dev, with_reference):
    kw = {"image": reference()} if with_reference else {}
    dog = TEXT - 1 - 4  # "dog": the third of the six prompt tokens before [/INST]
    tc, mask = hand_set_maps(dev, (16, 24), lambda r, c: dog, trace_kw={"keep_layers": True}, **kw)
    hm = tc.heat_maps(0)
    assert hm.word("dog").positions == (dog,)
    assert hm.maps.shape == (TEXT, 16, 24)  # the output grid: no reference token is an image query
    for block in ("double", "single"):
        assert_peaks_in_region(tc.heat_maps(0, layers=[block]).maps, dog, mask)


def test_dev_batch_left_padding_puts_each_prompt_elsewhere_and_each_image_gets_its_own(dev):
    prompts = ["a dog", "a red cat on a wooden bench"]
    # with left padding the last prompt token sits before [/INST] in both rows; the first word does not
    first = {i: TEXT - 1 - len(dev.tokenizer.tokenize(p)) for i, p in enumerate(prompts)}
    assert first[0] != first[1]
    tc, mask = hand_set_maps(dev, (16, 24), lambda r, c: first[r], prompt=prompts)
    assert tc.num_images == 2
    for i, words in enumerate([["a", "dog"], ["a", "red", "cat", "on", "wooden", "bench"]]):
        hm = tc.heat_maps(i)
        assert hm.words == words
        assert hm.word("a", occurrence=0).positions == (first[i],)
        assert_peaks_in_region(hm.maps, first[i], mask)


# ---- probabilities against a recomputation -------------------------------------------------------------
class Oracle:
    """q, k of one module recomputed from its projections with its own norms and RoPE, here."""

    def __init__(self, module, single):
        self.m, self.single, self.out, self.calls = module, single, {}, []
        projs = ("to_qkv_mlp_proj",) if single else ("to_q", "to_k", "add_q_proj", "add_k_proj")
        self.handles = [module.register_forward_pre_hook(self._pre, with_kwargs=True),
                        module.register_forward_hook(self._post)]
        for attr in projs:
            self.handles.append(getattr(module, attr).register_forward_hook(self._save(attr)))

    def _pre(self, mod, args, kwargs):
        self.out, self.rope = {}, kwargs["image_rotary_emb"]

    def _save(self, attr):
        def hook(mod, args, out):
            self.out[attr] = out.detach()
        return hook

    def _post(self, mod, args, out):
        from diffusers.models.embeddings import apply_rotary_emb

        m = self.m
        split = lambda x: x.unflatten(-1, (-1, m.head_dim))  # noqa: E731
        if self.single:
            fused = self.out["to_qkv_mlp_proj"]
            q, k = split(fused[..., : m.inner_dim]), split(fused[..., m.inner_dim: 2 * m.inner_dim])
            q, k = m.norm_q(q), m.norm_k(k)
        else:
            q = torch.cat([m.norm_added_q(split(self.out["add_q_proj"])), m.norm_q(split(self.out["to_q"]))], 1)
            k = torch.cat([m.norm_added_k(split(self.out["add_k_proj"])), m.norm_k(split(self.out["to_k"]))], 1)
        q, k = (apply_rotary_emb(x, self.rope, sequence_dim=1) for x in (q, k))
        scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * m.head_dim**-0.5
        self.calls.append(scores)

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("layer", [DOUBLE, SINGLE])
def test_text_and_model_probabilities_match_a_recomputation_with_reference_tokens(dev, layer):
    """With a reference image the model's softmax also runs over the reference's keys."""
    n = 16 * 24
    for probabilities in ("text", "model"):
        oracle = Oracle(dev.transformer.get_submodule(layer), single=layer == SINGLE)
        try:
            with trace(dev, steps=[0], layers=[layer], grid=None, probabilities=probabilities) as tc:
                run(dev, image=reference())
                maps = tc.heat_maps(0).maps
        finally:
            oracle.remove()
        scores = oracle.calls[0][0]  # step 0, the one row
        assert scores.shape[-1] == TEXT + n + 32 * 40  # text, generated, reference keys
        image = scores[:, TEXT: TEXT + n]
        p = image[..., :TEXT].softmax(-1) if probabilities == "text" else image.softmax(-1)[..., :TEXT]
        expected = p.mean(0).T.reshape(TEXT, 16, 24)
        torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-6)


# ---- klein: CFG as a separate call, batches ------------------------------------------------------------
def test_klein_negative_call_is_its_own_branch_and_batches_keep_their_images(klein):
    dog, other = 5, 0  # "dog" in the user turn; the negative call's keys own <|im_start|>
    tc, mask = hand_set_maps(
        klein, (16, 24), lambda r, c: dog if c % 2 == 0 else other, trace_kw={"negative": True},
        steps=2, guidance_scale=4.0,
    )
    assert tc.num_steps == 2 and tc.num_images == 1 and tc.generation.separate
    assert_peaks_in_region(tc.heat_maps(0).maps, dog, mask)
    neg = tc.heat_maps(0, branch="negative")
    assert_peaks_in_region(neg.maps, other, mask)
    assert neg.words == []  # klein's negative prompt is always ""
    assert neg.tokens[:3] == ("<|im_start|>", "user", "Ċ") and neg.tokens[3] == "<|im_end|>"

    # two prompts with CFG: the batch holds two images (not [negative, cond] halves)
    with trace(klein) as tc:
        run(klein, prompt=["a dog", "a red cat"], guidance_scale=4.0)
        assert tc.num_images == 2
        assert tc.heat_maps(0).words == ["a", "dog"] and tc.heat_maps(1).words == ["a", "red", "cat"]


# ---- the KV pipeline: reference tokens first at step 0, then cached ------------------------------------
def test_klein_kv_reference_tokens_first_then_cached(tokenizer_dirs):
    from diffusers import Flux2KleinKVPipeline

    c = flux2.tiny_flux2_klein(tokenizer_dirs[1]).components
    pipe = Flux2KleinKVPipeline(**{k: c[k] for k in ("scheduler", "vae", "text_encoder", "tokenizer", "transformer")})
    pipe.set_progress_bar_config(disable=True)
    warm(pipe)
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: seen.append((kw.get("kv_cache_mode"), kw["img_ids"][0, 0, 0].item())), with_kwargs=True
    )
    try:
        tc = traced_equals_untraced(pipe, lambda: run(pipe, steps=2, image=reference()))
    finally:
        hook.remove()
    assert seen[:2] == [("extract", 10), ("cached", 0)]  # step 0 starts with the reference's ids
    assert_maps_for_every_word(tc.heat_maps(0), WORDS)
    dog = 5
    tc, mask = hand_set_maps(pipe, (16, 24), lambda r, c: dog, trace_kw={"keep_steps": True},
                             steps=2, image=reference())
    for step in (0, 1):
        assert_peaks_in_region(tc.heat_maps(0, steps=[step]).maps, dog, mask)


# ---- klein inpainting: the source image is always appended as a reference -----------------------------
def test_klein_inpaint_with_cfg_keeps_the_generated_grid(klein):
    from diffusers import Flux2KleinInpaintPipeline

    pipe = Flux2KleinInpaintPipeline(**{k: klein.components[k] for k in (
        "scheduler", "vae", "text_encoder", "tokenizer", "transformer")})
    pipe.set_progress_bar_config(disable=True)
    mask = PIL.Image.new("L", (48, 64), 0)
    mask.paste(255, (0, 0, 24, 32))
    lengths = []
    hook = pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: lengths.append(kw["hidden_states"].shape[1]), with_kwargs=True
    )
    try:
        call = lambda: pipe(  # noqa: E731
            prompt=PROMPT, image=reference(48, 64), mask_image=mask, height=64, width=48, strength=0.9,
            num_inference_steps=3, guidance_scale=4.0, max_sequence_length=TEXT, output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images
        tc = traced_equals_untraced(pipe, call, negative=True)
    finally:
        hook.remove()
    assert set(lengths) == {2 * 32 * 24}  # the generated grid, then the source image's
    assert len(lengths) == 2 * 2 * tc.num_steps and tc.num_images == 1  # two runs, a cond and an uncond call a step
    hm = tc.heat_maps(0)
    assert_maps_for_every_word(hm, WORDS)
    assert hm.maps.shape == (TEXT, 32, 24) and hm.image_size == (64, 48)
    assert tc.heat_maps(0, branch="negative").words == []
