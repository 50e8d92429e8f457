"""The tiny HunyuanVideo 1.5 pipelines run offline; the Qwen tokenizer gives the chat template's real
system-turn length (108 ids, ``prompt_template_encode_start_idx``)."""

import numpy as np
import pytest
import torch

from daamkit.testing.families.hunyuanvideo15 import (
    hunyuan_qwen_tokenizer,
    hunyuan_video15_template,
    tiny_hunyuan_video15,
    tiny_hunyuan_video15_i2v,
)


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("hunyuan_qwen")
    hunyuan_qwen_tokenizer(d)
    return str(d)


def test_chat_template_system_turn_is_108_ids(qwen_dir):
    from transformers import Qwen2Tokenizer

    tok = Qwen2Tokenizer.from_pretrained(qwen_dir)
    template = hunyuan_video15_template()
    system = template.split("\n", 1)[1].split("<|im_end|>")[0]
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "a red dog"}]
    assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == template.format("a red dog")
    ids = tok(template.format("a red dog")).input_ids
    assert len(tok(template.split("{}")[0]).input_ids) == 108
    assert tok.convert_ids_to_tokens(ids[108:111]) == ["a", "Ġred", "Ġdog"]


def test_tiny_hunyuan_video15_generates(qwen_dir):
    pipe = tiny_hunyuan_video15(qwen_dir)
    out = pipe('a "red" dog', negative_prompt="blue cat", num_inference_steps=2, height=64, width=96, num_frames=9,
               generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.frames.shape == (1, 9, 64, 96, 3)


def test_tiny_hunyuan_video15_i2v_generates(qwen_dir):
    from PIL import Image

    pipe = tiny_hunyuan_video15_i2v(qwen_dir)
    image = Image.fromarray((np.random.RandomState(0).rand(64, 96, 3) * 255).astype("uint8"))
    out = pipe(image=image, prompt="a red dog", num_inference_steps=2, num_frames=5,
               generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.frames.shape == (1, 5, 48, 64, 3)  # sized from the image and target_size 64
