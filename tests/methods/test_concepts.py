"""ConceptAttention-style maps on SD3 and Flux: the image is unchanged and the concept stream is the
model's own text stream computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from daamkit import TraceError, UnsupportedPipelineError, trace
from daamkit.testing.pipelines import tiny_sd


def run(pipe, prompt="a red dog on a bench", **kw):
    return pipe(prompt, num_inference_steps=2, height=32, width=48, max_sequence_length=16,
                generator=torch.Generator().manual_seed(0), output_type="np", **kw).images


def hook_count(pipe):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in pipe.transformer.modules())


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_concept_maps_leave_the_image_unchanged(family, request):
    pipe = request.getfixturevalue(family)  # only the family in use is built
    hooks = hook_count(pipe)
    ref = run(pipe)
    with trace(pipe, concepts=["dog", "tree", "sky", "traffic light"]) as tc:
        out = run(pipe)
        cm = tc.heat_maps(0, method="concept")
        cross = tc.heat_maps(0)
    np.testing.assert_allclose(out, ref, atol=1e-5)
    assert hook_count(pipe) == hooks
    assert cm.words == ["dog", "tree", "sky", "traffic", "light"]
    assert cm.maps.shape[0] == 4 and cm.maps.shape[1:] == cross.maps.shape[1:]
    torch.testing.assert_close(cm.maps.sum(0), torch.ones(cm.maps.shape[1:]))  # softmax over concepts
    assert cm.word("traffic light").positions == (3,)
    assert cm.meta["method"] == "concept"
    assert not torch.allclose(cm.maps[0], cm.maps[1])


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_concept_stream_equals_the_models_text_stream(family, request):
    """Fed the prompt's own context tokens as concepts, the side stream must reproduce the text stream
    of every joint block exactly: same modulation, projections, norms, attention over [text; image]."""
    pipe = request.getfixturevalue(family)  # only the family in use is built
    kw = dict(max_sequence_length=16)
    if family == "sd3":
        emb = pipe.encode_prompt("a red dog", "a red dog", "a red dog", do_classifier_free_guidance=False, **kw)[0]
    else:
        emb = pipe.encode_prompt("a red dog", "a red dog", **kw)[0]
    emb = emb[0]
    names = [f"t{i}" for i in range(emb.shape[0])]
    seen = {}

    def grab(name):
        def hook(mod, args, kwargs, out):
            seen[name] = out[0]  # blocks return (encoder_hidden_states, hidden_states)
        return hook

    handles = [b.register_forward_hook(grab(f"transformer_blocks.{i}"), with_kwargs=True)
               for i, b in enumerate(pipe.transformer.transformer_blocks)]
    try:
        with trace(pipe, concepts=names, concept_embeds=emb) as tc:
            pipe("a red dog", num_inference_steps=1, height=32, width=32, guidance_scale=1.0, output_type="np", **kw)
            states = tc._concept_capture.states
    finally:
        for h in handles:
            h.remove()
    compared = 0
    for name, real in seen.items():
        if real is None:  # SD3's last block is context_pre_only: no text output
            continue
        torch.testing.assert_close(states[name], real, rtol=1e-4, atol=1e-5)
        compared += 1
    assert compared >= 1


def test_concept_errors(sd3, clip_tokenizer_dir):
    with pytest.raises(UnsupportedPipelineError, match="joint-attention"):
        trace(tiny_sd(clip_tokenizer_dir), concepts=["dog"])
    with pytest.raises(ValueError, match="distinct"):
        trace(sd3, concepts=["dog", "dog"])
    with trace(sd3) as tc:
        run(sd3)
        with pytest.raises(TraceError, match="concepts="):
            tc.heat_maps(0, method="concept")
        with pytest.raises(ValueError, match="method"):
            tc.heat_maps(0, method="nope")


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_concept_maps_follow_the_step_selection(family, request):
    """trace(steps=...) selects the steps of concept maps as of word maps: the two single-step maps
    average (before the softmax over concepts) to the map of both steps."""
    pipe = request.getfixturevalue(family)  # only the family in use is built
    sums = {}
    for steps in ([0], [1], None):
        with trace(pipe, concepts=["dog", "sky"], steps=steps, concept_softmax=False) as tc:
            run(pipe)
            sums[str(steps)] = tc.heat_maps(0, method="concept").maps
    assert not torch.allclose(sums["[0]"], sums["[1]"])
    torch.testing.assert_close((sums["[0]"] + sums["[1]"]) / 2, sums["None"], rtol=1e-5, atol=1e-6)
