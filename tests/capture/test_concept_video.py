"""ConceptAttention on the video families (CogVideoX, Mochi, HunyuanVideo, HunyuanVideo 1.5): the video
is unchanged, every concept gets a finite map with DAAM's time axis, and fed the prompt's own text
tokens the side stream is the model's own text stream (states and attention outputs) while the maps
are the products of the model's own attention outputs.

Why no hand-set region test here: the concept maps are dot products of attention OUTPUTS, and in these
blocks the video queries' softmax runs over the video keys as well as the text; the family tests'
hand-set q/k (which the DAAM maps, normalised over the text keys, follow) do not decide what a video
token's output is, nor what a concept attends to. What is sound is asserted instead: a concept that
equals a prompt word (its token's embedding) has exactly that word's attention output in every block,
so its map is that word's output-space map, recomputed here from the model's own tensors.
"""

from __future__ import annotations

import pytest
import torch
from family_checks import traced_equals_untraced

from daamkit import UnsupportedPipelineError, trace
from daamkit.methods.concept_video import VIDEO_FAMILIES

PROMPT = "a red dog on a wooden bench"
CONCEPTS = ["dog", "tree", "wooden bench"]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    from daamkit.testing.families.hunyuanvideo import hunyuan_llama_tokenizer

    d = tmp_path_factory.mktemp("hunyuan_llama")
    hunyuan_llama_tokenizer(d)
    return str(d)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> str:
    from daamkit.testing.families.hunyuanvideo15 import hunyuan_qwen_tokenizer

    d = tmp_path_factory.mktemp("hunyuan_qwen")
    hunyuan_qwen_tokenizer(d)
    return str(d)


def _pipe(family, t5_tokenizer_dir, clip_tokenizer_dir, llama_dir, qwen_dir):
    if family == "cogvideox":
        from daamkit.testing.families.cogvideox import tiny_cogvideox

        return tiny_cogvideox(t5_tokenizer_dir)
    if family == "mochi":
        from daamkit.testing.families.cogvideox import tiny_mochi

        return tiny_mochi(t5_tokenizer_dir)
    if family == "hunyuanvideo":
        from daamkit.testing.families.hunyuanvideo import tiny_hunyuan_video

        return tiny_hunyuan_video(llama_dir, clip_tokenizer_dir)
    from daamkit.testing.families.hunyuanvideo15 import tiny_hunyuan_video15

    return tiny_hunyuan_video15(qwen_dir)


# (height, width, frames, token grid (frames, h, w)) of the family tests' calls
SIZES = {
    "cogvideox": (32, 48, 9, (3, 4, 6)),
    "mochi": (64, 96, 13, (3, 4, 6)),
    "hunyuanvideo": (48, 64, 9, (3, 3, 4)),
    "hunyuanvideo15": (64, 96, 9, (3, 4, 6)),
}
# no CFG, or (HunyuanVideo 1.5's guider) the cond call first: the hooks keep the first call's tensors
NO_CFG = {"cogvideox": {"guidance_scale": 1.0}, "mochi": {"guidance_scale": 1.0}, "hunyuanvideo": {}, "hunyuanvideo15": {}}
ATTN = {"cogvideox": "attn1", "mochi": "attn1", "hunyuanvideo": "attn", "hunyuanvideo15": "attn"}


@pytest.fixture(scope="module", params=VIDEO_FAMILIES)
def family_pipe(request, t5_tokenizer_dir, clip_tokenizer_dir, llama_dir, qwen_dir):
    return request.param, _pipe(request.param, t5_tokenizer_dir, clip_tokenizer_dir, llama_dir, qwen_dir)


def run(family, pipe, **kw):
    h, w, f, _ = SIZES[family]
    return pipe(PROMPT, num_inference_steps=2, height=h, width=w, num_frames=f,
                generator=torch.Generator().manual_seed(0), output_type="np", **kw).frames


def test_video_unchanged_and_a_map_per_concept_over_time(family_pipe):
    family, pipe = family_pipe
    tc = traced_equals_untraced(pipe, lambda: run(family, pipe), concepts=CONCEPTS)
    cm = tc.heat_maps(0, method="concept")
    cross = tc.heat_maps(0)
    grid = SIZES[family][3]
    assert cm.meta["family"] == family and cm.meta["method"] == "concept"
    assert cm.words == ["dog", "tree", "wooden", "bench"] and cm.word("wooden bench").positions == (2,)
    assert tuple(cm.maps.shape) == (3, *grid) == (3, *cross.maps.shape[1:])
    assert torch.isfinite(cm.maps).all()
    torch.testing.assert_close(cm.maps.sum(0), torch.ones(grid))  # softmax over the concepts
    assert not torch.allclose(cm.maps[0], cm.maps[1])
    # the time axis is DAAM's: same token frames on the same returned frames
    assert cm.is_video and cm.time == cross.time and cm.image_size == cross.image_size
    assert cm.num_frames == SIZES[family][2]
    assert tuple(cm.word("dog").frame(0).value.shape) == grid[1:]
    scores = cm.word("dog").frame_scores()
    assert len(scores) == SIZES[family][2] and all(0 < float(s) < 1 for s in scores)


