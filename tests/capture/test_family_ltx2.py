"""LTX-2 (``LTX2VideoTransformer3DModel``): the video stream's cross-attention ``attn2`` to the text tokens out
of Gemma-3 and the ``LTX2TextConnectors``. The connector moves the (left-padded) prompt tokens to the front in
their order and fills the rest with learnt registers, so key ``j`` is the ``j``-th non-pad token; each step's
spatio-temporal and modality guidance calls are not traced; the audio stream is not traced."""

from __future__ import annotations

import pytest
import torch
from cross_checks import CrossHandSet, CrossOracle, split_heads
from family_checks import assert_maps_for_every_word, assert_peaks_in_region, traced_equals_untraced

from daamkit import trace
from daamkit.capture.families import family_of
from daamkit.frames import TimeAxis

PROMPT = "a red dog sitting on a wooden bench"
WORDS = ["a", "red", "dog", "sitting", "on", "wooden", "bench"]
SITE = r"transformer_blocks\.\d+\.attn2"
GRID = (3, 4, 8)  # 17 frames of 32x64 px
N = 3 * 4 * 8
KEYS = 128  # max_sequence_length: a multiple of the connector's 128 registers
TIME = TimeAxis(frames=3, compression=8, causal=True)


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory) -> str:
    from daamkit.testing.families.sana import gemma_tokenizer

    d = tmp_path_factory.mktemp("gemma_tokenizer")
    gemma_tokenizer(d, extra_text=())
    return str(d)


@pytest.fixture(scope="module")
def ltx2(gemma_dir):
    from daamkit.testing.families.ltx2 import tiny_ltx2

    return tiny_ltx2(gemma_dir)


def run(pipe, prompt=PROMPT, steps=2, **kw):
    return pipe(prompt=prompt, num_inference_steps=steps, height=32, width=64, num_frames=17, max_sequence_length=KEYS,
                generator=torch.Generator().manual_seed(0), output_type="np", **kw).frames


def test_entry(ltx2):
    fam, _ = family_of(ltx2)
    assert fam.name == "ltx2"
    with trace(ltx2) as tc:
        # audio_attn2 (audio to text) and the audio-video attentions are other modules
        assert [layer.name for layer in tc.layers] == ["transformer_blocks.0.attn2", "transformer_blocks.1.attn2"]


def test_the_connector_keeps_the_prompt_tokens_in_order_at_the_front(ltx2):
    """What the word alignment relies on: connector position j < valid holds the projection of the j-th
    non-pad Gemma token, the positions after it hold registers."""
    seen = {}
    conn = ltx2.connectors.video_connector
    embeds, mask = ltx2.encode_prompt(PROMPT, do_classifier_free_guidance=False, max_sequence_length=KEYS)[:2]

    def keep(name):
        def hook(module, args):
            seen[name] = args[0]

        return hook

    hooks = [conn.register_forward_pre_hook(keep("in")), conn.transformer_blocks[0].register_forward_pre_hook(keep("block"))]
    try:
        ltx2.connectors(embeds, mask)
    finally:
        for h in hooks:
            h.remove()
    projected, block = seen["in"], seen["block"]
    valid = int(mask[0].sum())
    pad = KEYS - valid
    assert mask[0, :pad].sum() == 0  # Gemma is left-padded
    torch.testing.assert_close(block[0, :valid], projected[0, pad:])
    registers = conn.learnable_registers
    torch.testing.assert_close(block[0, valid:], registers[valid:])


def test_traced_equals_untraced_and_the_video_maps(ltx2):
    tc = traced_equals_untraced(ltx2, lambda: run(ltx2, negative_prompt="blue cat"), negative=True)
    hm = tc.heat_maps(0)
    assert hm.is_video and tuple(hm.maps.shape) == (KEYS, *GRID)
    assert hm.num_frames == run(ltx2).shape[1] == 17 and hm.image_size == (32, 64) and hm.time == TIME
    assert_maps_for_every_word(hm, WORDS)
    # keys: <bos>, the prompt, then registers (labelled as the pads they replace)
    assert hm.tokens[:9] == ("<bos>", "a", "▁red", "▁dog", "▁sitting", "▁on", "▁a", "▁wooden", "▁bench")
    assert set(hm.tokens[9:]) == {"<pad>"}
    assert hm.word("dog").positions == (3,) and hm.word("bench").positions == (8,)
    assert tc.heat_maps(0, branch="negative").words == ["blue", "cat"]
    # 2 steps although every step also calls the transformer for STG and for modality guidance
    assert tc.num_steps == 2 and tc.generation.timesteps == [1000.0, 500.0]


