"""OVAM on every cross-attention family beyond the UNet/PixArt/Sana images (tests/methods/test_ovam.py):
HunyuanDiT (two encoders), Wan 2.1 / 2.2 (two experts), LTX-Video, LTX-2, Sana-Video and AnimateDiff.

Per family: the image / video is bit-identical to an untraced run and the pipeline is restored; a
video's maps have DAAM's time axis; an independent recomputation of one layer at one step (the module's
``to_q`` output with its q norm and rotary embedding applied by hand, keys from the pipeline's
``encode_prompt`` and the denoiser's text projection by hand) equals the OVAM map; and the prompt
itself as the attribution prompt gives DAAM's per-head probabilities renormalised over the prompt's
tokens (DAAM's softmax also runs over padding and registers the attribution prompt leaves out).
"""

from __future__ import annotations

import pytest
import torch
from cross_checks import split_heads
from family_checks import traced_equals_untraced

from daamkit import UnsupportedPipelineError, trace
from daamkit.capture.families import FAMILIES
from daamkit.methods import OvamMethod

FAMILY_NAMES = ["hunyuandit", "wan", "wan22", "ltx", "ltx2", "sana_video", "animatediff"]
LOWER = "a red dog sitting on a wooden bench"
UPPER = "A Red dog sitting on a wooden bench"  # the tiny BERT / Gemma vocabularies of those test files
WORDS = ["dog", "bench"]


def _hunyuandit(tmp):
    from daamkit.testing.families.hunyuandit import bert_tokenizer, mt5_tokenizer, tiny_hunyuandit

    bert, mt5 = tmp / "bert", tmp / "mt5"
    bert_tokenizer(bert)
    mt5_tokenizer(mt5)
    return tiny_hunyuandit(str(bert), str(mt5))


def _wan(tmp, which="tiny_wan"):
    from daamkit.testing.families import wan

    wan.wan_tokenizer(tmp)
    return getattr(wan, which)(str(tmp))


def _ltx(tmp):
    from daamkit.testing.families.ltx import tiny_ltx
    from daamkit.testing.tokenizers import t5_tokenizer

    t5_tokenizer(str(tmp))
    return tiny_ltx(str(tmp))


def _ltx2(tmp):
    from daamkit.testing.families.ltx2 import tiny_ltx2
    from daamkit.testing.families.sana import gemma_tokenizer

    gemma_tokenizer(tmp, extra_text=())
    return tiny_ltx2(str(tmp))


def _sana_video(tmp):
    from daamkit.testing.families.sana_video import sana_video_tokenizer, tiny_sana_video

    sana_video_tokenizer(tmp)
    return tiny_sana_video(str(tmp))


def _animatediff(tmp):
    from daamkit.testing.families.animatediff import tiny_animatediff
    from daamkit.testing.tokenizers import clip_tokenizer

    clip_tokenizer(tmp)
    return tiny_animatediff(str(tmp))


BUILDERS = {
    "hunyuandit": _hunyuandit, "wan": _wan, "wan22": lambda tmp: _wan(tmp, "tiny_wan22"), "ltx": _ltx,
    "ltx2": _ltx2, "sana_video": _sana_video, "animatediff": _animatediff,
}
PROMPTS = {"hunyuandit": UPPER, "sana_video": UPPER}
# the tiny motion UNet's layers are all at half the latent grid: aggregate on theirs, so that maps are probabilities
GRIDS = {"animatediff": (8, 12)}


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def case(request, tmp_path_factory):
    name = request.param
    return name, BUILDERS[name](tmp_path_factory.mktemp(f"ovam_{name}"))


def prompt_of(name):
    return PROMPTS.get(name, LOWER)


def run(name, pipe, **kw):
    """Two steps without guidance: one denoiser row per call, the conditional one."""
    g = torch.Generator().manual_seed(0)
    common = dict(num_inference_steps=2, generator=g, output_type="np", guidance_scale=1.0)
    prompt = prompt_of(name)
    if name == "hunyuandit":
        return pipe(prompt, height=64, width=96, use_resolution_binning=False, **common, **kw).images
    if name in ("wan", "wan22"):
        return pipe(prompt=prompt, num_frames=9, height=48, width=64, **common, **kw).frames
    if name == "ltx":
        return pipe(prompt=prompt, height=32, width=64, num_frames=17, **common, **kw).frames
    if name == "ltx2":
        # the default max_sequence_length: the attribution prompt goes through the connectors at that length too
        return pipe(prompt=prompt, height=32, width=64, num_frames=17, stg_scale=0.0, modality_scale=1.0,
                    **common, **kw).frames
    if name == "sana_video":
        return pipe(prompt=prompt, height=64, width=96, frames=9, use_resolution_binning=False, **common, **kw).frames
    return pipe(prompt, num_frames=5, height=32, width=48, **common, **kw).frames


