"""FLUX.1 Kontext (``FluxKontextPipeline`` on the Flux transformer, the ``flux`` family): the reference image's
tokens follow the generated image's in the image part; they are neither image queries nor text keys."""

from __future__ import annotations

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
from daamkit.capture.families import family_of
from daamkit.testing.families import kontext

PROMPT = "a red dog on a bench"
WORDS = ["a", "red", "dog", "on", "bench"]
TEXT = 16  # max_sequence_length
DOUBLE, SINGLE = "transformer_blocks.0.attn", "single_transformer_blocks.0.attn"
GRID = (16, 24)  # 32x48 px output, 2 px per token
REF_GRID = (32, 24)  # the 48x64 px reference


@pytest.fixture(scope="module")
def pipe(clip_tokenizer_dir, t5_tokenizer_dir):
    return kontext.tiny_flux_kontext(clip_tokenizer_dir, t5_tokenizer_dir)


def reference():
    return PIL.Image.new("RGB", (48, 64), (200, 30, 30))


def run(pipe, prompt=PROMPT, steps=1, h=32, w=48, **kw):
    kw.setdefault("max_sequence_length", TEXT)
    kw.setdefault("image", reference())
    # Kontext rescales the output to max_area and the reference to ~1 MP unless told otherwise
    return pipe(prompt=prompt, num_inference_steps=steps, height=h, width=w, max_area=h * w, _auto_resize=False,
                output_type="np", generator=torch.Generator().manual_seed(0), **kw).images


def test_grid_is_the_generated_images_with_the_reference_tokens_present(pipe):
    family, denoiser = family_of(pipe)
    assert family.name == "flux" and "FluxKontextPipeline" in family.pipelines
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append((a, kw)), with_kwargs=True)
    try:
        run(pipe)
    finally:
        hook.remove()
    args, kwargs = seen[0]
    assert kwargs["hidden_states"].shape[1] == GRID[0] * GRID[1] + REF_GRID[0] * REF_GRID[1]
    assert family.grid(denoiser, args, kwargs) == GRID


def test_traced_images_are_untraced_ones_and_the_pipeline_is_restored(pipe):
    tc = traced_equals_untraced(pipe, lambda: run(pipe, steps=2))
    assert tc.num_steps == 2
    hm = tc.heat_maps(0)
    assert_maps_for_every_word(hm, WORDS)
    assert hm.maps.shape == (TEXT, *GRID) and hm.image_size == (32, 48)
    assert [w.positions for w in hm.alignment.words] == [(0,), (1,), (2,), (3,), (4,), (5,)]

    def boom(p, i, t, kw):
        raise KeyboardInterrupt

    before = pipeline_state(pipe)
    with pytest.raises(KeyboardInterrupt), trace(pipe):
        run(pipe, steps=2, callback_on_step_end=boom)
    assert_restored(pipe, before)


@pytest.mark.parametrize("with_reference", [True, False])
def test_hand_set_token_owns_its_region_with_reference_tokens_present(pipe, with_reference):
    kw = {} if with_reference else {"image": None}
    hand = HandSet(
        pipe.transformer, GRID, token=2,  # "dog": T5 position 2
        queries=[(r"transformer_blocks\.\d+\.attn", "to_q", 0), (r"single_transformer_blocks\.\d+\.attn", "to_q", TEXT)],
        keys=[(r"transformer_blocks\.\d+\.attn", "add_k_proj", 0), (r"single_transformer_blocks\.\d+\.attn", "to_k", 0)],
    )
    try:
        with trace(pipe, keep_layers=True) as tc:
            run(pipe, **kw)
            for block in ("double", "single"):
                assert_peaks_in_region(tc.heat_maps(0, layers=[block]).maps, 2, hand.mask)
    finally:
        hand.remove()


class Oracle:
    """One module's image-query x text-key scores from its projections, norms and RoPE, computed here."""

    def __init__(self, module, single):
        self.m, self.single, self.out, self.calls = module, single, {}, []
        self.handles = [module.register_forward_pre_hook(self._pre, with_kwargs=True),
                        module.register_forward_hook(self._post)]
        for attr in ("to_q", "to_k") + (() if single else ("add_q_proj", "add_k_proj")):
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
        split = lambda x: x.unflatten(-1, (m.heads, -1))  # noqa: E731
        q, k = m.norm_q(split(self.out["to_q"])), m.norm_k(split(self.out["to_k"]))
        if not self.single:
            q = torch.cat([m.norm_added_q(split(self.out["add_q_proj"])), q], 1)
            k = torch.cat([m.norm_added_k(split(self.out["add_k_proj"])), k], 1)
        q, k = (apply_rotary_emb(x, self.rope, sequence_dim=1) for x in (q, k))
        self.calls.append(torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * q.shape[-1] ** -0.5)

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("layer", [DOUBLE, SINGLE])
def test_model_probabilities_normalise_over_the_reference_keys_too(pipe, layer):
    n = GRID[0] * GRID[1]
    for probabilities in ("text", "model"):
        oracle = Oracle(pipe.transformer.get_submodule(layer), single=layer == SINGLE)
        try:
            with trace(pipe, steps=[0], layers=[layer], grid=None, probabilities=probabilities) as tc:
                run(pipe)
                maps = tc.heat_maps(0).maps
        finally:
            oracle.remove()
        scores = oracle.calls[0][0]
        assert scores.shape[-1] == TEXT + n + REF_GRID[0] * REF_GRID[1]
        image = scores[:, TEXT: TEXT + n]
        p = image[..., :TEXT].softmax(-1) if probabilities == "text" else image.softmax(-1)[..., :TEXT]
        torch.testing.assert_close(maps, p.mean(0).T.reshape(TEXT, *GRID), rtol=1e-4, atol=1e-6)


def test_true_cfg_with_a_reference_and_two_prompts(pipe):
    """The negative prompt runs as its own call (both calls carry the reference); two prompts are two images."""
    with trace(pipe, steps=[0]) as tc:
        run(pipe, prompt=["a dog", "a red cat"])
        plain = [tc.heat_maps(i).maps for i in range(2)]
    with trace(pipe, steps=[0], negative=True) as tc:
        run(pipe, prompt=["a dog", "a red cat"], steps=2, true_cfg_scale=2.0, negative_prompt="a blurry photo")
        assert tc.num_images == 2 and tc.num_steps == 2
        for i, words in enumerate([["a", "dog"], ["a", "red", "cat"]]):
            assert tc.heat_maps(i).words == words
            torch.testing.assert_close(tc.heat_maps(i).maps, plain[i])
        assert tc.heat_maps(1, branch="negative").words == ["a", "blurry", "photo"]