def test_guidance_calls_are_not_traced(ltx2):
    plain = {"stg_scale": 0.0, "modality_scale": 1.0}
    with trace(ltx2, steps=[0]) as tc:
        run(ltx2, **plain)
        ref = tc.heat_maps(0).maps
    calls = []
    handle = ltx2.transformer.register_forward_pre_hook(lambda m, a, k: calls.append(k["hidden_states"].shape[0]),
                                                        with_kwargs=True)
    try:
        with trace(ltx2, steps=[0]) as tc:
            run(ltx2)  # stg_scale 1, modality_scale 3: three transformer calls a step
            maps = tc.heat_maps(0).maps
    finally:
        handle.remove()
    assert calls == [2, 1, 1, 2, 1, 1]
    assert tc.num_steps == 2
    torch.testing.assert_close(maps, ref, rtol=0, atol=0)


def _hand(pipe, token, frames):
    return CrossHandSet(pipe.transformer, GRID, token, queries=[(SITE, "to_q", 0)], keys=[(SITE, "to_k", 0)],
                        frames=frames)


def test_hand_set_token_owns_a_region_in_some_frames(ltx2):
    token = 3  # "dog" after <bos>, "a", "red"
    hand = _hand(ltx2, token, frames=(1, 2))
    try:
        with trace(ltx2) as tc:
            run(ltx2)
            hm = tc.heat_maps(0)
    finally:
        hand.remove()
    assert hm.word("dog").positions == (token,)
    assert_peaks_in_region(hm.maps, token, hand.mask)
    scores = hm.word("dog").frame_scores()
    on = torch.tensor(TIME.index()) == 1
    assert scores[on].min() > 10 * scores[~on].max()


def test_chunks_give_the_same_maps(ltx2):
    with trace(ltx2) as tc:
        run(ltx2)
        ref = tc.heat_maps(0).maps
    for queries in (20, 40):  # 1 KiB per query (1 row, 2 heads, 128 keys): under a frame of 32, one frame
        with trace(ltx2, chunk_mib=queries * 1024 / 2**20) as tc:
            run(ltx2)
            torch.testing.assert_close(tc.heat_maps(0).maps, ref, rtol=1e-6, atol=0)


def _prepare(m, q, k, kwargs):
    # LTX2AudioVideoAttnProcessor: RMSNorm across heads; attn2 gets no rotary embedding
    return split_heads(m.norm_q(q), m.heads), split_heads(m.norm_k(k), m.heads)


def test_probabilities_match_a_recomputation(ltx2):
    layer = "transformer_blocks.1.attn2"
    oracle = CrossOracle(ltx2.transformer.get_submodule(layer), _prepare)
    try:
        with trace(ltx2, steps=[1], layers=[layer]) as tc:
            run(ltx2, negative_prompt="blue cat")
            maps = tc.heat_maps(0).maps
    finally:
        oracle.remove()
    # per step: the CFG call [negative, cond], then the STG and modality calls
    probs = oracle.calls[3]
    assert probs.shape[0] == 2 and len(oracle.calls) == 6
    f, h, w = GRID
    torch.testing.assert_close(maps, probs[1].mean(0)[:N].T.reshape(-1, f, h, w), rtol=1e-4, atol=1e-7)


def test_image_to_video(gemma_dir):
    import numpy as np
    from PIL import Image

    from daamkit.testing.families.ltx2 import tiny_ltx2_i2v

    pipe = tiny_ltx2_i2v(gemma_dir)  # image_crf=0: no H.264 re-compression of the image (needs PyAV)
    image = Image.fromarray((np.random.RandomState(0).rand(32, 64, 3) * 255).astype("uint8"))
    seen = []
    handle = pipe.transformer.register_forward_pre_hook(lambda m, a, k: seen.append(k["timestep"]), with_kwargs=True)
    try:
        tc = traced_equals_untraced(pipe, lambda: run(pipe, image=image, image_crf=0))
    finally:
        handle.remove()
    # per-token timesteps: the image's first latent frame stays at 0; the step's timestep is the video's
    assert seen[0].shape == (2, N) and seen[0][:, : N // 3].abs().max() == 0
    assert tc.num_steps == 2 and tc.generation.timesteps == [1000.0, 500.0]
    hm = tc.heat_maps(0)
    assert tuple(hm.maps.shape) == (KEYS, *GRID) and hm.time == TIME and hm.num_frames == 17
    assert_maps_for_every_word(hm, WORDS)
    hand = _hand(pipe, 3, frames=(2, 3))
    try:
        with trace(pipe) as tc:
            run(pipe, image=image, image_crf=0)
            hm = tc.heat_maps(0)
    finally:
        hand.remove()
    assert_peaks_in_region(hm.maps, 3, hand.mask)
