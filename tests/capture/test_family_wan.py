"""Wan 2.1 / 2.2 (``WanTransformer3DModel``): video cross-attention ``attn2`` over UMT5 keys padded to 512
with zero embeddings (unmasked), frame-major video tokens, the causal 4x VAE; 2.1 I2V's image-context
keys in a call of their own, 2.2 A14B's two experts, TI2V-5B's per-token timesteps."""

from __future__ import annotations

import pytest
import torch
from family_checks import assert_maps_for_every_word, traced_equals_untraced

from daamkit import trace
from daamkit.capture.families import family_of
from daamkit.frames import TimeAxis

PROMPT = "a red dog sitting on a wooden bench"
WORDS = ["a", "red", "dog", "sitting", "on", "wooden", "bench"]
SITE = r"blocks\.\d+\.attn2"
FRAMES, GRID = 3, (3, 4)  # 9 frames of 48x64 px: 3 latent frames, 6x8 latents, patch 2x2


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> str:
    from daamkit.testing.families.wan import wan_tokenizer

    d = tmp_path_factory.mktemp("wan_tokenizer")
    wan_tokenizer(d)
    return str(d)


@pytest.fixture(scope="module")
def wan(tok_dir):
    from daamkit.testing.families.wan import tiny_wan

    return tiny_wan(tok_dir)


def run(pipe, prompt=PROMPT, h=48, w=64, frames=9, steps=2, **kw):
    return pipe(prompt=prompt, num_frames=frames, height=h, width=w, num_inference_steps=steps, output_type="np",
                generator=torch.Generator().manual_seed(0), **kw).frames


def test_entry(wan):
    fam, _ = family_of(wan)
    assert fam.name == "wan"
    with trace(wan) as tc:
        assert [layer.name for layer in tc.layers] == ["blocks.0.attn2", "blocks.1.attn2"]
        assert {layer.block for layer in tc.layers} == {"cross"}


def test_traced_equals_untraced_and_video_maps(wan):
    tc = traced_equals_untraced(wan, lambda: run(wan, negative_prompt="blue cat"), negative=True)
    hm = tc.heat_maps(0)
    assert hm.is_video and tuple(hm.maps.shape) == (512, FRAMES, *GRID)
    assert hm.num_frames == 9 and hm.image_size == (48, 64)
    assert hm.time == TimeAxis(frames=3, patch=1, compression=4, causal=True)
    assert hm.time.index() == [0, 1, 1, 1, 1, 2, 2, 2, 2]  # causal: video frame 0 alone from latent frame 0
    assert_maps_for_every_word(hm, WORDS)
    assert hm.tokens[:10] == ("▁a", "▁red", "▁dog", "▁sitting", "▁on", "▁a", "▁wooden", "▁bench", "</s>", "<pad>")
    # padding keys are zero embeddings the model attends to unmasked: they keep probability
    assert hm.maps[9:].sum() > 0
    assert tuple(hm.word("dog").expand().shape) == (9, 48, 64)
    neg = tc.heat_maps(0, branch="negative")
    assert neg.words == ["blue", "cat"]