def _inputs(family, pipe):
    """The prompt's text rows as the first block gets them (the valid ones, for the masked families)
    from the first denoiser call of an untraced call."""
    seen = {}

    def grab(mod, args, kwargs):
        seen.setdefault("kw", kwargs)

    handle = pipe.transformer.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        run(family, pipe, **NO_CFG[family])
    finally:
        handle.remove()
    kw = seen["kw"]
    ctx = kw["encoder_hidden_states"]
    assert ctx.shape[0] == 1, "expected one row without CFG"
    mask = kw.get("encoder_attention_mask")
    valid = torch.ones(ctx.shape[1], dtype=torch.bool) if mask is None else mask[0].bool()
    return ctx[0][valid], int(valid.sum())


def test_concept_stream_equals_the_models_text_stream_and_maps_recompute(family_pipe):
    """The prompt's (valid) text rows as concepts: each block's concept stream and attention output
    must be the model's own text stream's (every family masks padding from the text's attention or,
    CogVideoX, attends all of it, so the concepts see exactly what the text rows see: [video; text]).
    The maps of block 0 at step 0 (no softmax) are then the products of the model's own video and text
    attention outputs."""
    family, pipe = family_pipe
    emb, n = _inputs(family, pipe)
    t = pipe.transformer
    cog = family == "cogvideox"
    blocks = list(t.transformer_blocks)
    real_state, real_out, video_out = {}, {}, {}

    def grab_state(name):
        def hook(mod, args, kwargs, out):
            real_state.setdefault(name, out[1][0, :n])  # blocks return (video, text)
        return hook

    def grab_out(name):
        def hook(mod, args):
            x = args[0][0]
            # CogVideoX's to_out takes [text; video]; the dual streams' to_out the video, to_add_out the text
            if cog:
                real_out.setdefault(name, x[:n])
                video_out.setdefault(name, x[n:])
            else:
                video_out.setdefault(name, x)
        return hook

    def grab_text_out(name):
        def hook(mod, args):
            real_out.setdefault(name, args[0][0, :n])
        return hook

    handles = []
    for i, b in enumerate(blocks):
        name = f"transformer_blocks.{i}"
        attn = getattr(b, ATTN[family])
        handles.append(b.register_forward_hook(grab_state(name), with_kwargs=True))
        handles.append(attn.to_out[0].register_forward_pre_hook(grab_out(name)))
        if not cog and getattr(attn, "to_add_out", None) is not None:
            handles.append(attn.to_add_out.register_forward_pre_hook(grab_text_out(name)))
    names = [f"t{i}" for i in range(n)]
    layer = f"transformer_blocks.0.{ATTN[family]}"
    try:
        with trace(pipe, concepts=names, concept_embeds=emb, concept_softmax=False, layers=[layer],
                   steps=[0]) as tc:
            run(family, pipe, **NO_CFG[family])
            capture = tc._concept_capture
            cm = tc.heat_maps(0, method="concept")
    finally:
        for h in handles:
            h.remove()
    compared = 0
    for name, real in real_state.items():
        if real is None or name not in capture.states:  # Mochi's last block gives no text back
            continue
        torch.testing.assert_close(capture.states[name][0], real, rtol=1e-4, atol=1e-5)
        compared += 1
    assert compared >= 1
    for name, real in real_out.items():
        torch.testing.assert_close(capture.outputs[name][0], real, rtol=1e-4, atol=1e-5)
    assert set(capture.outputs) == {f"transformer_blocks.{i}" for i in range(len(blocks))}
    name = "transformer_blocks.0"
    expected = torch.einsum("nc,kc->kn", video_out[name].float(), real_out[name].float())
    torch.testing.assert_close(cm.maps, expected.reshape(n, *SIZES[family][3]), rtol=1e-4, atol=1e-5)


def test_concept_maps_within_a_small_chunk_budget_are_the_same(family_pipe):
    family, pipe = family_pipe
    with trace(pipe, concepts=CONCEPTS) as tc:
        run(family, pipe)
        ref = tc.heat_maps(0, method="concept").maps
    with trace(pipe, concepts=CONCEPTS, chunk_mib=0.001) as tc:  # a head and a few video tokens at a time
        run(family, pipe)
        maps = tc.heat_maps(0, method="concept").maps
    torch.testing.assert_close(maps, ref, rtol=1e-5, atol=1e-6)


def test_ltx2_has_no_joint_text_stream(tmp_path):
    from daamkit.testing.families.ltx2 import tiny_ltx2
    from daamkit.testing.families.sana import gemma_tokenizer

    gemma_tokenizer(tmp_path, extra_text=())
    pipe = tiny_ltx2(str(tmp_path))
    with pytest.raises(UnsupportedPipelineError, match="joint-attention") as err:
        trace(pipe, concepts=["dog"])
    assert all(f in str(err.value) for f in ("sd3", "flux", *VIDEO_FAMILIES))
