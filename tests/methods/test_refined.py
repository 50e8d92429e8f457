"""Refined maps: DAAM's cross-attention maps propagated through the model's own self-attention (A^k M),
streamed in blocks of query rows; the image is unchanged, the pipeline restored, the maps match an
explicit recomputation with A materialised, and the row blocks do not change them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from daamkit import TraceError, UnsupportedPipelineError, trace
from daamkit.aggregate import layer_grid
from daamkit.errors import InputError
from daamkit.methods import METHODS, RefinedMethod
from daamkit.methods import refined as refined_module
from daamkit.methods.refined import propagate
from daamkit.testing.pipelines import tiny_sd

PROMPT = "a red dog on a bench"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from daamkit.testing.tokenizers import clip_tokenizer

    d = tmp_path_factory.mktemp("clip_tokenizer_refined")
    clip_tokenizer(d)
    return str(d)


@pytest.fixture(scope="module")
def sd(tokenizer_dir):
    return tiny_sd(tokenizer_dir)


def run(pipe, prompt=PROMPT):
    return pipe(prompt, num_inference_steps=2, height=32, width=48, generator=torch.Generator().manual_seed(0),
                output_type="np").images


def hook_count(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def materialised(q, k, m, heads, scale, iterations):
    """A^iterations m with A built whole: the head mean of softmax(q k^T * scale)."""
    qh = q.unflatten(-1, (heads, -1)).transpose(1, 2).float()
    kh = k.unflatten(-1, (heads, -1)).transpose(1, 2).float()
    a = (qh @ kh.transpose(-1, -2) * scale).softmax(-1).mean(1)  # (b, N, N)
    out = m.float()
    for _ in range(iterations):
        out = a @ out
    return out


def test_registered_and_off_by_default(sd):
    assert METHODS["refined"] is RefinedMethod
    with trace(sd) as tc:
        run(sd)
        assert "refined" not in tc.method_names  # not asked for: nothing constructed, no hooks
        with pytest.raises(TraceError, match="refine=True"):
            tc.heat_maps(0, method="refined")


def test_image_unchanged_pipeline_restored_and_maps(sd):
    ref = run(sd)
    before = hook_count(sd.unet)
    with trace(sd) as tc:
        plain = hook_count(sd.unet) - before
    with trace(sd, refine=True) as tc:
        method = tc.method("refined")
        # pre-hook, to_q, to_k and forward hook on each traced block's attn1, nothing else
        assert len(method.taps) == len(tc.layers)
        assert hook_count(sd.unet) - before == plain + 4 * len(tc.layers) == plain + len(method.hooks.handles)
        out = run(sd)
        hm = tc.heat_maps(0, method="refined")
        daam = tc.heat_maps(0)
    assert hook_count(sd.unet) == before
    assert all(tap.q is None and tap.k is None for tap in method.taps.values())  # nothing held after the call
    torch.testing.assert_close(torch.from_numpy(out), torch.from_numpy(ref), rtol=0, atol=0)
    assert hm.words == daam.words and hm.maps.shape == daam.maps.shape and hm.image_size == daam.image_size
    # the default: the finest resolution with self-attention (the tiny UNet's blocks are all at factor 2)
    assert hm.meta["method"] == "refined" and hm.meta["iterations"] == 1 and hm.meta["resolutions"] == [2]
    # A is row-stochastic: every pixel keeps DAAM's total over the tokens (2 steps), the maps move
    torch.testing.assert_close(hm.maps.sum(0), daam.maps.sum(0), rtol=1e-3, atol=1e-3)
    assert (hm.maps - daam.maps).abs().max() > 1e-3
    # and after an error inside the block the pipeline is restored too
    with pytest.raises(RuntimeError, match="stop"), trace(sd, refine=RefinedMethod(iterations=2)):
        raise RuntimeError("stop")
    assert hook_count(sd.unet) == before


class _Outputs:
    """The outputs of some projections, call by call (registered before the trace)."""

    def __init__(self, *modules):
        self.calls: dict[int, list[torch.Tensor]] = {id(m): [] for m in modules}
        self.handles = [m.register_forward_hook(self._hook) for m in modules]

    def _hook(self, module, args, out):
        self.calls[id(module)].append(out.detach())

    def of(self, module):
        return self.calls[id(module)]

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("iterations", [1, 2])
def test_matches_an_independent_recomputation(sd, iterations):
    with trace(sd) as tc:
        layer = tc.layers[-1]
    attn2 = sd.unet.get_submodule(layer.name)
    attn1 = sd.unet.get_submodule(layer.name.replace("attn2", "attn1"))
    seen = _Outputs(attn1.to_q, attn1.to_k, attn2.to_q, attn2.to_k)
    try:
        with trace(sd, steps=[0], layers=[layer.name], refine=RefinedMethod(iterations=iterations)) as tc:
            run(sd)
            maps = tc.heat_maps(0, method="refined").maps
            h, w = tc.generation.call.latent_hw
    finally:
        seen.remove()
    heads = int(attn2.heads)
    cond = slice(1, 2)  # step 0's call; CFG rows are [negative, cond]
    q2, k2 = seen.of(attn2.to_q)[0][cond], seen.of(attn2.to_k)[0][cond]
    q2h = q2.unflatten(-1, (heads, -1)).transpose(1, 2)
    k2h = k2.unflatten(-1, (heads, -1)).transpose(1, 2)
    m = (q2h @ k2h.transpose(-1, -2) * attn2.scale).softmax(-1).mean(1)  # (1, N, T)
    q1, k1 = seen.of(attn1.to_q)[0][cond], seen.of(attn1.to_k)[0][cond]
    out = materialised(q1, k1, m, int(attn1.heads), float(attn1.scale), iterations)[0]
    lh, lw, factor = layer_grid((h, w), out.shape[0])
    assert factor > 1  # the test covers the upsampling to the latent grid
    expected = F.interpolate(out.T.reshape(1, -1, lh, lw), size=(h, w), mode="bicubic", align_corners=False)[0]
    torch.testing.assert_close(maps, expected.clamp(min=0), rtol=1e-4, atol=1e-6)
    # the recomputation would tell an unrefined map apart
    plain = F.interpolate(m[0].T.reshape(1, -1, lh, lw), size=(h, w), mode="bicubic", align_corners=False)[0]
    assert (plain.clamp(min=0) - maps).abs().max() > 1e-3


def test_negative_branch(sd):
    with trace(sd, negative=True, refine=True) as tc:
        run(sd)
        cond = tc.heat_maps(0, method="refined")
        neg = tc.heat_maps(0, method="refined", branch="negative")
        daam_neg = tc.heat_maps(0, branch="negative")
    assert neg.maps.shape == daam_neg.maps.shape and neg.meta["branch"] == "negative"
    torch.testing.assert_close(neg.maps.sum(0), daam_neg.maps.sum(0), rtol=1e-3, atol=1e-3)
    assert (neg.maps - cond.maps).abs().max() > 1e-3


@pytest.mark.parametrize("rows", [1, 7, 64, None])
def test_propagate_in_row_blocks_equals_materialised(rows):
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 40, 16, generator=g), torch.randn(2, 40, 16, generator=g)
    m = torch.rand(2, 40, 5, generator=g).softmax(-1)
    got = propagate(q, k, m, heads=4, scale=0.5, iterations=3, rows=rows)
    torch.testing.assert_close(got, materialised(q, k, m, 4, 0.5, 3), rtol=1e-5, atol=1e-6)


def test_chunked_equals_unchunked(sd, monkeypatch):
    used: list[tuple[int, int | None]] = []

    def spy(q, k, m, **kw):
        used.append((int(q.shape[1]), kw["rows"]))
        return propagate(q, k, m, **kw)

    monkeypatch.setattr(refined_module, "propagate", spy)
    results = {}
    for mib in (64.0, 1e-4):
        used.clear()
        with trace(sd, chunk_mib=mib, refine=RefinedMethod(iterations=2)) as tc:
            run(sd)
            results[mib] = tc.heat_maps(0, method="refined").maps
        assert used
        rows = {r for _, r in used}
        # 64 MiB: A whole at once; a 100-byte budget: one query row per block (and the cross-attention
        # probabilities arrive a query at a time, gathered before the refinement)
        assert rows == ({n for n, _ in used} if mib > 1 else {1})
    torch.testing.assert_close(results[1e-4], results[64.0], rtol=1e-5, atol=1e-6)


def test_fused_projections_give_the_same_maps(tokenizer_dir):
    pipe = tiny_sd(tokenizer_dir)
    with trace(pipe, refine=True) as tc:
        run(pipe)
        ref = tc.heat_maps(0, method="refined").maps
    pipe.unet.fuse_qkv_projections()
    attn1 = [m for name, m in pipe.unet.named_modules() if name.endswith("attn1")]
    calls = _Outputs(*(m.to_q for m in attn1))
    try:
        with trace(pipe, refine=True) as tc:
            run(pipe)
            fused = tc.heat_maps(0, method="refined").maps
    finally:
        calls.remove()
    assert not any(calls.calls.values())  # to_qkv ran instead: the maps come from the fallback
    torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-5)


def test_bad_options_give_one_clear_error(sd, request):
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(InputError, match="iterations must be a whole number >= 1"):
            RefinedMethod(iterations=bad)
    for bad in ([], [0], [2, 2], ["2"], [1.0], "2"):
        with pytest.raises(InputError, match="resolutions must be distinct downsampling factors"):
            RefinedMethod(resolutions=bad)
    with pytest.raises(InputError, match="refine must be True, False or a RefinedMethod"):
        trace(sd, refine="yes")
    before = hook_count(sd.unet)
    with pytest.raises(InputError, match=r"resolutions \[1\] match no block with self-attention.*factors 2"):
        with trace(sd, refine=RefinedMethod(resolutions=[1])):
            pass
    assert hook_count(sd.unet) == before
    with trace(sd, refine=RefinedMethod(resolutions=[2])) as tc:
        run(sd)
        with pytest.raises(InputError, match=r"trace\(heads=\.\.\.\)"):
            tc.heat_maps(0, method="refined", heads=[0])
        assert tc.heat_maps(0, method="refined").meta["resolutions"] == [2]
    sd3 = request.getfixturevalue("sd3")
    before3 = hook_count(sd3.transformer)
    with pytest.raises(UnsupportedPipelineError, match="self-attention") as err:
        trace(sd3, refine=True)
    assert "\n" not in str(err.value) and hook_count(sd3.transformer) == before3
