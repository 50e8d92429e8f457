"""Attention interventions (``daamkit.intervene``): prompt-to-prompt reweighting of a word's attention,
checked against a recomputation by hand at the model's own attention call, on the UNet and on joint and
cross-attention transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from family_checks import assert_restored, pipeline_state
from torch.overrides import TorchFunctionMode

from daamkit import trace
from daamkit.capture import UnsupportedPipelineError
from daamkit.errors import InputError, user_message
from daamkit.intervene import AttentionEdit, intervene

PROMPT = "a dog on a bench"


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    from daamkit.testing.pipelines import tiny_sd
    from daamkit.testing.tokenizers import clip_tokenizer

    d = tmp_path_factory.mktemp("clip")
    clip_tokenizer(d)
    return tiny_sd(str(d))


def run_sd(pipe, prompt=PROMPT, steps=3, size=64, **kw):
    return pipe(prompt, num_inference_steps=steps, height=size, width=size,
                generator=torch.Generator().manual_seed(0), output_type="np", **kw).images[0]


def left_half(h: int, w: int) -> np.ndarray:
    region = np.zeros((h, w), bool)
    region[:, : w // 2] = True
    return region


class _Recorder(TorchFunctionMode):
    """Records the first attention call of one module: its inputs and the output the model got back."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[tuple, dict, torch.Tensor]] = []
        self.armed = False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.scaled_dot_product_attention and self.armed:
            self.armed = False
            self.calls.append((args, {k: v for k, v in kwargs.items()}, out.detach().clone()))
        return out


def _record(module):
    """Hooks that push a recorder above whatever modes the module's earlier hooks pushed, so that it
    sees the output after the intervention's correction."""
    rec = _Recorder()

    def pre(m, args, kwargs):
        rec.armed = True
        rec.__enter__()

    def post(m, args, kwargs, out):
        rec.__exit__(None, None, None)

    return rec, [module.register_forward_pre_hook(pre, with_kwargs=True),
                 module.register_forward_hook(post, with_kwargs=True, always_call=True)]


def _by_hand(args, kwargs, rows, queries, keys, scale):
    """softmax over every key (with the mask), the chosen block times ``scale``, then @ V, in fp32."""
    q, k, v = (kwargs.get(n, args[i] if len(args) > i else None) for i, n in enumerate(("query", "key", "value")))
    mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
    s = kwargs.get("scale") or q.shape[-1] ** -0.5
    scores = q.float() @ k.float().transpose(-1, -2) * s
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    p = scores.softmax(-1)
    weight = torch.ones_like(p)
    for r in rows:
        weight[r, :, queries[:, None], keys[None, :]] = scale
    return (p * weight) @ v.float()