def denoiser(pipe):
    return pipe.unet if hasattr(pipe, "unet") else pipe.transformer


def first_layer(pipe):
    with trace(pipe) as tc:
        return tc.layers[0]


# ---- the recomputation by hand --------------------------------------------------------------------
def hand_context(name, pipe, text):
    """The attribution prompt as the attention modules receive it, by hand: (1, tokens, dim)."""
    net = denoiser(pipe)
    with torch.no_grad():
        if name == "hunyuandit":
            n1, n2 = len(pipe.tokenizer(text).input_ids), len(pipe.tokenizer_2(text).input_ids)
            kw = dict(device="cpu", do_classifier_free_guidance=False)
            bert = pipe.encode_prompt(text, text_encoder_index=0, **kw)[0][:, :n1]
            mt5 = pipe.encode_prompt(text, text_encoder_index=1, **kw)[0][:, :n2]
            return torch.cat([bert, net.text_embedder(mt5)], dim=1)
        n = len(pipe.tokenizer(text).input_ids)
        if name == "animatediff":
            return pipe.encode_prompt(text, "cpu", 1, False)[0][:, :n]
        if name == "ltx2":
            out = pipe.encode_prompt(text, do_classifier_free_guidance=False, device="cpu")
            rows = pipe.connectors(out[0], out[1], padding_side="left")[0][:, :n]  # prompt first, registers after
            return net.caption_projection(rows)
        kw = {"complex_human_instruction": None} if name == "sana_video" else {}
        e = pipe.encode_prompt(text, do_classifier_free_guidance=False, device="cpu", **kw)[0][:, :n]
        if name in ("wan", "wan22"):
            return net.condition_embedder.text_embedder(e)
        if name == "ltx":
            return net.caption_projection(e)
        return net.caption_norm(net.caption_projection(e))  # sana_video


def hand_probs(name, attn, q, ctx, kwargs):
    """softmax(q k^T / sqrt(d)) as the family's processor forms q and k: (B, heads, N, T)."""
    k = attn.to_k(ctx)
    if name == "hunyuandit":  # per-head LayerNorms, then the image rotary embedding on the queries only
        from diffusers.models.embeddings import apply_rotary_emb

        q, k = attn.norm_q(split_heads(q, attn.heads)), attn.norm_k(split_heads(k, attn.heads))
        q = apply_rotary_emb(q, kwargs["image_rotary_emb"])
    else:
        if getattr(attn, "norm_q", None) is not None:  # RMSNorm over all heads at once (Wan, LTX, Sana)
            q, k = attn.norm_q(q), attn.norm_k(k)
        q, k = split_heads(q, attn.heads), split_heads(k, attn.heads)
    return (q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)


class _Calls:
    """Each call's first to_q output and keyword arguments, on every module at one path (all experts)."""

    def __init__(self, modules):
        self.calls: list[tuple[torch.nn.Module, torch.Tensor, dict]] = []
        self.handles = []
        for m in modules:
            self.handles.append(m.register_forward_pre_hook(self._pre(m), with_kwargs=True))
            self.handles.append(m.to_q.register_forward_hook(self._q))

    def _pre(self, m):
        def hook(mod, args, kwargs):
            self.calls.append((m, None, kwargs))

        return hook

    def _q(self, mod, args, out):
        m, q, kw = self.calls[-1]
        if q is None:
            self.calls[-1] = (m, out.detach(), kw)

    def remove(self):
        for h in self.handles:
            h.remove()


def expected_maps(name, probs, shape):
    """(T, F, h, w) from the probabilities of one call, frame-major (AnimateDiff: frames as batch rows)."""
    p = probs.mean(1).permute(2, 0, 1) if name == "animatediff" else probs[0].mean(0).T  # (T, F, N) / (T, F*N)
    return p.reshape(probs.shape[-1], *shape[1:])


