"""OVAM: open-vocabulary maps from the model's own image queries and the attribution prompt's keys; the
image is unchanged, the pipeline restored, and a learned token fits its mask."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from daamkit import TraceError, UnsupportedPipelineError, trace
from daamkit.aggregate import layer_grid
from daamkit.errors import InputError
from daamkit.methods import METHODS, OvamEmbedding, OvamMethod, optimize_token
from daamkit.methods.ovam import encode_attribution
from daamkit.testing.pipelines import tiny_sd

PROMPT = "a red dog on a bench"
WORDS = ["dog", "tree", "traffic light"]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    from daamkit.testing.tokenizers import clip_tokenizer

    d = tmp_path_factory.mktemp("clip_tokenizer_ovam")
    clip_tokenizer(d)
    return tiny_sd(str(d))


@pytest.fixture(scope="module")
def pixart(tmp_path_factory):
    from daamkit.testing.families.pixart import tiny_pixart_sigma
    from daamkit.testing.tokenizers import t5_tokenizer

    d = tmp_path_factory.mktemp("t5_tokenizer_ovam")
    t5_tokenizer(str(d))
    return tiny_pixart_sigma(str(d))


@pytest.fixture(scope="module")
def sana(tmp_path_factory):
    from daamkit.testing.families.sana import gemma_tokenizer, tiny_sana

    d = tmp_path_factory.mktemp("gemma_tokenizer_ovam")
    gemma_tokenizer(d)
    return tiny_sana(str(d), qk_norm="rms_norm_across_heads")  # q/k norms over all heads at once


def run(pipe, prompt=PROMPT, **kw):
    if hasattr(pipe, "transformer"):
        kw.setdefault("use_resolution_binning", False)
        if "Sana" not in type(pipe).__name__:
            kw.setdefault("clean_caption", False)
    h, w = (32, 64) if "Sana" in type(pipe).__name__ else (32, 48)
    return pipe(prompt, num_inference_steps=2, height=h, width=w, generator=torch.Generator().manual_seed(0),
                output_type="np", **kw).images


def hook_count(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def pick(request, name):
    return request.getfixturevalue(name)


def test_registered():
    assert METHODS["ovam"] is OvamMethod and OvamMethod.name == "ovam"


@pytest.mark.parametrize("name", ["sd", "pixart", "sana"])
def test_image_unchanged_pipeline_restored_and_words(request, name):
    pipe = pick(request, name)
    ref = run(pipe)
    before = hook_count(denoiser(pipe))
    with trace(pipe) as tc:
        plain = hook_count(denoiser(pipe)) - before
        assert "ovam" not in tc.method_names  # not asked for: nothing constructed, no hooks
    with trace(pipe, open_vocabulary=WORDS) as tc:
        ovam = tc.method("ovam")
        # the image queries come from the capture's own taps: OVAM adds no hook
        assert hook_count(denoiser(pipe)) - before == plain and not ovam.hooks.handles
        out = run(pipe)
        hm = tc.heat_maps(0, method="ovam")
        daam = tc.heat_maps(0)
    assert hook_count(denoiser(pipe)) == before
    torch.testing.assert_close(torch.from_numpy(out), torch.from_numpy(ref), rtol=0, atol=0)
    assert hm.words == ["dog", "tree", "traffic", "light"]
    assert hm.word("traffic light").positions and hm.maps.shape[1:] == daam.maps.shape[1:]
    assert hm.image_size == daam.image_size and hm.meta["method"] == "ovam"
    # softmax over the attribution tokens, head mean, summed over the 2 steps
    torch.testing.assert_close(hm.maps.sum(0).mean(), torch.tensor(2.0), rtol=0.05, atol=0)
    assert not torch.allclose(hm.maps[1], hm.maps[2])


class _Queries:
    """The to_q outputs of one layer, call by call (registered before the trace)."""

    def __init__(self, module):
        self.calls: list[torch.Tensor] = []
        self.handle = module.to_q.register_forward_hook(lambda m, a, out: self.calls.append(out.detach()))


@pytest.mark.parametrize("name", ["sd", "pixart", "sana"])
def test_matches_an_independent_recomputation(request, name):
    pipe = pick(request, name)
    net = denoiser(pipe)
    with trace(pipe) as tc:
        layers = tc.layers
    layer = layers[0]
    attn = net.get_submodule(layer.name)
    oracle = _Queries(attn)
    try:
        with trace(pipe, steps=[0], layers=[layer.name], open_vocabulary=["dog", "tree"]) as tc:
            run(pipe)
            maps = tc.heat_maps(0, method="ovam").maps
            h, w = tc.generation.call.latent_hw
    finally:
        oracle.handle.remove()
    # the attribution prompt by hand: the tokenizer's ids for "dog tree", the pipeline's encoder
    tok = pipe.tokenizer
    n = len(tok("dog tree").input_ids)
    kw = {"clean_caption": False} if name == "pixart" else {"complex_human_instruction": None} if name == "sana" else {}
    ctx = pipe.encode_prompt("dog tree", device="cpu", do_classifier_free_guidance=False, num_images_per_prompt=1,
                             **kw)[0][:, :n]
    if name != "sd":
        ctx = net.caption_projection(ctx)
        if name == "sana":
            ctx = net.caption_norm(ctx)
    q = oracle.calls[0][-1:]  # step 0, the conditional row (CFG rows are [negative, cond])
    k = attn.to_k(ctx)
    heads = attn.heads
    if name == "sana":  # Sana 1.5 normalises q and k over all heads, before the split
        q, k = attn.norm_q(q), attn.norm_k(k)
    q = q.unflatten(-1, (heads, -1)).transpose(1, 2)
    k = k.unflatten(-1, (heads, -1)).transpose(1, 2)
    probs = (q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
    lh, lw, _ = layer_grid((h, w), q.shape[2])
    expected = probs[0].mean(0).T.reshape(n, lh, lw)
    if (lh, lw) != (h, w):  # DAAM's upsampling to the latent grid
        expected = F.interpolate(expected[None], size=(h, w), mode="bicubic", align_corners=False)[0].clamp(min=0)
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-6)


def test_a_word_of_the_prompt_looks_like_its_daam_map(sd):
    """Hand-set: image queries in the left half point at the key of "dog", elsewhere away from it. With
    the prompt itself as the attribution prompt the keys of "dog" are the model's own; OVAM differs from
    DAAM only by leaving out the padding keys, so both maps must show the same region."""
    net = sd.unet
    emb = sd.encode_prompt(PROMPT, "cpu", 1, False)[0]
    dog = 3  # <sot> a red dog
    handles = []

    def steer(module):
        def hook(mod, args, out):
            k = module.to_k.forward(emb)[0, dog]  # forward(): no capture hook sees these keys.unflatten(-1, (module.heads, -1))
            unit = (k / k.norm(dim=-1, keepdim=True)).flatten()
            n = out.shape[1]
            side = int(round((n * 2 / 3) ** 0.5 * 1.5))  # the grid is 2:3 (h x w)
            cols = torch.arange(n) % side
            sign = torch.where(cols < side // 2, 1.0, -1.0)[None, :, None]
            return (8.0 * sign * unit).expand_as(out).to(out.dtype)

        return hook

    with trace(sd) as tc:
        names = [info.name for info in tc.layers]
    for name in names:
        m = net.get_submodule(name)
        handles.append(m.to_q.register_forward_hook(steer(m)))
    try:
        with trace(sd, open_vocabulary=[PROMPT]) as tc:
            run(sd)
            ov, da = tc.heat_maps(0, method="ovam").word("dog"), tc.heat_maps(0).word("dog")
    finally:
        for h in handles:
            h.remove()
    a, b = ov.normalized(), da.normalized()
    assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.9
    left = torch.arange(a.shape[1]) < a.shape[1] // 2 - 1  # the region, less the bicubic edge
    right = torch.arange(a.shape[1]) > a.shape[1] // 2 + 1
    for m in (a, b):  # the same region in both; OVAM's fewer keys leave the outside a larger share
        assert m[:, left].min() > m[:, right].max()


def test_bad_inputs_give_one_clear_error(sd, request):
    with pytest.raises(InputError, match="empty"):
        OvamMethod([])
    with pytest.raises(InputError, match="non-empty words"):
        OvamMethod(["dog", "  "])
    with pytest.raises(InputError, match="distinct"):
        OvamMethod(["dog", "dog"])
    with pytest.raises(InputError, match="empty"):
        trace(sd, open_vocabulary=[])
    with trace(sd) as tc:
        run(sd)
        with pytest.raises(TraceError, match=r"open_vocabulary=\[\.\.\.\]"):
            tc.heat_maps(0, method="ovam")
    with trace(sd, open_vocabulary=["dog"]) as tc:
        run(sd)
        with pytest.raises(InputError, match="branch='cond'"):
            tc.heat_maps(0, method="ovam", branch="negative")
        with pytest.raises(TraceError, match="keep_queries=True"):
            optimize_token(tc, np.ones((8, 8), bool), init="dog")
    sd3 = request.getfixturevalue("sd3")
    before = hook_count(sd3.transformer)
    with pytest.raises(UnsupportedPipelineError, match="method='concept'") as err:
        trace(sd3, open_vocabulary=["dog"])
    assert "\n" not in str(err.value) and hook_count(sd3.transformer) == before


def test_learned_embeddings_mix_with_words_and_round_trip(sd):
    a = encode_attribution(sd, ["dog"])
    assert a.alignment.tokens[0] == "<|startoftext|>" and a.alignment.tokens[-1] == "<|endoftext|>"
    b = OvamEmbedding.from_dict(a.to_dict())
    torch.testing.assert_close(a.embeds, b.embeds)
    with trace(sd, open_vocabulary=["tree", b]) as tc:
        run(sd)
        hm = tc.heat_maps(0, method="ovam")
    assert hm.words == ["tree", "dog"] and len(hm.alignment.tokens) == 4
    assert hm.alignment.tokens[-1] == "<|endoftext|>"


def test_token_optimisation_on_the_shapes_world():
    from PIL import Image

    from daamkit.jobs.pipeline import load_pipeline
    from daamkit.world import ModelNotFoundError, default_model_path, drawn_masks

    try:
        path = default_model_path()
    except ModelNotFoundError as e:
        pytest.skip(str(e))
    pipe = load_pipeline(path, progress=False)
    pipe.set_progress_bar_config(disable=True)
    caption = "a red circle and a blue square"

    def generate(tc_kw, prompt=caption, seed=0):
        with trace(pipe, steps=range(2, 8), **tc_kw) as tc:
            out = pipe(prompt, num_inference_steps=8, guidance_scale=5.0, generator=torch.Generator().manual_seed(seed),
                       output_type="np").images
        return tc, Image.fromarray((out[0] * 255).round().astype("uint8"))

    tc, image = generate({"methods": [OvamMethod(["square"], keep_queries=True)]})
    mask = drawn_masks(image, caption)["square"][0]
    assert mask is not None
    assert {name for _, name in tc.method("ovam").queries} == {info.name for info in tc.layers}
    assert {step for step, _ in tc.method("ovam").queries} == set(range(2, 8))
    plain = tc.heat_maps(0, method="ovam").word("square")
    learned = optimize_token(tc, mask, init="square", iterations=30)
    assert learned.words == ["square"] and learned.embeds.shape == (3, pipe.text_encoder.config.hidden_size)
    # the learned token's map on its own training image, through the method
    tc2, again = generate({"open_vocabulary": [learned]})
    assert np.array_equal(np.asarray(again), np.asarray(image))
    after = tc2.heat_maps(0, method="ovam").word("square")
    assert after.iou(mask) > plain.iou(mask)
    # and on another image, with words beside it
    tc3, _ = generate({"open_vocabulary": ["circle", learned]}, prompt="a green square above a yellow star", seed=3)
    hm = tc3.heat_maps(0, method="ovam")
    assert hm.words == ["circle", "square"] and hm.maps.shape == (4, 16, 16)
    assert torch.isfinite(hm.maps).all()
