"""The tiny Sana-Video pipelines run their own prompt encoding (Sana-Video's complex human instruction,
Gemma tokenizer) and return 1 + 4 (n - 1) frames for n latent frames."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory) -> str:
    from daamkit.testing.families.sana_video import sana_video_tokenizer

    d = tmp_path_factory.mktemp("gemma_tokenizer")
    sana_video_tokenizer(d)
    return str(d)


def test_tokenizer_has_gemma_ids_and_the_instruction_words(gemma_dir):
    from transformers import GemmaTokenizer

    from daamkit.testing.families.sana_video import sana_video_complex_human_instruction

    tok = GemmaTokenizer.from_pretrained(gemma_dir)
    assert tok.convert_tokens_to_ids(["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]) == [0, 1, 2, 106, 107]
    pieces = tok.tokenize("\n".join(sana_video_complex_human_instruction()))
    assert {"▁user", "▁prompt", "▁generate", "▁detailed"} <= set(pieces)


@pytest.mark.parametrize("image_to_video", [False, True])
def test_tiny_sana_video_generates(gemma_dir, image_to_video):
    from daamkit.testing.families.sana_video import tiny_sana_video

    pipe = tiny_sana_video(gemma_dir, image_to_video=image_to_video)
    kw = {"image": torch.rand(1, 3, 32, 64)} if image_to_video else {}
    out = pipe(
        prompt="a red dog sitting on a wooden bench", negative_prompt="blue cat", num_inference_steps=2, height=32,
        width=64, frames=5, use_resolution_binning=False, output_type="np", generator=torch.Generator().manual_seed(0),
        **kw,
    )
    assert out.frames.shape == (1, 5, 32, 64, 3)