def test_video_unchanged_maps_with_time_and_restored(case):
    name, pipe = case
    tc = traced_equals_untraced(pipe, lambda: run(name, pipe), open_vocabulary=WORDS)
    hm = tc.heat_maps(0, method="ovam")
    daam = tc.heat_maps(0)
    assert hm.meta["method"] == "ovam" and hm.meta["family"] == daam.meta["family"]
    assert hm.words == WORDS and hm.maps.shape[1:] == daam.maps.shape[1:]
    assert hm.image_size == daam.image_size
    # softmax over the attribution tokens, head mean, summed over the 2 steps: 2 at every position
    torch.testing.assert_close(hm.maps.sum(0), torch.full(hm.maps.shape[1:], 2.0), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(hm.maps[1], hm.maps[2])
    if name == "hunyuandit":
        assert not hm.is_video
        assert len(hm.word("dog").positions) == 2  # a BERT row and an mT5 row
        return
    assert hm.is_video and hm.meta["time"] == daam.meta["time"] and hm.num_frames == daam.num_frames
    assert hm.frame(0).maps.shape == (hm.maps.shape[0], *daam.frame(0).maps.shape[1:])
    scores = hm.frame_scores()
    assert set(scores) == set(WORDS) and scores["dog"].shape == (hm.num_frames,)


def test_matches_an_independent_recomputation(case):
    name, pipe = case
    layer = first_layer(pipe)
    steps = [0, 1] if name == "wan22" else [0]  # Wan 2.2: step 1 runs on the second expert
    modules = [d.get_submodule(layer.name) for d in (denoiser(pipe), getattr(pipe, "transformer_2", None)) if d is not None]
    oracle = _Calls(modules)
    try:
        with trace(pipe, steps=steps, layers=[layer.name], keep_steps=True, grid=GRIDS.get(name),
                   open_vocabulary=WORDS) as tc:
            run(name, pipe)
            maps = [tc.heat_maps(0, method="ovam", steps=[s]).maps for s in steps]
    finally:
        oracle.remove()
    for step, m in zip(steps, maps, strict=True):
        attn, q, kwargs = oracle.calls[step]  # one call per step: no guidance
        assert attn is modules[step]  # Wan 2.2: step 0 on the high-noise transformer, step 1 on the low-noise one
        net = modules[step] is modules[0] and denoiser(pipe) or pipe.transformer_2
        with torch.no_grad():
            ctx = hand_context(name, pipe if net is denoiser(pipe) else _Expert(pipe, net), " ".join(WORDS))
            probs = hand_probs(name, attn, q, ctx, kwargs)
        assert probs.shape[-1] == m.shape[0]
        torch.testing.assert_close(m, expected_maps(name, probs, m.shape), rtol=1e-4, atol=1e-6)


class _Expert:
    """The pipeline with its second expert as ``transformer`` (for hand_context)."""

    def __init__(self, pipe, net):
        self.pipe, self.transformer = pipe, net

    def __getattr__(self, attr):
        return getattr(self.pipe, attr)


def test_the_prompt_as_attribution_prompt_is_daam_renormalised(case):
    name, pipe = case
    layer = first_layer(pipe)
    prompt = prompt_of(name)
    # Sana's instruction before the prompt would change its tokens; OVAM encodes without it
    kw = {"complex_human_instruction": None} if name == "sana_video" else {}
    with trace(pipe, steps=[0], layers=[layer.name], keep_heads=True, grid=GRIDS.get(name),
               open_vocabulary=[prompt]) as tc:
        run(name, pipe, **kw)
        ovam = tc.heat_maps(0, method="ovam")
        tokens = len(ovam.alignment.tokens)
        if name == "hunyuandit":  # [BERT (77) | mT5]: the prompt's rows of each part
            bert = ovam.alignment.tokens.index("[SEP]") + 1
            rows = list(range(bert)) + list(range(77, 77 + tokens - bert))
        else:
            rows = list(range(tokens))
        per_head = []
        for h in range(layer.heads):
            d = tc.heat_maps(0, heads=[h]).maps[rows]
            per_head.append(d / d.sum(0, keepdim=True))
    assert [tc.heat_maps(0).tokens[r] for r in rows] == list(ovam.alignment.tokens)
    torch.testing.assert_close(ovam.maps, torch.stack(per_head).mean(0), rtol=1e-4, atol=1e-5)


def test_every_cross_attention_family_is_served_and_joint_ones_refused(request):
    served = {f.name for f in FAMILIES if f.text_input is not None}
    assert set(OvamMethod.families) == served
    assert served == {"unet", "pixart", "sana", "hunyuandit", "wan", "sana_video", "ltx", "ltx2"}
    sd3 = request.getfixturevalue("sd3")
    with pytest.raises(UnsupportedPipelineError, match="method='concept'") as err:
        trace(sd3, open_vocabulary=["dog"])
    assert "\n" not in str(err.value)
