"""The time axis of video maps: TimeAxis, chunked streaming aggregation with frames, video heat maps."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_heatmap import PIECES, make_alignment

from daamkit.aggregate import CPU_BLOCK_MIB, Accumulator, AggregationConfig, chunk_size
from daamkit.capture.base import LayerInfo, QueryChunk
from daamkit.frames import TimeAxis
from daamkit.heatmap import GlobalHeatMap, WordHeatMap

axes = st.builds(
    lambda frames, patch, skip, compression, causal: TimeAxis(frames, patch, skip % (frames * patch), compression, causal),
    st.integers(1, 12), st.integers(1, 3), st.integers(0, 5), st.integers(1, 8), st.booleans(),
)


# ---- TimeAxis ---------------------------------------------------------------------------------------
def test_causal_vae_time_axis_of_wan():
    # Wan: 81 frames -> 21 latent frames; frame 0 alone, then 4 frames per latent frame
    t = TimeAxis(frames=21, compression=4, causal=True)
    assert t.num_frames == 81
    assert [t.token_frame(i) for i in (0, 1, 4, 5, 8, 80)] == [0, 1, 1, 2, 2, 20]


def test_temporal_patch_and_padding_of_cogvideox_15():
    # 13 latent frames padded by one at the start to 14, two latent frames per token frame: 7 planes
    t = TimeAxis(frames=7, patch=2, skip=1, compression=4, causal=True)
    assert t.latent_frames == 13 and t.num_frames == 49
    assert t.token_frame(0) == 0  # latent 0 is padded latent 1: token frame 0
    assert t.token_frame(1) == 1  # latent 1 -> padded 2
    assert t.token_frame(48) == 6


@settings(max_examples=200, deadline=None)
@given(axes)
def test_time_axis_maps_every_frame_in_order(t: TimeAxis):
    index = t.index()
    assert len(index) == t.num_frames
    assert index[0] == t.skip // t.patch and index[-1] == t.frames - 1
    assert all(a <= b <= a + 1 for a, b in zip(index, index[1:], strict=False))  # in order, no plane skipped
    assert TimeAxis.from_json(t.to_json()) == t


@pytest.mark.parametrize("bad", [
    {"frames": 0}, {"frames": 2, "patch": 0}, {"frames": 2, "skip": 2}, {"frames": 2, "fps": 8}, [1, 2],
    {"frames": "two"}, {"frames": 2, "output": 0},
])
def test_time_axis_json_refuses_bad_input(bad):
    with pytest.raises(ValueError):
        TimeAxis.from_json(bad)


def test_frame_out_of_range_says_the_range():
    with pytest.raises(IndexError, match="numbered 0..8"):
        TimeAxis(frames=3, compression=4, causal=True).token_frame(9)


# ---- chunked aggregation ----------------------------------------------------------------------------
LAYER = LayerInfo("blocks.0.attn2", "cross", 0, 3)


def _probs(b=2, heads=3, frames=3, hw=(4, 6), t=5, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, heads, frames * hw[0] * hw[1], t, generator=g).softmax(-1)


def _run(config, frames, hw, calls, size=None):
    acc = Accumulator(config, hw, num_images=2, frames=frames)
    for step, probs in calls:
        total = probs.shape[2]
        if size is None or size >= total:
            acc.add(LAYER, step, probs, "cond")
        else:
            for s in range(0, total, size):
                e = min(total, s + size)
                acc.add(LAYER, step, probs[:, :, s:e], "cond", QueryChunk(s, e, total))
    return acc


@pytest.mark.parametrize("size", [1, 5, 24, 30, 48, 71])  # sub-frame, whole frame (24), across frames
@pytest.mark.parametrize("config", [
    AggregationConfig(),
    AggregationConfig(grid=(8, 9)),  # resized frame by frame
    AggregationConfig(keep_heads=True, keep_steps=True, grid=(5, 5)),
    AggregationConfig.reference(layers=None),
])
def test_chunks_give_the_maps_of_the_whole_call(config, size):
    hw, frames = (4, 6), 3
    calls = [(0, _probs(seed=0)), (1, _probs(seed=1))]
    whole = _run(config, frames, hw, calls).result("cond")
    chunked = _run(config, frames, hw, calls, size).result("cond")
    assert whole.shape == (2, 5, frames, *(config.grid or hw))
    torch.testing.assert_close(chunked, whole, rtol=1e-6, atol=1e-7)


def test_frames_stay_apart():
    # a token attended only in frame 1 has no mass in frames 0 and 2
    hw, frames, t = (4, 6), 3, 4
    probs = torch.zeros(1, 2, frames * 24, t)
    probs[..., 0] = 1.0
    probs[:, :, 24:48, 0] = 0.0
    probs[:, :, 24:48, 2] = 1.0
    acc = Accumulator(AggregationConfig(grid=(8, 12)), hw, 1, frames=frames)
    for s in range(0, 72, 10):
        acc.add(LAYER, 0, probs[:, :, s:s + 10], "cond", QueryChunk(s, min(72, s + 10), 72))
    out = acc.result("cond")[0]
    assert out[2, 1].min() > 0.99 and out[2, [0, 2]].max() < 1e-6
    assert out[0, 1].max() < 1e-6 and out[0, [0, 2]].min() > 0.99


def test_image_results_keep_their_shape():
    acc = Accumulator(AggregationConfig(), (4, 6), 2)
    acc.add(LAYER, 0, _probs(frames=1), "cond")
    assert acc.result("cond").shape == (2, 5, 4, 6)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 300), st.integers(1, 10_000), st.floats(0.01, 64))
def test_chunk_size_fits_the_budget(total, frame, per_query, mib):
    n = chunk_size(total, frame, per_query, mib)
    assert 1 <= n <= total
    if n < total:
        assert n * per_query <= max(per_query, mib * 2**20)
        if frame * per_query <= mib * 2**20:
            assert n % frame == 0  # whole frames where one fits


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 50_000), st.integers(1, 4096), st.floats(0.01, 64))
def test_chunk_size_keeps_cpu_blocks_small(total, per_query, mib):
    on_cpu = chunk_size(total, 0, per_query, mib, "cpu")
    elsewhere = chunk_size(total, 0, per_query, mib, "meta")
    assert elsewhere == chunk_size(total, 0, per_query, mib)  # the CPU rule touches CPU blocks only
    assert on_cpu == chunk_size(total, 0, per_query, min(mib, CPU_BLOCK_MIB))
    if on_cpu < total:
        assert on_cpu * per_query <= max(per_query, CPU_BLOCK_MIB * 2**20)


def test_chunk_budget_must_be_positive():
    with pytest.raises(ValueError, match="chunk_mib"):
        AggregationConfig(chunk_mib=0)


# ---- video heat maps --------------------------------------------------------------------------------
def _video_maps() -> GlobalHeatMap:
    t = TimeAxis(frames=3, compression=4, causal=True)
    alignment = make_alignment(PIECES)
    maps = torch.zeros(16, t.frames, 4, 6)
    for f in range(t.frames):
        maps[6, f] = f + 1.0  # "dog" grows frame by frame
    maps[2, 1, :2, :3] = 5.0  # "giraffe" only in plane 1, top left
    return GlobalHeatMap(maps, alignment, (32, 48), {"time": t.to_json()})


def test_video_heat_map_frames_and_scores():
    hm = _video_maps()
    assert hm.is_video and hm.num_frames == 9 and hm.grid_size == (4, 6)
    dog = hm.word("dog")
    assert dog.value.shape == (3, 4, 6)
    assert dog.frame_scores().tolist() == [1, 2, 2, 2, 2, 3, 3, 3, 3]
    assert hm.frame(0).word("dog").value.max() == 1 and hm.frame(5).word("dog").value.max() == 3
    assert torch.allclose(hm.frames(0, 2).word("dog").value, torch.full((4, 6), 1.5))
    giraffe = hm.word("giraffe")
    scores = giraffe.frame_scores()
    assert scores[1:5].min() > 0 and scores[0] == 0 and scores[5:].max() == 0


def test_video_word_map_expands_on_the_video_frames():
    hm = _video_maps()
    e = hm.word("dog").expand()
    assert e.shape == (9, 32, 48)
    assert torch.allclose(e[0], torch.ones(32, 48)) and torch.allclose(e[8], torch.full((32, 48), 3.0))
    assert hm.word("giraffe").mask(0.5)[1:5, 2:12, 2:18].all() and not hm.word("giraffe").mask(0.5)[0].any()


def test_video_maps_refuse_image_only_operations_clearly():
    hm = _video_maps()
    with pytest.raises(ValueError, match="frame"):
        hm.expand()
    with pytest.raises(ValueError, match="frame"):
        hm.word("dog").overlay(None)
    with pytest.raises(IndexError, match="numbered 0..8"):
        hm.frame(9)
    with pytest.raises(ValueError, match="frames"):
        GlobalHeatMap(torch.zeros(16, 2, 4, 6), make_alignment(PIECES), (32, 48), {"time": {"frames": 3}})
    with pytest.raises(ValueError, match="image's"):
        WordHeatMap(torch.zeros(4, 6), "x").frame_scores()


def test_decode_reveals_padding_and_a_non_causal_first_frame():
    # CogVideoX 1.5: 4 token frames of 2 latent frames cover 8 latent frames; 7 decoded into 25 frames
    t = TimeAxis(frames=4, patch=2, compression=4, causal=True).decoded(7, 25)
    assert (t.skip, t.causal, t.num_frames) == (1, True, 25)
    # CogVideoX's VAE decodes an even count in pairs: 4 latent frames give 16 frames, none alone
    t = TimeAxis(frames=4, compression=4, causal=True).decoded(4, 16)
    assert (t.skip, t.causal, t.num_frames) == (0, False, 16)
    assert t.index() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    # counts that fit no reading leave the axis unchanged
    t0 = TimeAxis(frames=3, compression=4, causal=True)
    assert t0.decoded(9, 33) == t0
