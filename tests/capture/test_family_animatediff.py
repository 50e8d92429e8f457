"""AnimateDiff (``UNetMotionModel``): the SD 1.5 UNet's cross-attention runs per frame, the frames as
batch rows sample-major (row ``b * frames + f``) with the text keys repeated per frame; the motion
modules' temporal self-attention is not traced; the VAE decodes frame by frame (one token frame per
video frame)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from family_checks import (
    assert_maps_for_every_word,
    assert_peaks_in_region,
    region_mask,
    traced_equals_untraced,
)

from daamkit import trace
from daamkit.aggregate import layer_grid
from daamkit.capture.families import family_of
from daamkit.frames import TimeAxis

PROMPT = "a red dog on a bench"
WORDS = ["a", "red", "dog", "on", "bench"]
FRAMES = 5
GRID = (16, 24)  # 32x48 px: 2 px per latent cell (the tiny VAE)
LAYER_GRID = (8, 12)  # every cross-attention layer sits one downsampler below the latent grid


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    from daamkit.testing.tokenizers import clip_tokenizer

    d = tmp_path_factory.mktemp("clip_tokenizer")
    clip_tokenizer(d)
    return str(d)


@pytest.fixture(scope="module")
def animatediff(tokenizer_dir):
    from daamkit.testing.families.animatediff import tiny_animatediff

    return tiny_animatediff(tokenizer_dir)


def run(pipe, prompt=PROMPT, frames=FRAMES, steps=2, **kw):
    return pipe(prompt, num_frames=frames, num_inference_steps=steps, height=32, width=48, output_type="np",
                generator=torch.Generator().manual_seed(0), **kw).frames


def test_entry_traces_the_image_layers_only(animatediff):
    fam, denoiser = family_of(animatediff)
    assert fam.name == "unet" and type(denoiser).__name__ == "UNetMotionModel"
    with trace(animatediff) as tc:
        names = [layer.name for layer in tc.layers]
    assert names == [
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2", "down_blocks.1.attentions.1.transformer_blocks.0.attn2",
        "mid_block.attentions.0.transformer_blocks.0.attn2", "up_blocks.0.attentions.0.transformer_blocks.0.attn2",
        "up_blocks.0.attentions.1.transformer_blocks.0.attn2", "up_blocks.0.attentions.2.transformer_blocks.0.attn2",
    ]
    motion = [n for n, _ in animatediff.unet.named_modules() if "motion_modules" in n and n.endswith(("attn1", "attn2"))]
    assert motion and not set(motion) & set(names)


def test_traced_equals_untraced_and_the_video_maps(animatediff):
    tc = traced_equals_untraced(animatediff, lambda: run(animatediff, negative_prompt="blue cat"), negative=True)
    out = run(animatediff)
    assert out.shape == (1, FRAMES, 32, 48, 3)
    hm = tc.heat_maps(0)
    assert hm.is_video and tuple(hm.maps.shape) == (77, FRAMES, *GRID)
    assert hm.num_frames == out.shape[1] and hm.time == TimeAxis(FRAMES)
    assert hm.image_size == (32, 48) and hm.word("dog").expand().shape == (FRAMES, 32, 48)
    assert_maps_for_every_word(hm, WORDS)
    neg = tc.heat_maps(0, branch="negative")
    assert neg.words == ["blue", "cat"] and tuple(neg.maps.shape) == (77, FRAMES, *GRID)


class FrameHandSet:
    """Per attention row ``r`` (sample ``r // frames``, frame ``r % frames``): the queries of frames
    ``f0..f1-1`` point at the key of ``token_of(sample)`` inside ``region``, all other queries away
    from it (the other keys share their attention); the keys are that token's unit vector."""

    def __init__(self, unet, frames, token_of, region=(0.0, 0.5, 0.5, 1.0), on=(1, 3)):
        from diffusers.models.attention_processor import Attention

        self.frames, self.token_of, self.region, self.on = frames, token_of, region, on
        self.handles = []
        for m in unet.modules():
            if isinstance(m, Attention) and m.is_cross_attention:
                self.handles += [m.to_q.register_forward_hook(self._q(m)), m.to_k.register_forward_hook(self._k(m))]

    def _unit(self, m, c, like, amp):
        u = torch.zeros(c // m.heads, dtype=like.dtype)
        u[0] = amp
        return u.repeat(m.heads)

    def _q(self, m):
        def hook(mod, args, out):
            rows, n, c = out.shape
            h, w, _ = layer_grid(GRID, n)
            inside = region_mask((h, w), self.region)
            u = self._unit(m, c, out, math.sqrt(30.0 / m.scale))
            q = (-u).expand(rows, n, c).clone()
            for r in range(rows):
                if self.on[0] <= r % self.frames < self.on[1]:
                    q[r, inside] = u
            return q

        return hook

    def _k(self, m):
        def hook(mod, args, out):
            k = torch.zeros_like(out)
            for r in range(out.shape[0]):
                k[r, self.token_of(r // self.frames, out.shape[0] // self.frames)] = self._unit(m, out.shape[-1], out, 1.0)
            return k

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def test_hand_set_token_owns_a_region_in_some_frames(animatediff):
    """Rows [negative, cond] x frames: the negative sample's rows own token 1, the cond rows token 3
    ("dog"); the region is on token frames 1 and 2 of 5 only. A frame-major reading of the rows, or
    rows of the wrong sample, would put the region on other frames or on the other token."""
    hand = FrameHandSet(animatediff.unet, FRAMES, token_of=lambda s, b: 1 if s < b // 2 else 3)
    try:
        with trace(animatediff, negative=True, grid=LAYER_GRID) as tc:
            run(animatediff, negative_prompt="blue cat")
            hm, neg = tc.heat_maps(0), tc.heat_maps(0, branch="negative")
    finally:
        hand.remove()
    mask = region_mask((FRAMES, *LAYER_GRID), frames=(1, 3))
    assert hm.word("dog").positions == (3,)
    assert_peaks_in_region(hm.maps, 3, mask)
    assert_peaks_in_region(neg.maps, 1, mask)
    scores = hm.word("dog").frame_scores()
    assert scores.shape == (FRAMES,)
    assert scores[1:3].min() > 100 * max(scores[0], scores[3:].max())


@pytest.mark.parametrize("mib", [0.1, 0.5])  # 42 queries a chunk (under a frame of 96), then 2 whole frames
def test_chunked_maps_equal_the_whole_call(animatediff, mib):
    with trace(animatediff, negative=True) as tc:
        run(animatediff, negative_prompt="blue cat")
        ref = [tc.heat_maps(0), tc.heat_maps(0, branch="negative")]
    seen = []
    with trace(animatediff, negative=True, chunk_mib=mib) as tc:
        orig = tc.on_attention
        tc.on_attention = lambda layer, probs, branch, chunk=None: (seen.append(chunk), orig(layer, probs, branch, chunk))
        run(animatediff, negative_prompt="blue cat")
        got = [tc.heat_maps(0), tc.heat_maps(0, branch="negative")]
    assert all(c is not None for c in seen)
    sizes = {c.stop - c.start for c in seen}
    assert (max(sizes) < 96) if mib < 0.2 else (max(sizes) == 192)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a.maps, b.maps, rtol=1e-6, atol=1e-9)


def test_probabilities_match_a_recomputation(animatediff):
    layer = "up_blocks.0.attentions.1.transformer_blocks.0.attn2"
    m = animatediff.unet.get_submodule(layer)
    seen = {}
    handles = [
        m.to_q.register_forward_hook(lambda mod, a, out: seen.setdefault("q", out.detach())),
        m.to_k.register_forward_hook(lambda mod, a, out: seen.setdefault("k", out.detach())),
    ]
    try:
        with trace(animatediff, steps=[0], layers=[layer], grid=LAYER_GRID) as tc:
            run(animatediff, negative_prompt="blue cat")
            maps = tc.heat_maps(0).maps
    finally:
        for h in handles:
            h.remove()
    q, k = seen["q"], seen["k"]  # (2 * frames, n, C): [negative frames..., cond frames...]
    assert q.shape[0] == 2 * FRAMES
    heads = m.heads
    qh = q.unflatten(-1, (heads, -1)).transpose(1, 2)
    kh = k.unflatten(-1, (heads, -1)).transpose(1, 2)
    probs = (qh @ kh.transpose(-1, -2) * m.scale).softmax(-1).mean(1)  # (rows, n, 77)
    cond = probs[FRAMES:]  # frames of the cond sample, in frame order
    expected = cond.permute(2, 0, 1).reshape(77, FRAMES, *LAYER_GRID)
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-7)


def test_video_to_video(tokenizer_dir):
    from PIL import Image

    from daamkit.testing.families.animatediff import tiny_animatediff

    pipe = tiny_animatediff(tokenizer_dir, video_to_video=True)
    rng = np.random.default_rng(0)
    video = [Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)) for _ in range(4)]

    def call():
        return pipe(video=video, prompt=PROMPT, num_inference_steps=4, strength=0.5, height=32, width=48,
                    output_type="np", generator=torch.Generator().manual_seed(0)).frames

    tc = traced_equals_untraced(pipe, call)
    hm = tc.heat_maps(0)
    assert tc.num_steps == 2 and hm.num_frames == 4 == call().shape[1]
    assert tuple(hm.maps.shape) == (77, 4, *GRID)
    assert_maps_for_every_word(hm, WORDS)
