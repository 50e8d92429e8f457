"""Tracing diffusion transformers with joint attention: SD3 and Flux."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from daamkit import TraceError, trace
from daamkit.testing.pipelines import tiny_sd3
from daamkit.tokens import WordNotFoundError

PROMPT = "a red dog on a bench"


def run(pipe, prompt=PROMPT, steps=2, h=32, w=48, seed=0, **kw):
    kw.setdefault("max_sequence_length", 16)
    return pipe(prompt, num_inference_steps=steps, height=h, width=w,
                generator=torch.Generator().manual_seed(seed), output_type="np", **kw).images


def joint_modules(pipe):
    for name, m in pipe.transformer.named_modules():
        if name.endswith(".attn") and hasattr(m, "to_q"):
            yield name, m


def state(pipe):
    procs = {n: m.processor for n, m in joint_modules(pipe)}
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in pipe.transformer.modules())
    return procs, hooks


def assert_restored(pipe, before):
    procs, hooks = state(pipe)
    assert hooks == before[1]
    assert all(procs[k] is before[0][k] for k in procs) and procs.keys() == before[0].keys()


class HandSet:
    """Image positions inside ``region`` put all their text attention on token ``token_of(row, batch)``.

    Works in the joint layout of each family ([image, text] for SD3's projections, [text, image] for
    Flux's single-stream sequence); norm weights are raised so the module's own RMSNorm gives a sharp
    softmax, which also checks that the capture applies those norms."""

    def __init__(self, pipe, grid, token_of, region=(0.0, 0.5, 0.5, 1.0), text_len=None):
        self.grid, self.token_of, self.region, self.text_len = grid, token_of, region, text_len
        self.handles = []
        for name, m in joint_modules(pipe):
            for norm in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
                mod = getattr(m, norm, None)
                if mod is not None and getattr(mod, "weight", None) is not None:
                    with torch.no_grad():
                        mod.weight.fill_(6.0)
            single = name.startswith("single_transformer_blocks")
            self.handles.append(m.to_q.register_forward_hook(self._q(m, single)))
            key = m.to_k if single else m.add_k_proj
            if key is not None:
                self.handles.append(key.register_forward_hook(self._k(m, single)))

    def _unit(self, m, c, like):
        d = c // m.heads
        u = torch.zeros(d, dtype=like.dtype)
        u[0] = 1.0
        return u.repeat(m.heads)

    def _mask(self):
        h, w = self.grid
        r0, r1, c0, c1 = self.region
        g = torch.zeros(h, w, dtype=torch.bool)
        g[int(r0 * h): int(math.ceil(r1 * h)), int(c0 * w): int(math.ceil(c1 * w))] = True
        return g.flatten()

    def _q(self, m, single):
        def hook(mod, args, out):
            q = torch.zeros_like(out)
            img = slice(out.shape[1] - self.grid[0] * self.grid[1], None) if single else slice(None)
            block = q[:, img]
            block[:, self._mask()] = self._unit(m, out.shape[-1], out)
            q[:, img] = block
            return q

        return hook

    def _k(self, m, single):
        def hook(mod, args, out):
            k = torch.zeros_like(out)
            for r in range(out.shape[0]):
                k[r, self.token_of(r, out.shape[0])] = self._unit(m, out.shape[-1], out)
            return k

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_images_unchanged_processors_restored_and_maps_peak_in_the_hand_set_region(family, request):
    pipe = request.getfixturevalue(family)  # only the family in use is built
    before = state(pipe)
    ref = run(pipe)
    with trace(pipe) as tc:
        out = run(pipe)
        hm = tc.heat_maps(0)
    assert np.array_equal(out, ref)
    assert_restored(pipe, before)
    assert hm.image_size == (32, 48)
    grid = hm.maps.shape[-2:]

    token = 3 if family == "sd3" else 2  # "dog": CLIP position 3 (after BOS); T5 position 2 (no BOS)
    hand = HandSet(pipe, tuple(grid), token_of=lambda r, b: token)
    try:
        with trace(pipe) as tc:
            run(pipe)
            maps = tc.heat_maps(0).maps
    finally:
        hand.remove()
    inside = hand._mask().reshape(tuple(grid))
    m = maps[token]
    assert m[inside].mean() > 10 * m[~inside].mean()
    assert inside.flatten()[int(m.argmax())]
    others = torch.cat([maps[:token], maps[token + 1:]])
    assert others[:, inside].mean() < 0.05 * m[inside].mean()


def test_sd3_words_pool_clip_and_t5_positions(sd3):
    with trace(sd3) as tc:
        run(sd3, prompt="a photorealistic hippopotamus on a bench")
        hm = tc.heat_maps(0)
    assert hm.maps.shape[0] == 77 + 16  # CLIP tokens then max_sequence_length T5 tokens
    word = hm.word("hippopotamus")
    clip_pos = [p for p in word.positions if p < 77]
    t5_pos = [p for p in word.positions if p >= 77]
    assert len(clip_pos) >= 2 and t5_pos  # a multi-token word in CLIP, present in T5 too
    assert hm.alignment.tokens[77 + t5_pos[0] - 77].startswith("\u2581")
    torch.testing.assert_close(word.value, hm.maps[list(word.positions)].mean(0))
    assert hm.words == ["a", "photorealistic", "hippopotamus", "on", "bench"]


def test_flux_t5_truncation_is_reported(flux):
    long = "a red dog on a bench with a blue cat and a green tree above a yellow house"
    with trace(flux) as tc:
        run(flux, prompt=long, max_sequence_length=8)
        # diffusers' own T5 truncation warning names no text (it slices at CLIP's 77), so the words
        # past the cut are only known when the prompt is given
        hm = tc.heat_maps(0, prompt=long)
    assert hm.maps.shape[0] == 8
    assert "house" in hm.truncated_words
    with pytest.raises(WordNotFoundError, match="past the"):
        hm.word("house")
    assert hm.word("red").positions == (1,)


def test_sd3_batches_and_cfg_halves(sd3):
    def token_of(r, b):
        n = b // 2
        return 10 if r < n else 1 + (r - n)  # negative rows -> 10, image i -> token 1 + i

    grid = (32, 48)  # the tiny SD3 VAE does not downsample, patch size 1
    hand = HandSet(sd3, grid, token_of)
    try:
        with trace(sd3, negative=True) as tc:
            run(sd3, prompt=["a dog", "a red cat"], num_images_per_prompt=2)
            assert tc.num_images == 4
            maps = [tc.heat_maps(i) for i in range(4)]
            neg = tc.heat_maps(0, branch="negative")
    finally:
        hand.remove()
    inside = hand._mask().reshape(grid)
    for i, hm in enumerate(maps):
        assert int(hm.maps[:, inside].mean(-1).argmax()) == 1 + i
    assert int(neg.maps[:, inside].mean(-1).argmax()) == 10
    assert maps[2].words == ["a", "red", "cat"] and maps[1].words == ["a", "dog"]


def test_flux_batches_true_cfg_and_block_selection(flux):
    with trace(flux, keep_layers=True) as tc:
        run(flux, prompt=["a dog", "a red cat"], steps=1)
        assert tc.num_images == 2 and not tc._gen.cfg
        single = tc.heat_maps(1, layers=["single"]).maps
        double = tc.heat_maps(1, layers=["double"]).maps
        both = tc.heat_maps(1).maps
        assert tc.heat_maps(1).words == ["a", "red", "cat"]
    torch.testing.assert_close(both, (single + double) / 2)
    with trace(flux, layers=["single"]) as tc:
        run(flux, prompt=["a dog", "a red cat"], steps=1)
        torch.testing.assert_close(tc.heat_maps(1).maps, single)

    # true CFG: the negative prompt is a second call at the same step; cond maps are unaffected
    with trace(flux) as tc:
        run(flux, steps=1)
        plain = tc.heat_maps(0).maps
    with trace(flux, negative=True) as tc:
        run(flux, steps=1, true_cfg_scale=2.0, negative_prompt="a blurry photo")
        assert tc.num_steps == 1
        torch.testing.assert_close(tc.heat_maps(0).maps, plain)
        assert tc.heat_maps(0, branch="negative").words == ["a", "blurry", "photo"]
    # over several steps each call keeps its own rows: the positive call is not split in halves
    with trace(flux, negative=True) as tc:
        run(flux, steps=2, true_cfg_scale=2.0, negative_prompt="a blurry photo")
        assert tc.num_steps == 2
        cond, neg = tc.heat_maps(0).maps, tc.heat_maps(0, branch="negative").maps
        assert cond.sum() > 0 and neg.sum() > 0
        assert not torch.allclose(cond[:4], neg[:4])


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_restored_after_errors_and_nested_traces_refused(family, request):
    pipe = request.getfixturevalue(family)  # only the family in use is built
    before = state(pipe)

    def boom(p, i, t, kw):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), trace(pipe):
        run(pipe, callback_on_step_end=boom)
    assert_restored(pipe, before)
    with trace(pipe), pytest.raises(TraceError, match="already being traced"):
        with trace(pipe):
            pass
    assert_restored(pipe, before)


def test_prompt_embeds_with_prompt_given(flux):
    emb, pooled, _ = flux.encode_prompt(PROMPT, PROMPT, max_sequence_length=16)
    with trace(flux) as tc:
        flux(prompt_embeds=emb, pooled_prompt_embeds=pooled, num_inference_steps=1, height=32, width=32,
             output_type="np")
        assert tc.heat_maps(0, prompt=PROMPT).words == ["a", "red", "dog", "on", "bench"]


def test_sd35_layout_dual_attention_and_context_pre_only(clip_tokenizer_dir, clip_tokenizer_2_dir, t5_tokenizer_dir):
    """SD3.5 blocks carry an image-only ``attn2`` (no text keys: not traced) and the last block is
    ``context_pre_only`` (no text output, but its image queries still attend to the text: traced)."""
    pipe = tiny_sd3(clip_tokenizer_dir, clip_tokenizer_2_dir, t5_tokenizer_dir, dual_attention_layers=(0,))
    blocks = pipe.transformer.transformer_blocks
    assert blocks[0].attn2 is not None and blocks[-1].context_pre_only
    before = state(pipe)
    ref = run(pipe)
    with trace(pipe, keep_layers=True) as tc:
        out = run(pipe)
        names = sorted(tc._gen.accumulator.layers)
        last = tc.heat_maps(0, layers=[f"transformer_blocks.{len(blocks) - 1}"])
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert_restored(pipe, before)
    assert names == [f"transformer_blocks.{i}.attn" for i in range(len(blocks))]
    assert last.maps.sum() > 0


def test_fused_projections_give_the_same_maps(flux):
    """Queries and keys are read at the attention call, so fused q/k/v projections change nothing."""
    with trace(flux) as tc:
        ref = run(flux, steps=1)
        plain = tc.heat_maps(0).maps
    before = state(flux)
    flux.transformer.fuse_qkv_projections()
    try:
        with trace(flux) as tc:
            out = run(flux, steps=1)
            fused = tc.heat_maps(0).maps
    finally:
        flux.transformer.unfuse_qkv_projections()
    np.testing.assert_allclose(out, ref, atol=1e-5)
    torch.testing.assert_close(fused, plain, atol=1e-5, rtol=1e-4)
    assert state(flux)[1] == before[1]


class ProjectionOracle:
    """Recomputes one module's image-query x text-key probabilities from its projections, with its own
    q/k norms and rotary embedding applied here, independently of where the capture reads them."""

    def __init__(self, module, kind):
        self.m, self.kind, self.out, self.rope = module, kind, {}, None
        self.handles = [module.register_forward_pre_hook(self._pre, with_kwargs=True)]
        for attr in ("to_q", "to_k", "add_k_proj"):
            proj = getattr(module, attr, None)
            if proj is not None:
                self.handles.append(proj.register_forward_hook(self._save(attr)))
        self.calls = []
        self.handles.append(module.register_forward_hook(self._post))

    def _pre(self, mod, args, kwargs):
        self.out, self.rope = {}, kwargs.get("image_rotary_emb")

    def _save(self, attr):
        def hook(mod, args, out):
            self.out.setdefault(attr, out.detach())
        return hook

    def _post(self, mod, args, out):
        from diffusers.models.embeddings import apply_rotary_emb

        m, heads = self.m, self.m.heads
        split = lambda x: x.unflatten(-1, (heads, -1))  # noqa: E731
        q, k = m.norm_q(split(self.out["to_q"])), m.norm_k(split(self.out["to_k"]))
        if self.kind == "single":  # one [text, image] sequence
            t = self.text_len
            keys, text = k, slice(0, t)
            q = q
        else:
            kt = m.norm_added_k(split(self.out["add_k_proj"]))
            t = kt.shape[1]
            keys = torch.cat([kt, k], 1) if self.kind == "double" else torch.cat([k, kt], 1)
            text = slice(0, t) if self.kind == "double" else slice(k.shape[1], k.shape[1] + t)
            if self.kind == "double":
                q = torch.cat([torch.zeros_like(kt), q], 1)  # placeholders keep the rotary positions
        if self.rope is not None:
            q, keys = (apply_rotary_emb(x, self.rope, sequence_dim=1) for x in (q, keys))
        if self.kind != "sd3":
            q = q[:, t:]
        scores = torch.einsum("bqhd,bkhd->bhqk", q.float(), keys.float()) * q.shape[-1] ** -0.5
        self.calls.append({"text": scores[..., text].softmax(-1), "model": scores.softmax(-1)[..., text]})


@pytest.mark.parametrize("family,layer,kind", [
    ("sd3", "transformer_blocks.0.attn", "sd3"),
    ("flux", "transformer_blocks.0.attn", "double"),
    ("flux", "single_transformer_blocks.0.attn", "single"),
])
def test_text_and_model_probabilities_match_a_recomputation_from_the_projections(family, layer, kind, request):
    pipe = request.getfixturevalue(family)  # only the family in use is built
    module = pipe.transformer.get_submodule(layer)
    maps = {}
    for probabilities in ("text", "model"):
        oracle = ProjectionOracle(module, kind)
        oracle.text_len = 16
        try:
            with trace(pipe, steps=[0], layers=[layer], probabilities=probabilities) as tc:
                run(pipe, steps=1, h=32, w=48)
                maps[probabilities] = tc.heat_maps(0).maps
        finally:
            for h in oracle.handles:
                h.remove()
        p = oracle.calls[0][probabilities]
        cond = p[-1]  # no CFG here, one row; the last row is the conditional one either way
        h, w = maps[probabilities].shape[-2:]
        expected = cond.mean(0).T.reshape(-1, h, w)
        torch.testing.assert_close(maps[probabilities], expected, rtol=1e-4, atol=1e-6)
    # the model's probabilities leave part of the mass on the image keys; the text ones sum to one
    assert (maps["model"].sum(0) < maps["text"].sum(0) - 1e-3).all()
    torch.testing.assert_close(maps["text"].sum(0), torch.ones_like(maps["text"][0]), rtol=1e-4, atol=1e-4)


def test_attention_that_bypasses_sdpa_is_reported_not_left_empty(flux, monkeypatch):
    """A backend that never calls PyTorch's scaled_dot_product_attention hides q and k: heat_maps says so."""
    import torch.nn.functional as F

    real = F.scaled_dot_product_attention

    def other_kernel(*args, **kwargs):
        with torch._C.DisableTorchFunction():  # a kernel the torch-function mode never sees
            return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", other_kernel)
    with trace(flux) as tc:
        run(flux, steps=1)
        with pytest.raises(TraceError, match="set_attention_backend"):
            tc.heat_maps(0)
    monkeypatch.undo()
    with trace(flux) as tc:
        run(flux, steps=1)
        assert tc.heat_maps(0).maps.sum() > 0