def check_exact(pipe, call, module_name, word, layout, scale=0.0):
    """The corrected output of ``module_name``'s attention equals the reweighting done by hand.

    layout(n_image, n_text) -> (image query offset, text key offset, cond rows), with the token grid and
    text length the trace finds."""
    with trace(pipe) as tc:
        image = call()
        hm = tc.heat_maps(0)
    positions = hm.alignment.positions(word)
    (h, w), n_text = hm.grid_size, len(hm.tokens)
    size = image.shape[:2]
    module = dict(pipe.components[_denoiser(pipe)].named_modules())[module_name]
    before = pipeline_state(pipe)
    with intervene(pipe, PROMPT, [AttentionEdit(word, scale, region=left_half(*size))]) as log:
        rec, handles = _record(module)
        try:
            call()
        finally:
            for handle in handles:
                handle.remove()
    assert_restored(pipe, before)
    assert module_name in log.layers and log.word_keys[0] == positions
    assert rec.calls
    for args, kwargs, out in rec.calls:
        q = kwargs.get("query", args[0] if args else None)
        start, key_start, rows = layout(h * w, n_text)
        lh, lw = h, w
        while lh * lw > q.shape[2]:  # a UNet layer below the latent resolution: each level halves the grid
            lh, lw = -(-lh // 2), -(-lw // 2)
        cols = torch.arange(lh * lw) % lw
        queries = start + (cols < lw // 2).nonzero().flatten()
        keys = key_start + torch.tensor(positions)
        expected = _by_hand(args, kwargs, rows, queries, keys, scale)
        torch.testing.assert_close(out.float(), expected, atol=1e-5, rtol=1e-5)
        # the unconditional rows and the queries outside the region are the model's own
        plain = F.scaled_dot_product_attention(*args, **kwargs)
        others = [r for r in range(q.shape[0]) if r not in rows]
        assert torch.equal(out[others], plain[others])
        assert not torch.allclose(out[rows][:, :, queries], plain[rows][:, :, queries])
    return log


def _denoiser(pipe) -> str:
    return "unet" if "unet" in pipe.components and pipe.components["unet"] is not None else "transformer"


# ---- UNet ------------------------------------------------------------------------------------------
def test_scale_one_is_bit_identical_and_hooks_go(sd):
    ref = run_sd(sd)
    before = pipeline_state(sd)
    with intervene(sd, PROMPT, [AttentionEdit("dog", 1.0, region=left_half(64, 64))]) as log:
        out = run_sd(sd)
    assert np.array_equal(out, ref)
    assert log.calls == [] and log.generations == 1
    assert_restored(sd, before)


def test_unet_correction_is_exact(sd):
    def layout(n_image, n_text):
        return 0, 0, [1]  # CFG rows are [uncond, cond]

    # a layer at half the latent resolution: the region is resized to its grid
    log = check_exact(sd, lambda: run_sd(sd, steps=2), "down_blocks.1.attentions.1.transformer_blocks.0.attn2", "dog",
                      layout)
    assert log.steps == [0, 1] and log.word_keys == {0: [2]}


def test_deletion_in_region_changes_mostly_the_region(sd):
    ref = run_sd(sd)
    region = left_half(64, 64)
    with intervene(sd, PROMPT, [AttentionEdit("dog", 0.0, region=region)]) as log:
        out = run_sd(sd)
    change = np.linalg.norm(out.astype(np.float64) - ref, axis=-1)
    assert change.max() > 1e-4  # measurably changed
    assert change[region].mean() > 1.2 * change[~region].mean()
    assert len(log.layers) == 6 and log.steps == [0, 1, 2]
    # amplifying moves the image the other way from deleting
    with intervene(sd, PROMPT, [AttentionEdit("dog", 3.0, region=region)]):
        up = run_sd(sd)
    assert np.mean((up - ref) * (out - ref)) < 0


def test_steps_occurrence_and_composition(sd):
    with intervene(sd, "a dog and a dog", [AttentionEdit("dog", 0.0, steps=(1, 2), occurrence=1)]) as log:
        run_sd(sd, prompt="a dog and a dog")
    assert log.steps == [1] and log.word_keys == {0: [5]}
    # two edits of one word compose multiplicatively: 0.5 * 2 == 1 leaves the image as it was
    ref = run_sd(sd)
    with intervene(sd, PROMPT, [AttentionEdit("dog", 0.5), AttentionEdit("dog", 2.0)]):
        same = run_sd(sd)
    np.testing.assert_allclose(same, ref, atol=1e-5)


def test_batch_edits_apply_to_their_own_image(sd):
    prompts = ["a dog on a bench", "a red cat"]

    def call():
        gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
        return sd(prompts, num_inference_steps=2, height=64, width=64, generator=gens, output_type="np").images

    ref = call()
    with intervene(sd, prompts, [AttentionEdit("cat", 0.0, image=1)]) as log:
        out = call()
    assert np.array_equal(out[0], ref[0]) and not np.array_equal(out[1], ref[1])
    assert log.word_keys == {0: [3]} and log.prompt == prompts  # <bos> a red cat
    with intervene(sd, prompts, [AttentionEdit("dog", 0.0, image=0), AttentionEdit("cat", 0.0, image=1)]):
        both = call()
    assert not np.array_equal(both[0], ref[0]) and np.array_equal(both[1], out[1])
    with pytest.raises(InputError, match="'cat' is not a word of the prompt 'a dog on a bench'"):
        intervene(sd, prompts, [AttentionEdit("cat", 0.0, image=0)]).__enter__()
    before = pipeline_state(sd)
    with pytest.raises(InputError, match="for image 2, but the pipeline call makes 2 image"):
        with intervene(sd, prompts, [AttentionEdit("cat", 0.0, image=2)]):
            call()
    assert_restored(sd, before)


def test_with_trace_records_the_intervened_model(sd):
    edit = AttentionEdit("dog", 0.0, region=left_half(64, 64))
    with intervene(sd, PROMPT, [edit]):
        alone = run_sd(sd)
    with trace(sd) as tc:
        run_sd(sd)
        plain = tc.heat_maps(0).word("bench").value
    before = pipeline_state(sd)
    with intervene(sd, PROMPT, [edit]), trace(sd) as tc:
        both = run_sd(sd)
        edited = tc.heat_maps(0).word("bench").value
    assert np.array_equal(both, alone)
    assert not torch.allclose(edited, plain)  # later layers and steps attend differently after the edit
    assert_restored(sd, before)


def test_hooks_removed_after_an_exception(sd):
    before = pipeline_state(sd)

    def boom(pipe, i, t, kw):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt), intervene(sd, PROMPT, [AttentionEdit("dog", 0.0)]):
        run_sd(sd, callback_on_step_end=boom)
    assert_restored(sd, before)


def test_bad_input_is_one_clear_error(sd):
    with pytest.raises(InputError, match="'cat' is not a word of the prompt") as e:
        with intervene(sd, PROMPT, [AttentionEdit("cat", 0.0)]):
            pass
    assert "\n" not in user_message(e.value)
    with pytest.raises(InputError, match="empty"):
        AttentionEdit("dog", 0.0, region=np.zeros((64, 64), bool))
    with pytest.raises(InputError, match="2-D bool"):
        AttentionEdit("dog", 0.0, region=np.ones((64, 64)))
    with pytest.raises(InputError, match="scale"):
        AttentionEdit("dog", -1.0)
    with pytest.raises(InputError, match="steps"):
        AttentionEdit("dog", 0.0, steps=(3, 1))
    with pytest.raises(InputError, match="occurrence must be 0..0"):
        with intervene(sd, PROMPT, [AttentionEdit("dog", 0.0, occurrence=1)]):
            pass
    before = pipeline_state(sd)
    with pytest.raises(InputError, match="32x32 pixels but the pipeline generates 64x64"):
        with intervene(sd, PROMPT, [AttentionEdit("dog", 0.0, region=left_half(32, 32))]):
            run_sd(sd)
    assert_restored(sd, before)
    with pytest.raises(UnsupportedPipelineError):
        intervene(object(), PROMPT, [AttentionEdit("dog", 0.0)]).__enter__()


def test_a_processor_without_sdpa_is_refused(sd):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    sd.unet.set_attn_processor(AttnProcessor())
    try:
        with pytest.raises(UnsupportedPipelineError, match="scaled_dot_product_attention"):
            with intervene(sd, PROMPT, [AttentionEdit("dog", 0.0)]):
                run_sd(sd)
    finally:
        sd.unet.set_attn_processor(AttnProcessor2_0())


# ---- transformers ----------------------------------------------------------------------------------
def _dit_call(pipe, **kw):
    return lambda: pipe(PROMPT, num_inference_steps=2, height=32, width=48, generator=torch.Generator().manual_seed(0),
                        output_type="np", **kw).images[0]


def test_sd3_joint_correction_is_exact(sd3):
    call = _dit_call(sd3, max_sequence_length=16)

    def layout(n_image, n_text):  # [image, text]; CFG rows [uncond, cond]
        return 0, n_image, [1]

    check_exact(sd3, call, "transformer_blocks.1.attn", "dog", layout)


def test_flux_double_and_single_corrections_are_exact(flux):
    call = _dit_call(flux, max_sequence_length=16)

    def layout(n_image, n_text):  # [text, image]; no CFG batch
        return n_text, 0, [0]

    check_exact(flux, call, "transformer_blocks.0.attn", "dog", layout, scale=2.5)
    check_exact(flux, call, "single_transformer_blocks.1.attn", "bench", layout)


def test_pixart_cross_correction_is_exact(t5_tokenizer_dir):
    from daamkit.testing.families.pixart import tiny_pixart_alpha

    pipe = tiny_pixart_alpha(t5_tokenizer_dir)
    call = _dit_call(pipe, use_resolution_binning=False, clean_caption=False)

    def layout(n_image, n_text):  # cross-attention over masked T5 keys; CFG rows [uncond, cond]
        return 0, 0, [1]

    check_exact(pipe, call, "transformer_blocks.1.attn2", "dog", layout)


def test_flux_with_trace_stacks_both_modes(flux):
    call = _dit_call(flux, max_sequence_length=16)
    edit = AttentionEdit("dog", 0.0, region=left_half(32, 48))
    ref = call()
    with intervene(flux, PROMPT, [edit]) as log:
        alone = call()
    before = pipeline_state(flux)
    with intervene(flux, PROMPT, [edit]), trace(flux) as tc:
        both = call()
        words = tc.heat_maps(0).words
    assert not np.array_equal(alone, ref) and np.array_equal(both, alone)
    assert "dog" in words and len(log.layers) == 4  # 2 double + 2 single blocks
    assert_restored(flux, before)


# ---- families whose keys need more than a tokenizer: chat templates, per-row packing, true CFG ----------
def _zimage(d):
    from daamkit.testing.families.zimage import qwen3_tokenizer, tiny_zimage

    qwen3_tokenizer(d)
    return tiny_zimage(d), {"height": 32, "width": 48}


def _lumina2(d):
    from daamkit.testing.families.lumina2 import gemma_tokenizer, tiny_lumina2

    gemma_tokenizer(d)  # guidance runs the negative prompt as a call of its own
    return tiny_lumina2(d), {"height": 64, "width": 96, "guidance_scale": 4.0}


def _qwenimage(d):
    from daamkit.testing.families.qwenimage import qwen2_5_vl_tokenizer, tiny_qwenimage

    qwen2_5_vl_tokenizer(d)
    return tiny_qwenimage(d), {"height": 32, "width": 48, "true_cfg_scale": 4.0, "negative_prompt": "a cat"}


@pytest.mark.parametrize("build", [_zimage, _lumina2, _qwenimage], ids=["zimage", "lumina2", "qwenimage"])
def test_template_and_packed_families_edit_the_words_own_keys(tmp_path, build):
    pipe, kw = build(tmp_path)
    pipe.set_progress_bar_config(disable=True)

    def call():
        return pipe(prompt=PROMPT, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                    output_type="np", **kw).images[0]

    with trace(pipe) as tc:
        ref = call()
        positions = tc.heat_maps(0).alignment.positions("dog")
    before = pipeline_state(pipe)
    with intervene(pipe, PROMPT, [AttentionEdit("dog", 0.0, region=left_half(*ref.shape[:2]))]) as log:
        out = call()
    assert_restored(pipe, before)
    assert log.word_keys == {0: positions} and log.steps == [0, 1] and log.layers
    assert not np.array_equal(out, ref)
    with intervene(pipe, PROMPT, [AttentionEdit("dog", 1.0)]):
        assert np.array_equal(call(), ref)
