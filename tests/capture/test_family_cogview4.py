"""CogView4: joint [text, image] attention, left-padded GLM-4 text, cond and uncond as separate calls."""

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
from daamkit.testing.families.cogview4 import glm4_tokenizer, tiny_cogview4

PROMPT = "a red dog on a bench"
WORDS = ["a", "red", "dog", "on", "bench"]
LAYER = "transformer_blocks.0.attn1"
SITE = r"transformer_blocks\.\d+\.attn1"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    d = tmp_path_factory.mktemp("glm4")
    glm4_tokenizer(d)
    return tiny_cogview4(d)


def spelled(hm, word):
    """The text of the key tokens a word's map reads (byte-level BPE: 'Ġ' is the space)."""
    return "".join(hm.tokens[p] for p in hm.word(word).positions).replace("Ġ", " ")


def run(pipe, prompt=PROMPT, steps=2, h=32, w=48, **kw):
    kw.setdefault("guidance_scale", 1.0)
    return pipe(prompt, num_inference_steps=steps, height=h, width=w, generator=torch.Generator().manual_seed(0),
                output_type="np", **kw)


def test_traced_images_identical_and_pipeline_restored_also_after_an_error(pipe):
    tc = traced_equals_untraced(pipe, lambda: run(pipe, guidance_scale=3.0, negative_prompt="blurry"))
    assert tc.num_steps == 2 and tc.generation.separate
    before = pipeline_state(pipe)

    def boom(p, i, t, kw):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"), trace(pipe):
        run(pipe, guidance_scale=3.0, callback_on_step_end=boom)
    assert_restored(pipe, before)


def test_words_are_the_prompts_own_tokens_after_the_left_padding_and_prefix(pipe):
    with trace(pipe) as tc:
        run(pipe, steps=1)
        hm = tc.heat_maps(0)
    assert_maps_for_every_word(hm, WORDS)
    # [<|endoftext|> x 8, [gMASK], <sop>, a, red, dog, on, a, bench]: padded on the left to 16
    assert len(hm.tokens) == 16 and hm.tokens[:8] == ("<|endoftext|>",) * 8 and hm.tokens[8:10] == ("[gMASK]", "<sop>")
    assert hm.word("dog").positions == (12,) and hm.tokens[12] == "Ġdog"
    assert [p for w in WORDS for p in hm.word(w).positions] == [10, 14, 11, 12, 13, 15]

    long = "a photo of a red dog sitting on a wooden bench in the park on a sunny day"
    with trace(pipe) as tc:
        run(pipe, prompt=long, steps=1)
        hm = tc.heat_maps(0)
    assert len(hm.tokens) == 32  # 19 tokens, left-padded to the next multiple of 16
    assert hm.words == ["a", "photo", "of", "red", "dog", "sitting", "on", "wooden", "bench", "in", "the", "park",
                        "sunny", "day"]
    assert spelled(hm, "day") == " day" and hm.word("day").positions[-1] == 31


