"""The tiny Qwen-Image pipelines run offline, and their tokenizer makes the pipelines drop exactly the
system part of Qwen-Image's prompt templates."""

import numpy as np
import pytest
import torch
from PIL import Image

from daamkit.testing.families.qwenimage import (
    QWENIMAGE_DROP,
    QWENIMAGE_EDIT_DROP,
    QWENIMAGE_EDIT_PROMPT_TEMPLATE,
    QWENIMAGE_PROMPT_TEMPLATE,
    qwen2_5_vl_processor,
    qwen2_5_vl_tokenizer,
    tiny_qwenimage,
    tiny_qwenimage_edit,
)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen2_5_vl_tokenizer")
    qwen2_5_vl_tokenizer(d)
    return d


def test_tokenizer_keeps_words_whole_and_has_qwen_special_tokens(tok_dir):
    from transformers import Qwen2Tokenizer

    tok = Qwen2Tokenizer.from_pretrained(str(tok_dir))
    enc = tok("A photo of a hippopotamus on a wooden bench", return_offsets_mapping=True)
    assert enc.tokens() == ["A", "Ġphoto", "Ġof", "Ġa", "Ġhippopotamus", "Ġon", "Ġa", "Ġwooden", "Ġbench"]
    assert enc["offset_mapping"][4] == (12, 25)
    assert tok.convert_tokens_to_ids("<|im_end|>") == tok.convert_tokens_to_ids("<|im_start|>") + 1
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    text = tok.apply_chat_template(
        [{"role": "user", "content": "a dog"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>user\na dog<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize(
    ("template", "drop", "first_kept"),
    [
        (QWENIMAGE_PROMPT_TEMPLATE, QWENIMAGE_DROP, "red"),
        (QWENIMAGE_EDIT_PROMPT_TEMPLATE, QWENIMAGE_EDIT_DROP, "<|vision_start|>"),
    ],
)
def test_template_drop_is_the_system_part(tok_dir, template, drop, first_kept):
    from transformers import Qwen2Tokenizer

    tok = Qwen2Tokenizer.from_pretrained(str(tok_dir))
    tokens = tok.convert_ids_to_tokens(tok(template.format("red dog"))["input_ids"])
    assert tokens[drop - 3 : drop] == ["<|im_start|>", "user", "Ċ"]
    assert tokens[drop] == first_kept
    assert tokens[-5:] == ["<|im_end|>", "Ċ", "<|im_start|>", "assistant", "Ċ"]


def test_qwenimage_two_steps(tok_dir):
    pipe = tiny_qwenimage(tok_dir)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        ["a red dog on a bench", "a cat"],
        negative_prompt=["blue", "a green tree"],
        true_cfg_scale=4.0,
        height=32,
        width=32,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    assert out.images.shape == (2, 32, 32, 3)
    assert np.isfinite(out.images).all()


def test_processor_expands_image_pad(tok_dir):
    # the edit pipeline hands the processor its reference resized to ~1 MP; max_pixels brings it to 112x112
    proc = qwen2_5_vl_processor(tok_dir)
    out = proc(
        text=["<|vision_start|><|image_pad|><|vision_end|>a dog"], images=[Image.new("RGB", (1024, 1024))]
    )
    pads = out["input_ids"][0].count(proc.tokenizer.convert_tokens_to_ids("<|image_pad|>"))
    assert pads == 16 and out["image_grid_thw"].tolist() == [[1, 8, 8]]


@pytest.mark.slow
def test_qwenimage_edit_two_steps(tok_dir):
    # the pipeline VAE-encodes the reference at ~1 MP whatever its size: the slow part of this test
    pipe = tiny_qwenimage_edit(tok_dir)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        image=Image.new("RGB", (64, 64), (200, 30, 30)),
        prompt="a blue dog",
        height=32,
        width=32,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    assert out.images.shape == (1, 32, 32, 3)
    assert np.isfinite(out.images).all()
