"""Relation maps: image->image (where a point or region attends) and text->text (token-to-token
attention in joint models), against recomputations from the layers' own inputs; images unchanged,
pipelines restored, bad inputs refused with one clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from daamkit import TraceError, UnsupportedPipelineError, trace
from daamkit.errors import InputError
from daamkit.methods import relations as relations_module
from daamkit.relation import ImageRelationMap, TokenRelationMatrix
from daamkit.testing.pipelines import tiny_flux, tiny_sd, tiny_sd3

PROMPT = "a red dog on a bench"


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from daamkit.testing.tokenizers import clip_tokenizer, t5_tokenizer

    clip, clip2, t5 = (tmp_path_factory.mktemp(n) for n in ("clip_rel", "clip2_rel", "t5_rel"))
    clip_tokenizer(clip)
    clip_tokenizer(clip2, pad_token="!")
    t5_tokenizer(str(t5))
    return str(clip), str(clip2), str(t5)


@pytest.fixture(scope="module")
def sd(tokenizers):
    return tiny_sd(tokenizers[0])


@pytest.fixture(scope="module")
def sd3(tokenizers):
    return tiny_sd3(*tokenizers)


@pytest.fixture(scope="module")
def flux(tokenizers):
    return tiny_flux(tokenizers[0], tokenizers[2])


def run_sd(pipe, steps=2, **kw):
    return pipe(PROMPT, num_inference_steps=steps, height=64, width=64, generator=torch.Generator().manual_seed(0),
                output_type="np", **kw).images


def run_joint(pipe, steps=1, **kw):
    return pipe(PROMPT, num_inference_steps=steps, height=32, width=48, max_sequence_length=16,
                generator=torch.Generator().manual_seed(0), output_type="np", **kw).images


def hook_count(module):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


def denoiser(pipe):
    return getattr(pipe, "unet", None) or pipe.transformer


# ---- UNet: self-attention ----------------------------------------------------------------------
def test_sd_point_matches_a_recomputation_of_one_layer_and_step(sd):
    layer = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
    attn = sd.unet.get_submodule(layer)
    seen = []
    handle = attn.register_forward_pre_hook(lambda m, a, kw: seen.append((a[0] if a else kw["hidden_states"]).detach()),
                                            with_kwargs=True)
    try:
        with trace(sd, steps=[1], layers=["down_blocks.1.attentions.0"], relations=["image->image"],
                   query=(40, 13)) as tc:
            run_sd(sd)
            rel = tc.relation(0, "image->image")
    finally:
        handle.remove()
    assert isinstance(rel, ImageRelationMap) and rel.meta["layers"] == [layer]
    x = seen[1][1:2]  # step 1; CFG puts the conditional row second
    heads = attn.heads
    q = attn.to_q(x).unflatten(-1, (heads, -1)).transpose(1, 2)
    k = attn.to_k(x).unflatten(-1, (heads, -1)).transpose(1, 2)
    full = (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)  # (1, heads, N, N): the oracle may hold it
    n = x.shape[1]
    side = int(n**0.5)
    cell = (40 * side // 64) * side + 13 * side // 64
    expected = full[0, :, cell].mean(0).reshape(1, 1, side, side)
    expected = F.interpolate(expected, size=rel.map.shape, mode="bicubic", align_corners=False).clamp(min=0)[0, 0]
    torch.testing.assert_close(rel.map, expected, rtol=1e-4, atol=1e-6)
    assert rel.image_size == (64, 64)


def test_sd_images_unchanged_pipeline_restored_and_only_query_rows_computed(sd, monkeypatch):
    before = hook_count(sd.unet)
    plain = run_sd(sd)
    shapes = []
    real = relations_module.block_probabilities

    def spy(q, k, queries, keys, **kw):
        out = real(q, k, queries, keys, **kw)
        shapes.append(tuple(out.shape))
        return out

    monkeypatch.setattr(relations_module, "block_probabilities", spy)
    mask = np.zeros((64, 64), bool)
    mask[8:24, 30:50] = True
    with trace(sd, relations=["image->image"], query=[(3, 3), mask]) as tc:
        traced = run_sd(sd)
        rel = tc.relation(0, "image->image")
    np.testing.assert_array_equal(plain, traced)
    assert hook_count(sd.unet) == before
    assert rel.maps.shape[0] == 2 and rel.maps.shape[1:] == (32, 32)
    # each call computes the rows of the queried cells only, over all image keys: never N x N
    for _, _, rows, keys in shapes:
        assert rows < keys and rows <= 5 * 4 * 2, (rows, keys)
    # the point attends first of all to itself and its neighbourhood (an untrained model's self-attention
    # is dominated by its position-free content; a region's map differs from a corner's)
    assert not torch.allclose(rel.maps[0], rel.maps[1])
    with pytest.raises(InputError, match="2 queries"):
        _ = rel.map


def test_sd_errors_are_clear_and_leave_the_pipeline_restored(sd):
    before = hook_count(sd.unet)
    with pytest.raises(InputError, match="outside the 64x64 image"):
        with trace(sd, relations=["image->image"], query=(64, 10)):
            run_sd(sd, steps=1)
    assert hook_count(sd.unet) == before
    with pytest.raises(InputError, match="mask is 8x8 but the image is 64x64"):
        with trace(sd, relations=["image->image"], query=np.ones((8, 8), bool)):
            run_sd(sd, steps=1)
    assert hook_count(sd.unet) == before
    with pytest.raises(InputError, match="empty"):
        trace(sd, relations=["image->image"], query=np.zeros((64, 64), bool))
    with pytest.raises(InputError, match="needs query"):
        trace(sd, relations=["image->image"])
    with pytest.raises(InputError, match="point \\(y, x\\)"):
        trace(sd, relations=["image->image"], query="centre")
    with pytest.raises(InputError, match="add relations"):
        trace(sd, query=(1, 2))
    with pytest.raises(InputError, match="unknown relation"):
        trace(sd, relations=["image->text"])
    with pytest.raises(UnsupportedPipelineError, match="text->text relations need a joint-attention"):
        trace(sd, relations=["text->text"])
    assert hook_count(sd.unet) == before
    with trace(sd, relations=["image->image"], query=(1, 1)) as tc:
        run_sd(sd, steps=1)
        with pytest.raises(TraceError, match="relations=\\['text->text'\\]"):
            tc.relation(0, "text->text")
        with pytest.raises(InputError, match="tc.relation"):
            tc.heat_maps(0, method="image->image")
        with pytest.raises(InputError, match="keep_steps"):
            tc.relation(0, "image->image", steps=[0])
        assert tc.method_names == ["daam"] and tc.relation_names == ["image->image"]
    assert hook_count(sd.unet) == before


# ---- joint transformers ----------------------------------------------------------------------------
class JointOracle:
    """The scores of one joint attention module's whole sequence, (B, heads, L, L), from its projections
    with its own q/k norms and rotary embedding applied here; ``kind`` "sd3" is [image, text] from the
    two streams' projections, "single" Flux's one [text, image] sequence."""

    def __init__(self, module, kind):
        self.m, self.kind, self.scores, self.out = module, kind, [], {}
        self.handles = [module.register_forward_pre_hook(self._pre, with_kwargs=True),
                        module.register_forward_hook(self._post)]
        for attr in ("to_q", "to_k", "add_q_proj", "add_k_proj"):
            if getattr(module, attr, None) is not None:
                self.handles.append(getattr(module, attr).register_forward_hook(self._save(attr)))

    def _pre(self, mod, args, kwargs):
        self.out, self.rope = {}, kwargs.get("image_rotary_emb")

    def _save(self, attr):
        def hook(mod, args, out):
            self.out.setdefault(attr, out.detach())
        return hook

    def _post(self, mod, args, out):
        from diffusers.models.embeddings import apply_rotary_emb

        m = self.m
        split = lambda x: x.unflatten(-1, (m.heads, -1))  # noqa: E731
        q, k = m.norm_q(split(self.out["to_q"])), m.norm_k(split(self.out["to_k"]))
        if self.kind == "sd3":
            q = torch.cat([q, m.norm_added_q(split(self.out["add_q_proj"]))], 1)
            k = torch.cat([k, m.norm_added_k(split(self.out["add_k_proj"]))], 1)
        if self.rope is not None:
            q, k = (apply_rotary_emb(x, self.rope, sequence_dim=1) for x in (q, k))
        self.scores.append(torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * q.shape[-1] ** -0.5)

    def remove(self):
        for h in self.handles:
            h.remove()


@pytest.mark.parametrize("probabilities", ["text", "model"])
def test_sd3_image_and_text_relations_match_a_recomputation(sd3, probabilities):
    layer = "transformer_blocks.0.attn"
    oracle = JointOracle(sd3.transformer.get_submodule(layer), "sd3")
    try:
        with trace(sd3, steps=[0], layers=[layer], probabilities=probabilities,
                   relations=["image->image", "text->text"], query=(9, 30)) as tc:
            run_joint(sd3, guidance_scale=1.0)
            rel, mat = tc.relation(0, "image->image"), tc.relation(0, "text->text")
    finally:
        oracle.remove()
    scores = oracle.scores[0][-1]  # (heads, L, L); no CFG
    h, w = rel.map.shape
    n = h * w
    assert (h, w) == (32, 48)
    image_keys = scores[:, 9 * w + 30, :n]
    text = scores[:, n:, n:]
    if probabilities == "text":
        row, tt = image_keys.softmax(-1), text.softmax(-1)
    else:
        row = scores[:, 9 * w + 30].softmax(-1)[:, :n]
        tt = scores[:, n:].softmax(-1)[:, :, n:]
    torch.testing.assert_close(rel.map, row.mean(0).reshape(h, w), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(mat.matrix, tt.mean(0), rtol=1e-4, atol=1e-6)
    assert isinstance(mat, TokenRelationMatrix) and len(mat.tokens) == mat.matrix.shape[0] == 77 + 16
    sums = mat.matrix.sum(-1)
    if probabilities == "text":
        torch.testing.assert_close(sums, torch.ones_like(sums), rtol=1e-4, atol=1e-4)
    else:
        assert (sums < 1 - 1e-4).all()
    labels, words = mat.words()
    assert labels == ["a", "red", "dog", "on", "a#2", "bench"]
    dog, bench = (mat.alignment.find(wd)[0].positions for wd in ("dog", "bench"))
    torch.testing.assert_close(words[2, 5], mat.matrix[list(dog)][:, list(bench)].sum(1).mean())


def test_flux_single_stream_point_and_region_match_a_recomputation(flux):
    layer = "single_transformer_blocks.0.attn"
    oracle = JointOracle(flux.transformer.get_submodule(layer), "single")
    mask = np.zeros((32, 48), bool)
    mask[4:6, 14:18] = True  # exactly the cells (2, 7) and (2, 8) of the 16x24 token grid
    try:
        with trace(flux, steps=[0], layers=[layer], relations=["image->image", "text->text"],
                   query=[(5, 15), (4, 17), mask]) as tc:
            run_joint(flux)
            rel = tc.relation(0, "image->image")
            mat = tc.relation(0, "text->text")
    finally:
        oracle.remove()
    scores = oracle.scores[0][-1]
    t = 16
    h, w = rel.maps.shape[1:]
    assert (h, w) == (16, 24) and rel.image_size == (32, 48)
    for k, cell in enumerate((2 * w + 7, 2 * w + 8)):
        expected = scores[:, t + cell, t:].softmax(-1).mean(0).reshape(h, w)
        torch.testing.assert_close(rel.maps[k], expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(rel.maps[2], (rel.maps[0] + rel.maps[1]) / 2, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(mat.matrix, scores[:, :t, :t].softmax(-1).mean(0), rtol=1e-4, atol=1e-6)


def test_joint_images_unchanged_and_pipelines_restored(sd3, flux):
    for pipe in (sd3, flux):
        before = hook_count(pipe.transformer)
        plain = run_joint(pipe, steps=2)
        with trace(pipe, relations=["image->image", "text->text"], query=(0, 47)) as tc:
            traced = run_joint(pipe, steps=2)
            rel = tc.relation(0, "image->image")
        np.testing.assert_array_equal(plain, traced)
        assert hook_count(pipe.transformer) == before
        # each step's row is a softmax over the image keys on the token grid: the sum over 2 steps is 2
        torch.testing.assert_close(rel.map.sum(), torch.tensor(2.0), rtol=1e-4, atol=1e-4)
        with pytest.raises(InputError, match="outside the 32x48 image"):
            with trace(pipe, relations=["image->image"], query=(32, 0)):
                run_joint(pipe)
        assert hook_count(pipe.transformer) == before


def test_plots_mark_the_query_and_label_the_words(sd3, tmp_path):
    from daamkit.plot import save_figure

    mask = np.zeros((32, 48), bool)
    mask[10:20, 5:25] = True
    with trace(sd3, relations=["image->image", "text->text"], query=[(9, 30), mask]) as tc:
        image = sd3(PROMPT, num_inference_steps=1, height=32, width=48, max_sequence_length=16,
                    generator=torch.Generator().manual_seed(0)).images[0]
        rel, mat = tc.relation(0, "image->image"), tc.relation(0, "text->text")
    ax = rel.plot(image, k=0)
    assert ax.get_title() == "(y=9, x=30)"
    (x,), (y,) = ax.lines[-1].get_data()
    assert (x, y) == (30, 9)
    ax = rel.plot(None, k=1, title="")
    assert ax.collections  # the region's outline
    assert save_figure(ax.figure, tmp_path / "rel.png").stat().st_size > 0
    ax = mat.plot()
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "red", "dog", "on", "a#2", "bench"]
    ax = mat.plot(level="token")
    assert len(ax.get_yticklabels()) == sum(len(w.positions) for w in mat.alignment.words if w.positions)
    assert save_figure(ax.figure, tmp_path / "mat.pdf").stat().st_size > 0