class RopeHandSet(HandSet):
    """CogView4's q/k LayerNorm has no weight (a norm cannot sharpen the scores) and only the image queries
    get RoPE. So each region query is the model's inverse rotation of the key direction ``w`` (with a
    zero-mean correction on a pair the keys leave empty, which LayerNorm then keeps as it is), the chosen
    text key is ``w`` and the other text keys ``-w``: after the model's own norm and RoPE, queries inside
    the region score +2 or more on the token and as much less on the others."""

    def __init__(self, pipe, grid, token, h, w, text_len=16, rows=None):
        self.rope = pipe.transformer.rope(torch.zeros(1, 4, h, w))  # (cos, sin), (N, D)
        self.n_image = grid[0] * grid[1]
        super().__init__(
            pipe.transformer, grid, token, queries=[(SITE, "to_q", lambda n: n - self.n_image)],
            keys=[(SITE, "to_k", 0)], norms=(), text_len=text_len, others=-1.0, rows=rows,
        )

    @staticmethod
    def _unit(heads, c, like):
        d = c // heads
        w = torch.zeros(d, dtype=like.dtype)
        w[0], w[d // 2] = 2**-0.5, -(2**-0.5)  # zero mean: LayerNorm only rescales it
        return w.repeat(heads)

    def _q(self, heads, offset):
        def hook(mod, args, out):
            q = torch.zeros_like(out)
            cos, sin = (t[self.mask][:, 0] for t in self.rope)  # the angle of pair (0, D/2) at each token
            d = out.shape[-1] // heads
            x = torch.zeros(int(self.mask.sum()), d)
            r = 2**-0.5
            x[:, 0] = r * cos - r * sin  # rope^-1 of w
            x[:, d // 2] = -r * cos - r * sin
            c = -(x[:, 0] + x[:, d // 2])
            x[:, 1] = x[:, 1 + d // 2] = c / 2
            block = q[:, out.shape[1] - self.n_image:]
            block[:, self.mask] = x.repeat(1, heads)
            return q

        return hook


def test_hand_set_token_owns_its_region_through_norm_and_rope(pipe):
    grid = (16, 24)  # 32x48 px, VAE scale 1, patch 2
    hand = RopeHandSet(pipe, grid, token=12, h=32, w=48)  # "dog"
    try:
        with trace(pipe) as tc:
            run(pipe, guidance_scale=3.0)
            hm = tc.heat_maps(0)
    finally:
        hand.remove()
    assert tuple(hm.maps.shape[-2:]) == grid and hm.image_size == (32, 48)
    assert hm.words == WORDS
    assert_peaks_in_region(hm.maps, 12, hand.mask)


class Oracle:
    """One attention module's image-query x text-key probabilities recomputed from its projections."""

    def __init__(self, module):
        self.m, self.calls, self.out = module, [], {}
        self.handles = [module.register_forward_pre_hook(self._pre, with_kwargs=True),
                        module.register_forward_hook(self._post)]
        for attr in ("to_q", "to_k"):
            self.handles.append(getattr(module, attr).register_forward_hook(self._save(attr)))

    def _pre(self, mod, args, kwargs):
        self.out = {"text": kwargs["encoder_hidden_states"].shape[1], "rope": kwargs["image_rotary_emb"]}

    def _save(self, attr):
        def hook(mod, args, out):
            self.out[attr] = out.detach()

        return hook

    def _post(self, mod, args, out):
        t = self.out["text"]

        def prep(x, norm):
            x = norm(x.unflatten(2, (self.m.heads, -1)).transpose(1, 2))
            return torch.cat([x[:, :, :t], apply_rotary_emb(x[:, :, t:], self.out["rope"], use_real_unbind_dim=-2)], 2)

        q, k = prep(self.out["to_q"], self.m.norm_q), prep(self.out["to_k"], self.m.norm_k)
        scores = (q[:, :, t:] @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5
        self.calls.append({"text": scores[..., :t].softmax(-1), "model": scores.softmax(-1)[..., :t]})

    def remove(self):
        for h in self.handles:
            h.remove()


def test_text_and_model_probabilities_match_a_recomputation(pipe):
    module = pipe.transformer.get_submodule(LAYER)
    maps = {}
    for probabilities in ("text", "model"):
        oracle = Oracle(module)
        try:
            with trace(pipe, steps=[0], layers=[LAYER], probabilities=probabilities, grid=None) as tc:
                run(pipe, steps=1, guidance_scale=3.0, negative_prompt="blurry")
                maps[probabilities] = tc.heat_maps(0).maps
        finally:
            oracle.remove()
        assert len(oracle.calls) == 2  # cond, then the negative prompt's own call
        h, w = maps[probabilities].shape[-2:]
        expected = oracle.calls[0][probabilities][0].mean(0).T.reshape(-1, h, w)
        torch.testing.assert_close(maps[probabilities], expected, rtol=1e-4, atol=1e-7)
    assert (maps["model"].sum(0) < maps["text"].sum(0) - 1e-3).all()
    # the pads are not masked (the model attends to them), so they carry probability too
    assert (maps["text"][:8].sum((1, 2)) > 0).all()


def test_negative_prompt_runs_as_its_own_call_with_its_own_length(pipe):
    long = "a photo of a red dog sitting on a wooden bench in the park on a sunny day"
    with trace(pipe) as tc:
        run(pipe, prompt=long, steps=1)
        plain = tc.heat_maps(0).maps
    with trace(pipe, negative=True) as tc:
        run(pipe, prompt=long, steps=1, guidance_scale=3.0, negative_prompt="a blurry photo")
        assert tc.num_steps == 1 and tc.num_images == 1
        cond, neg = tc.heat_maps(0), tc.heat_maps(0, branch="negative")
    torch.testing.assert_close(cond.maps, plain)  # the first call of the step is the positive one
    assert cond.maps.shape[0] == 32 and neg.maps.shape[0] == 16
    assert neg.words == ["a", "blurry", "photo"] and spelled(neg, "blurry") == " blurry"
    # two steps: each call keeps its own rows and length
    with trace(pipe, negative=True) as tc:
        run(pipe, prompt=long, guidance_scale=3.0, negative_prompt="a blurry photo")
        assert tc.num_steps == 2
        assert tc.heat_maps(0, branch="negative").maps.shape[0] == 16


def test_batch_of_prompts_gives_each_image_its_own_words(pipe):
    prompts = ["a dog", "a red cat on a bench"]
    with trace(pipe) as tc:
        run(pipe, prompt=prompts, steps=1, guidance_scale=3.0)
        assert tc.num_images == 2
        first, second = tc.heat_maps(0), tc.heat_maps(1)
    assert first.words == ["a", "dog"] and second.words == ["a", "red", "cat", "on", "bench"]
    # both rows end at the last key: the tokenizer and the pipeline pad on the left
    assert first.word("dog").positions == (15,) and second.word("bench").positions == (15,)
    assert not torch.allclose(first.maps[15], second.maps[15])

    # each image's map comes from its own row: the key at 15 is set by hand in row 1 only
    hand = RopeHandSet(pipe, (16, 24), token=15, h=32, w=48, rows=[1])
    try:
        with trace(pipe) as tc:
            run(pipe, prompt=prompts, steps=1)
            maps = [tc.heat_maps(i).maps for i in range(2)]
    finally:
        hand.remove()
    assert_peaks_in_region(maps[1], 15, hand.mask)
    assert maps[0][15][hand.mask.reshape(16, 24)].mean() < 0.2


def test_control_pipeline_shares_the_capture(pipe):
    from diffusers import CogView4ControlPipeline, CogView4Transformer2DModel

    torch.manual_seed(0)
    transformer = CogView4Transformer2DModel(**{**pipe.transformer.config, "in_channels": 8})
    control = CogView4ControlPipeline(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder, vae=pipe.vae,
                                      transformer=transformer, scheduler=pipe.scheduler)
    control.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 32, 48)

    def call():
        torch.manual_seed(0)  # the control image's VAE encoding samples from the global generator
        return control(PROMPT, control_image=image, num_inference_steps=2, height=32, width=48, guidance_scale=3.0,
                       generator=torch.Generator().manual_seed(0), output_type="np")

    tc = traced_equals_untraced(control, call)
    hm = tc.heat_maps(0)
    assert_maps_for_every_word(hm, WORDS)
    assert tuple(hm.maps.shape[-2:]) == (16, 24)
