"""Tracing UNet pipelines: semantics of the captured maps, batches, variants, and clean exit."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor

from daamkit import AggregationConfig, TraceError, UnsupportedPipelineError, trace
from daamkit.aggregate import layer_grid
from daamkit.testing.pipelines import tiny_controlnet, tiny_sd

PROMPT = "a red dog on a bench"


@pytest.fixture()
def sd(clip_tokenizer_dir):
    return tiny_sd(clip_tokenizer_dir)


def run(pipe, prompt=PROMPT, steps=2, h=32, w=48, seed=0, **kw):
    return pipe(
        prompt,
        num_inference_steps=steps,
        height=h,
        width=w,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
        **kw,
    ).images


def hook_state(module: torch.nn.Module):
    """Everything a trace could leave behind: processors and hooks of every submodule."""
    procs = {n: m.processor for n, m in module.named_modules() if isinstance(m, Attention)}
    return procs, _hook_count(module)


def _hook_count(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def _encoders(pipe):
    return [e for e in (getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)) if e is not None]


def assert_restored(pipe, before, encoder_hooks=None):
    procs, hooks = hook_state(pipe.unet)
    assert hooks == before[1]
    assert procs.keys() == before[0].keys()
    assert all(procs[k] is before[0][k] for k in procs)  # the very same processor objects
    if encoder_hooks is not None:  # transformers may keep hooks of its own on the encoders
        assert [_hook_count(e) for e in _encoders(pipe)] == encoder_hooks


# ---------------------------------------------------------------- hand-set attention ---------------
class HandSetAttention:
    """Overrides q/k of every cross-attention so that, for batch row r, text token ``token_of(r)``
    takes all the attention of the image positions inside ``region`` (fractions of the grid) and
    attention is uniform elsewhere. Installed before the trace, so the trace sees these q/k."""

    def __init__(self, unet, latent_hw, token_of, region=(0.0, 0.5, 0.5, 1.0)):
        self.latent_hw, self.token_of, self.region = latent_hw, token_of, region
        self.handles = []
        for m in unet.modules():
            if isinstance(m, Attention) and m.is_cross_attention:
                self.handles.append(m.to_q.register_forward_hook(self._q(m)))
                self.handles.append(m.to_k.register_forward_hook(self._k(m)))

    def _unit(self, m, c, device, dtype):
        d = c // m.heads
        a = math.sqrt(30.0 / m.scale)  # score of the chosen token: a^2 * scale = 30
        u = torch.zeros(d, device=device, dtype=dtype)
        u[0] = a
        return u.repeat(m.heads)

    def _q(self, m):
        def hook(mod, args, out):
            b, n, c = out.shape
            h, w, _ = layer_grid(self.latent_hw, n)
            r0, r1, c0, c1 = self.region
            grid = torch.zeros(h, w, dtype=torch.bool)
            grid[int(r0 * h) : int(math.ceil(r1 * h)), int(c0 * w) : int(math.ceil(c1 * w))] = True
            q = torch.zeros_like(out)
            q[:, grid.flatten()] = self._unit(m, c, out.device, out.dtype)
            return q

        return hook

    def _k(self, m):
        def hook(mod, args, out):
            b, t, c = out.shape
            k = torch.zeros_like(out)
            for r in range(b):
                k[r, self.token_of(r, b)] = self._unit(m, c, out.device, out.dtype)
            return k

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def region_mask(shape, region):
    h, w = shape
    r0, r1, c0, c1 = region
    m = torch.zeros(h, w, dtype=torch.bool)
    m[int(r0 * h) : int(math.ceil(r1 * h)), int(c0 * w) : int(math.ceil(c1 * w))] = True
    return m


def test_hand_set_attention_peaks_in_its_region_non_square(sd):
    region = (0.0, 0.5, 0.5, 1.0)  # top-right quarter
    hand = HandSetAttention(sd.unet, (16, 24), token_of=lambda r, b: 3, region=region)
    try:
        with trace(sd) as tc:
            run(sd, h=32, w=48)
            maps = tc.heat_maps(0)
    finally:
        hand.remove()
    grid = maps.maps.shape[-2:]
    assert tuple(grid) == (16, 24)  # latent grid: the tiny VAE downsamples by 2
    m = maps.maps[3]
    inside = region_mask(grid, region)
    # bicubic upsampling blurs one cell across the border; compare the bulk on both sides
    assert m[inside].mean() > 20 * m[~inside].mean()
    assert m[inside].min() > 2 * m[~inside].mean()
    peak = np.unravel_index(int(m.argmax()), tuple(grid))
    assert inside[peak]
    # every other token is near zero inside the region, uniform-ish outside
    other = maps.maps[5]
    assert other[inside].mean() < 0.05 * m[inside].mean()
    assert maps.image_size == (32, 48)


def test_batch_rows_and_cfg_halves_map_to_the_right_images(sd):
    # 2 prompts x 2 images, CFG: rows 0..3 negative, 4..7 conditional
    def token_of(r, b):
        n = b // 2
        return 10 if r < n else 1 + (r - n)

    hand = HandSetAttention(sd.unet, (16, 16), token_of=token_of)
    try:
        with trace(sd, negative=True) as tc:
            run(sd, prompt=["a dog", "a red cat on a mat"], h=32, w=32, num_images_per_prompt=2)
            assert tc.num_images == 4
            cond = [tc.heat_maps(i) for i in range(4)]
            neg = tc.heat_maps(1, branch="negative")
    finally:
        hand.remove()
    inside = region_mask((16, 16), (0.0, 0.5, 0.5, 1.0))
    for i, hm in enumerate(cond):
        region_mass = hm.maps[:, inside].mean(-1)
        assert int(region_mass.argmax()) == 1 + i
    assert int(neg.maps[:, inside].mean(-1).argmax()) == 10
    assert cond[0].words[:2] == ["a", "dog"] and cond[1].words[:2] == ["a", "dog"]
    assert cond[2].words == ["a", "red", "cat", "on", "mat"]


# ---------------------------------------------------------------- oracle for the aggregation -------
class Oracle:
    """Independent record of every cross-attention call: probabilities per head for the cond rows."""

    def __init__(self, unet):
        self.calls = []  # (step, name, probs (B, heads, N, T))
        self.step = -1
        self.handles = [unet.register_forward_pre_hook(self._step)]
        for name, m in unet.named_modules():
            if isinstance(m, Attention) and m.is_cross_attention:
                self.handles.append(m.register_forward_hook(self._attn(name), with_kwargs=True))

    def _step(self, mod, args):
        self.step += 1

    def _attn(self, name):
        def hook(m, args, kwargs, out):
            x = args[0]
            ctx = kwargs["encoder_hidden_states"]
            n = x.shape[0] // 2
            q, k = m.to_q(x[n:]).float(), m.to_k(ctx[n:]).float()
            b, nq, c = q.shape
            d = c // m.heads
            q = q.view(b, nq, m.heads, d).permute(0, 2, 1, 3)
            k = k.view(b, -1, m.heads, d).permute(0, 2, 1, 3)
            self.calls.append((self.step, name, torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1)))

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _grid_maps(probs, latent_hw):
    b, heads, n, t = probs.shape
    h, w, f = layer_grid(latent_hw, n)
    return probs.permute(0, 1, 3, 2).reshape(b, heads, t, h, w), f


def test_daam_and_reference_modes_match_an_independent_oracle(sd):
    oracle = Oracle(sd.unet)
    try:
        with trace(sd) as tc:
            run(sd, steps=3, h=32, w=32)
            daam = tc.heat_maps(0).maps
    finally:
        oracle.remove()
    latent = (16, 16)
    # daam: per call, mean over heads, bicubic to the latent grid, clamp, sum; then / number of layers
    layers = {name for _, name, _ in oracle.calls}
    total = 0
    for _, _, p in oracle.calls:
        g, _ = _grid_maps(p, latent)
        total = total + F.interpolate(g.mean(1), size=latent, mode="bicubic", align_corners=False).clamp(min=0)
    expected = (total / len(layers))[0]
    torch.testing.assert_close(daam, expected, rtol=1e-4, atol=1e-6)

    oracle = Oracle(sd.unet)
    try:
        with trace(sd, mode="reference") as tc:
            run(sd, steps=3, h=32, w=32)
            ref = tc.heat_maps(0).maps
    finally:
        oracle.remove()
    # reference: per (layer, head) sum over steps at native resolution, upsample, clamp, mean; no mid block
    sums = {}
    for _, name, p in oracle.calls:
        if name.startswith("mid_block"):
            continue
        g, _ = _grid_maps(p, latent)
        sums[name] = sums.get(name, 0) + g
    per = [
        F.interpolate(s[0].reshape(-1, *s.shape[-2:])[:, None], size=latent, mode="bicubic").clamp(min=0)
        for s in sums.values()
    ]
    heads = sum(s.shape[1] for s in sums.values())
    expected = sum(x.reshape(-1, 77, *latent).sum(0) for x in per) / heads
    torch.testing.assert_close(ref, expected, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(ref, daam, atol=1e-4)  # the modes differ (clamp placement, mid block)


# ---------------------------------------------------------------- selection options ---------------
def test_step_layer_head_selection_matches_kept_sums(sd):
    with trace(sd, keep_steps=True, keep_layers=True) as tc:
        run(sd, steps=3, h=32, w=32)
        all_ = tc.heat_maps(0).maps
        step0 = tc.heat_maps(0, steps=[0]).maps
        up = tc.heat_maps(0, layers=["up"]).maps
        up_step12 = tc.heat_maps(0, layers=["up"], steps=range(1, 3)).maps
    with trace(sd, steps=[0]) as tc:
        run(sd, steps=3, h=32, w=32)
        torch.testing.assert_close(tc.heat_maps(0).maps, step0)
    with trace(sd, layers=["up"], steps=range(1, 3)) as tc:
        run(sd, steps=3, h=32, w=32)
        torch.testing.assert_close(tc.heat_maps(0).maps, up_step12)
    with trace(sd, layers=["up_blocks.0"]) as tc:
        run(sd, steps=3, h=32, w=32)
        torch.testing.assert_close(tc.heat_maps(0).maps, up)
    with trace(sd, factors=[2]) as tc:  # the tiny UNet's cross-attention is at half resolution
        run(sd, steps=3, h=32, w=32)
        torch.testing.assert_close(tc.heat_maps(0).maps, all_)
    with trace(sd, heads=[0]) as tc, pytest.raises(ValueError, match="keep_heads"):
        run(sd, steps=1, h=32, w=32)
        tc.heat_maps(0, heads=[0])
    with trace(sd, keep_heads=True) as tc:
        run(sd, steps=2, h=32, w=32)
        h0 = tc.heat_maps(0, heads=[0]).maps
        both = tc.heat_maps(0).maps
    with trace(sd, heads=[0]) as tc:
        run(sd, steps=2, h=32, w=32)
        torch.testing.assert_close(tc.heat_maps(0).maps, h0)
    assert not torch.allclose(h0, both)
    with trace(sd) as tc, pytest.raises(ValueError, match="keep_steps"):
        run(sd, steps=1, h=32, w=32)
        tc.heat_maps(0, steps=[0])


def test_memory_is_independent_of_the_number_of_steps(sd):
    sizes = []
    for steps in (2, 5):
        with trace(sd) as tc:
            run(sd, steps=steps, h=32, w=32)
            sizes.append(tc._gen.accumulator.nbytes())
            assert tc.num_steps == steps
    assert sizes[0] == sizes[1] > 0


# ---------------------------------------------------------------- identical images, clean exit -----
def test_traced_images_equal_untraced_and_pipeline_restored(sd):
    before = hook_state(sd.unet)
    enc_before = [_hook_count(e) for e in _encoders(sd)]
    ref = run(sd)
    with trace(sd) as tc:
        out = run(sd)
        tc.heat_maps(0)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert_restored(sd, before, enc_before)


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_restored_after_an_exception_inside_the_block(sd, exc):
    before = hook_state(sd.unet)

    def boom(pipe, i, t, kwargs):
        raise exc("stop")

    with pytest.raises(exc):
        with trace(sd):
            run(sd, callback_on_step_end=boom)
    assert_restored(sd, before)
    with trace(sd) as tc:  # usable again
        run(sd, steps=1)
        assert tc.heat_maps(0).maps.shape[0] == 77


def _removals(pipe) -> int:
    """How many hook handles a trace of ``pipe`` removes on exit."""
    from torch.utils.hooks import RemovableHandle

    calls = 0
    real = RemovableHandle.remove

    def counting(self):
        nonlocal calls
        calls += 1
        real(self)

    RemovableHandle.remove = counting
    try:
        with trace(pipe):
            pass
    finally:
        RemovableHandle.remove = real
    return calls


def test_hooks_come_off_when_interrupted_while_coming_off(sd, monkeypatch):
    """Ctrl-C (or any exception) raised by any one hook removal on exit: every other hook still comes
    off, the interrupt still reaches the caller, and the pipeline can be traced again."""
    from torch.utils.hooks import RemovableHandle

    before = hook_state(sd.unet)
    enc_before = [_hook_count(e) for e in _encoders(sd)]
    total = _removals(sd)
    with trace(sd) as tc:
        layers = len(tc.layers)
    # the denoiser's pre-hook, four per traced attention module, one per text encoder
    assert total == 1 + 4 * layers + len(_encoders(sd))
    real = RemovableHandle.remove
    for k in range(total):
        calls = 0

        def interrupting(self, k=k):
            nonlocal calls
            calls += 1
            if calls == k + 1:
                raise KeyboardInterrupt(f"removal {k}")
            real(self)

        monkeypatch.setattr(RemovableHandle, "remove", interrupting)
        with pytest.raises(KeyboardInterrupt, match=f"removal {k}$"):
            with trace(sd):
                pass
        monkeypatch.setattr(RemovableHandle, "remove", real)
        assert_restored(sd, before, enc_before)
    with trace(sd) as tc:  # not refused as "already being traced"
        run(sd, steps=1)
        assert tc.heat_maps(0).word("dog") is not None
    assert_restored(sd, before, enc_before)


def test_nested_traces_are_refused_and_leave_the_outer_one_working(sd):
    before = hook_state(sd.unet)
    with trace(sd) as tc:
        with pytest.raises(TraceError, match="already being traced"):
            with trace(sd):
                pass
        run(sd, steps=1)
        assert tc.heat_maps(0).word("dog") is not None
    assert_restored(sd, before)


def test_unsupported_pipeline_names_supported_families():
    class FakePipe:
        transformer = torch.nn.Linear(2, 2)

    with pytest.raises(UnsupportedPipelineError, match=r"Stable Diffusion 1.x/2.x, SDXL.*daamkit families"):
        trace(FakePipe())


def test_errors_before_running_and_for_bad_indices(sd):
    with trace(sd) as tc:
        with pytest.raises(TraceError, match="nothing was traced"):
            tc.heat_maps(0)
        run(sd, steps=1)
        with pytest.raises(IndexError, match="1 image"):
            tc.heat_maps(1)
        with pytest.raises(ValueError, match="negative=True"):
            tc.heat_maps(0, branch="negative")
        with pytest.raises(KeyError, match="dog"):
            tc.heat_maps(0).word("cat")


def test_each_pipeline_call_starts_a_new_generation(sd):
    with trace(sd) as tc:
        run(sd, prompt="a dog", steps=2)
        first = tc.heat_maps(0).maps.clone()
        run(sd, prompt=["a cat", "a bird"], steps=3)
        assert tc.num_images == 2 and tc.num_steps == 3
        assert tc.heat_maps(1).words == ["a", "bird"]
        run(sd, prompt="a dog", steps=2)
        torch.testing.assert_close(tc.heat_maps(0).maps, first)


# ---------------------------------------------------------------- guidance, dtypes, processors -----
def test_no_cfg_when_guidance_is_at_most_one(sd):
    ref = run(sd, guidance_scale=1.0)
    with trace(sd) as tc:
        out = run(sd, guidance_scale=1.0)
        hm = tc.heat_maps(0)
        assert not tc._gen.cfg
        with pytest.raises(ValueError, match="no negative branch"):
            tc.heat_maps(0, branch="negative")
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert torch.isfinite(hm.maps).all() and hm.maps.sum() > 0


def test_negative_prompt_branch_has_its_own_words(sd):
    with trace(sd, negative=True) as tc:
        run(sd, negative_prompt="blurry ugly photo")
        assert tc.heat_maps(0, branch="negative").words == ["blurry", "ugly", "photo"]
        assert tc.heat_maps(0).words == ["a", "red", "dog", "on", "bench"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_pipelines(sd, dtype):
    sd.to(dtype=dtype)
    try:
        with trace(sd) as tc:
            run(sd, steps=1)
            hm = tc.heat_maps(0)
    except RuntimeError as e:  # some CPU kernels lack fp16: that is torch's limit, not ours
        if dtype == torch.float16 and "not implemented" in str(e):
            pytest.xfail(f"CPU fp16 kernel missing: {e}")
        raise
    assert hm.maps.dtype == torch.float32 and torch.isfinite(hm.maps).all()


def test_attention_slicing_and_replaced_processors_keep_maps(sd):
    with trace(sd) as tc:
        ref_img = run(sd)
        ref = tc.heat_maps(0).maps
    sd.enable_attention_slicing(1)
    before = hook_state(sd.unet)
    with trace(sd) as tc:
        img = run(sd)
        sliced = tc.heat_maps(0).maps
    assert_restored(sd, before)
    torch.testing.assert_close(sliced, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(img, ref_img, atol=1e-4)
    sd.unet.set_attn_processor(AttnProcessor())  # the classic, non-fused processor
    before = hook_state(sd.unet)
    with trace(sd) as tc:
        run(sd)
        classic = tc.heat_maps(0).maps
    assert_restored(sd, before)
    torch.testing.assert_close(classic, ref, rtol=1e-4, atol=1e-5)


def test_lora_adapted_unet_is_traced_with_its_adapter(sd):
    peft = pytest.importorskip("peft")
    with trace(sd) as tc:
        run(sd)
        plain = tc.heat_maps(0).maps
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k"], init_lora_weights=False)
    sd.unet.add_adapter(config)
    before = hook_state(sd.unet)
    ref = run(sd)
    with trace(sd) as tc:
        out = run(sd)
        lora = tc.heat_maps(0).maps
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert_restored(sd, before)
    assert not torch.allclose(lora, plain, atol=1e-4)  # the adapter's q/k are the ones traced


# ---------------------------------------------------------------- other pipelines -----------------
def test_img2img_inpaint_and_controlnet(sd):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
    from PIL import Image

    init = Image.fromarray((np.random.default_rng(0).random((32, 48, 3)) * 255).astype("uint8"))
    mask = Image.fromarray(np.pad(np.ones((16, 24), "uint8") * 255, ((8, 8), (12, 12))))
    i2i = StableDiffusionImg2ImgPipeline(**sd.components)
    inp = StableDiffusionInpaintPipeline(**sd.components)
    cn = tiny_controlnet(sd)
    cases = [
        (i2i, dict(image=init, strength=0.75, num_inference_steps=4)),
        (inp, dict(image=init, mask_image=mask, height=32, width=48, num_inference_steps=2)),
        (cn, dict(image=init, height=32, width=48, num_inference_steps=2)),
    ]
    for pipe, kw in cases:
        pipe.set_progress_bar_config(disable=True)
        before = hook_state(pipe.unet)
        ref = pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="np", **kw).images
        with trace(pipe) as tc:
            out = pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="np", **kw).images
            hm = tc.heat_maps(0)
        np.testing.assert_allclose(out, ref, atol=1e-5)
        assert_restored(pipe, before)
        assert hm.image_size == (32, 48) and hm.words == ["a", "red", "dog", "on", "bench"]
        assert hm.maps[1:7].sum() > 0
    assert tc.num_steps == 2


def test_sdxl_traced_with_both_tokenizers(sdxl):
    before = hook_state(sdxl.unet)
    ref = run(sdxl, prompt="a red dog", prompt_2="a dog on a bench", steps=2)
    enc_before = [_hook_count(e) for e in _encoders(sdxl)]  # after a run: transformers adds its own
    with trace(sdxl, keep_layers=True) as tc:
        out = run(sdxl, prompt="a red dog", prompt_2="a dog on a bench", steps=2)
        hm = tc.heat_maps(0)
        names = {layer.name for layer in tc.layers}
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert_restored(sdxl, before, enc_before)
    assert hm.words == ["a", "red", "dog"]  # the first tokenizer's prompt, as the maps' positions
    assert hm.maps.shape == (77, 16, 24)
    assert any(n.startswith("down_blocks.1") for n in names) and any(n.startswith("mid_block") for n in names)


# ---------------------------------------------------------------- words past the cut ---------------
def test_words_past_the_token_limit_are_reported_as_truncated(sd):
    long_prompt = " ".join(["red"] * 80) + " elephant"
    with trace(sd) as tc:
        run(sd, prompt=long_prompt, steps=1)
        hm = tc.heat_maps(0)
    with pytest.raises(KeyError, match="past the tokenizer's 77-token limit"):
        hm.word("elephant")
    assert len(hm.word("red").positions) == 75


def test_prompt_embeds_need_the_prompt(sd):
    emb, neg = sd.encode_prompt(PROMPT, "cpu", 1, True)
    with trace(sd) as tc:
        sd(prompt_embeds=emb, negative_prompt_embeds=neg, num_inference_steps=1, output_type="np",
           height=32, width=32)
        with pytest.raises(TraceError, match="prompt="):
            tc.heat_maps(0)
        assert tc.heat_maps(0, prompt=PROMPT).words == ["a", "red", "dog", "on", "bench"]


def test_config_validation():
    with pytest.raises(ValueError, match="mode"):
        AggregationConfig(mode="nope")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="steps"):
        AggregationConfig(steps=[-1])


def test_ip_adapter_processors_are_kept_and_only_text_keys_are_mapped(sd):
    """An IP-Adapter (random weights, built the way diffusers' loader builds it): its processor splits
    the context into text and image tokens; the maps stay over the 77 text keys."""
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    from diffusers.models.embeddings import ImageProjection, MultiIPAdapterImageProjection

    unet = sd.unet
    torch.manual_seed(0)
    procs = {}
    for name, proc in unet.attn_processors.items():
        if name.endswith("attn1.processor"):
            procs[name] = proc
            continue
        if name.startswith("mid_block"):
            hidden = unet.config.block_out_channels[-1]
        elif name.startswith("up_blocks"):
            hidden = list(reversed(unet.config.block_out_channels))[int(name.split(".")[1])]
        else:
            hidden = unet.config.block_out_channels[int(name.split(".")[1])]
        p = IPAdapterAttnProcessor2_0(hidden_size=hidden, cross_attention_dim=32, num_tokens=(4,), scale=1.0)
        procs[name] = p
    unet.set_attn_processor(procs)
    unet.encoder_hid_proj = MultiIPAdapterImageProjection(
        [ImageProjection(cross_attention_dim=32, image_embed_dim=16, num_image_text_embeds=4)]
    )
    unet.config.encoder_hid_dim_type = "ip_image_proj"
    embeds = [torch.randn(2, 1, 16)]  # (negative, positive) x 1 image embedding
    before = hook_state(unet)
    ref = run(sd, ip_adapter_image_embeds=embeds)
    with trace(sd) as tc:
        out = run(sd, ip_adapter_image_embeds=embeds)
        hm = tc.heat_maps(0)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert_restored(sd, before)
    assert hm.maps.shape[0] == 77 and hm.words == ["a", "red", "dog", "on", "bench"]
    assert all(isinstance(p, IPAdapterAttnProcessor2_0) for n, p in unet.attn_processors.items() if "attn2" in n)


def test_layers_the_selection_leaves_out_are_not_computed(sd, monkeypatch):
    import daamkit.capture.unet as unet_capture

    seen = []
    real = unet_capture.attention_probs

    def counting(q, *args, **kwargs):
        seen.append(q.shape[1])
        return real(q, *args, **kwargs)

    monkeypatch.setattr(unet_capture, "attention_probs", counting)
    with trace(sd) as tc:
        run(sd, steps=2, h=32, w=32)
        every = len(seen)
        up = sum(layer.block == "up" for layer in tc.layers)
    assert every == 2 * len(tc.layers)
    seen.clear()
    with trace(sd, layers=["up"], steps=[1]) as tc:
        run(sd, steps=2, h=32, w=32)
        tc.heat_maps(0)
    assert len(seen) == up  # the up blocks' layers, at step 1 only
