"""HunyuanVideo (``HunyuanVideoTransformer3DModel``): dual-stream then single-stream blocks attending over
[video, Llama text], the text's padding masked; the Llama keys start where the pipeline's ``crop_start``
cut the prompt template; a causal VAE with 4x temporal compression."""

from __future__ import annotations

import pytest
import torch
from cross_checks import CrossHandSet
from family_checks import (
    assert_maps_for_every_word,
    assert_peaks_in_region,
    traced_equals_untraced,
)

from daamkit import trace
from daamkit.capture.families import family_of
from daamkit.frames import TimeAxis

PROMPT = "a red dog on a wooden bench"
WORDS = ["a", "red", "dog", "on", "wooden", "bench"]
GRID = (3, 3, 4)  # 9 frames -> 3 latent frames; 48x64 px -> 6x8 latents -> 3x4 tokens (patch 2)
TEXT = 256  # max_sequence_length
DOUBLE, SINGLE = r"transformer_blocks\.\d+\.attn", r"single_transformer_blocks\.\d+\.attn"


@pytest.fixture(scope="module")
def pipe(tmp_path_factory, clip_tokenizer_dir):
    from daamkit.testing.families.hunyuanvideo import hunyuan_llama_tokenizer, tiny_hunyuan_video

    d = tmp_path_factory.mktemp("hunyuan_llama")
    hunyuan_llama_tokenizer(d)
    return tiny_hunyuan_video(d, clip_tokenizer_dir)


def run(pipe, prompt=PROMPT, **kw):
    return pipe(prompt, num_inference_steps=2, height=48, width=64, num_frames=9,
                generator=torch.Generator().manual_seed(0), output_type="np", **kw).frames


def test_entry(pipe):
    fam, _ = family_of(pipe)
    assert fam.name == "hunyuanvideo"
    with trace(pipe) as tc:
        assert [(layer.name, layer.block) for layer in tc.layers] == [
            ("transformer_blocks.0.attn", "double"), ("single_transformer_blocks.0.attn", "single")
        ]


@pytest.fixture(scope="module")
def traced(pipe):
    """True CFG: the cond call, then the negative prompt's."""
    tc = traced_equals_untraced(pipe, lambda: run(pipe, negative_prompt="blue cat", true_cfg_scale=2.0), negative=True)
    return tc, run(pipe, negative_prompt="blue cat", true_cfg_scale=2.0)


def test_video_maps_words_and_time(traced):
    tc, frames = traced
    hm = tc.heat_maps(0)
    assert hm.is_video and tuple(hm.maps.shape) == (TEXT, *GRID)
    assert hm.num_frames == frames.shape[1] == 9 and hm.image_size == (48, 64)
    # causal VAE: video frame 0 from latent frame 0, then 4 video frames per latent frame
    assert hm.time == TimeAxis(3, compression=4, causal=True)
    assert hm.time.index() == [0, 1, 1, 1, 1, 2, 2, 2, 2]
    assert_maps_for_every_word(hm, WORDS)
    # crop_start (95) cut the whole template: the keys start with the prompt, <|eot_id|> closes it
    assert hm.tokens[:9] == ("a", "Ġred", "Ġdog", "Ġon", "Ġa", "Ġwooden", "Ġbench", "<|eot_id|>", "<pad>")
    assert [w.positions for w in hm.alignment.words] == [(i,) for i in range(7)]
    assert hm.maps[8:].abs().max() == 0  # padding is masked
    neg = tc.heat_maps(0, branch="negative")
    assert neg.words == ["blue", "cat"] and neg.word("cat").positions == (1,)


def test_another_template_and_crop_start(pipe):
    """crop_start is a call argument: the keys are the last max_sequence_length ids, whatever it is."""
    template = {"template": "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>", "crop_start": 4}
    with trace(pipe) as tc:
        run(pipe, prompt_template=template, max_sequence_length=32)
        hm = tc.heat_maps(0)
    assert hm.maps.shape[0] == 32 and hm.words == WORDS
    # 4 of the 5 template ids were cut: "\n\n" stays in the keys, no word's
    assert hm.tokens[:3] == ("ĊĊ", "a", "Ġred") and hm.word("red").positions == (2,)


def _hand(pipe, token, frames=(1, 2)):
    # queries outside the region point away from the token: a zero query would spread evenly over the
    # handful of unmasked keys
    return CrossHandSet(
        pipe.transformer, GRID, token,
        queries=[(DOUBLE, "to_q", 0), (SINGLE, "to_q", 0)],
        keys=[(DOUBLE, "add_k_proj", 0), (SINGLE, "to_k", lambda n: n - TEXT)],
        dim=6,  # the slowest rotary pair (columns): dims 0-1 turn a radian per frame
        region=(0.0, 0.5, 0.5, 1.0), frames=frames,
    )


def test_hand_set_token_owns_a_region_in_some_frames(pipe):
    token = 2  # "dog"
    hand = _hand(pipe, token)
    try:
        with trace(pipe) as tc:
            run(pipe)
            hm = tc.heat_maps(0)
    finally:
        hand.remove()
    assert hm.word("dog").positions == (token,)
    assert_peaks_in_region(hm.maps, token, hand.mask)
    scores = hm.word("dog").frame_scores()
    own = [i for i, f in enumerate(hm.time.index()) if f == 1]  # video frames 1..4
    assert own == [1, 2, 3, 4]
    assert min(scores[i] for i in own) > 5 * max(s for i, s in enumerate(scores) if i not in own)


# one query's probabilities are 4 heads x 256 keys x 4 bytes: 0.01 MiB holds 2 of a frame's 12 queries,
# 0.06 MiB one whole frame
@pytest.mark.parametrize("chunk_mib", [0.01, 0.06])
def test_chunked_delivery_gives_the_same_maps(pipe, chunk_mib):
    with trace(pipe) as tc:
        run(pipe)
        ref = tc.heat_maps(0).maps
    with trace(pipe, chunk_mib=chunk_mib) as tc:
        run(pipe)
        maps = tc.heat_maps(0).maps
    torch.testing.assert_close(maps, ref, rtol=1e-6, atol=0)


def test_probabilities_match_a_recomputation(pipe):
    from diffusers.models.embeddings import apply_rotary_emb

    layer = "transformer_blocks.0.attn"
    m = pipe.transformer.get_submodule(layer)
    seen = {}

    def pre(mod, args, kwargs):
        if "h" not in seen:
            seen.update(h=args[0] if args else kwargs["hidden_states"], kw=kwargs)

    handle = m.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        with torch.no_grad(), trace(pipe, steps=[0], layers=[layer]) as tc:
            run(pipe)
            maps = tc.heat_maps(0).maps
    finally:
        handle.remove()
    kw = seen["kw"]
    h, enc, mask = seen["h"], kw["encoder_hidden_states"], kw["attention_mask"]
    with torch.no_grad():
        q = m.norm_q(m.to_q(h).unflatten(2, (m.heads, -1)))
        q = apply_rotary_emb(q, kw["image_rotary_emb"], sequence_dim=1).transpose(1, 2)
        k = m.norm_added_k(m.add_k_proj(enc).unflatten(2, (m.heads, -1))).transpose(1, 2)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    keep = mask[:, 0, 0, -enc.shape[1]:]  # [video, text] mask: the text part
    probs = scores.masked_fill(~keep[:, None, None, :], float("-inf")).softmax(-1)
    expected = probs[0].mean(0).T.reshape(-1, *GRID)
    torch.testing.assert_close(maps, expected, rtol=1e-4, atol=1e-7)
    assert maps[8:].abs().max() == 0
