"""The tiny Z-Image pipeline runs offline with a Qwen3 tokenizer whose chat template gives Z-Image's prompt."""

import numpy as np
import pytest
import torch

from daamkit.testing.families.zimage import ZIMAGE_PROMPT_TEMPLATE, qwen3_tokenizer, tiny_zimage


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen3_tokenizer")
    qwen3_tokenizer(d)
    return d


def test_chat_template_and_tokens(tok_dir):
    from transformers import Qwen2Tokenizer

    tok = Qwen2Tokenizer.from_pretrained(str(tok_dir))
    messages = [{"role": "user", "content": "a red dog"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    assert text == ZIMAGE_PROMPT_TEMPLATE.format("a red dog")
    no_think = tok.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert no_think.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tok.convert_ids_to_tokens(tok(text)["input_ids"]) == [
        "<|im_start|>",
        "user",
        "Ċ",
        "a",
        "Ġred",
        "Ġdog",
        "<|im_end|>",
        "Ċ",
        "<|im_start|>",
        "assistant",
        "Ċ",
    ]
    assert tok.convert_tokens_to_ids("</think>") == len(tok) - 1


def test_zimage_two_steps(tok_dir):
    pipe = tiny_zimage(tok_dir)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        ["a red dog on a wooden bench", "a cat"],
        negative_prompt=["blue", ""],
        guidance_scale=4.0,
        height=32,
        width=32,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    assert out.images.shape == (2, 32, 32, 3)
    assert np.isfinite(out.images).all()
