"""The tiny Kolors pipeline runs its own ChatGLM prompt encoding end to end."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def chatglm_dir(tmp_path_factory) -> str:
    from daamkit.testing.families.kolors import chatglm_tokenizer

    d = tmp_path_factory.mktemp("chatglm_tokenizer")
    chatglm_tokenizer(d)
    return str(d)


def test_chatglm_tokenizer_left_pads_after_the_glm_prefix(chatglm_dir):
    from diffusers.pipelines.kolors import ChatGLMTokenizer

    tok = ChatGLMTokenizer.from_pretrained(chatglm_dir)
    enc = tok("A red dog on a bench", padding="max_length", max_length=12, truncation=True)
    assert enc["input_ids"][:4] == [tok.pad_token_id] * 4 and enc["attention_mask"][:5] == [0, 0, 0, 0, 1]
    assert tok.convert_ids_to_tokens(enc["input_ids"][4:]) == [
        "[gMASK]", "sop", "▁A", "▁red", "▁dog", "▁on", "▁a", "▁bench",
    ]
    assert enc["position_ids"][4:6] == [0, 1]
    chat = tok.apply_chat_template([{"role": "user", "content": "a dog"}], tokenize=False, add_generation_prompt=True)
    assert chat == "[gMASK]sop<|user|>\n a dog<|assistant|>"


def test_tiny_kolors_generates(chatglm_dir):
    from daamkit.testing.families.kolors import tiny_kolors

    pipe = tiny_kolors(chatglm_dir)
    keys = []
    pipe.unet.register_forward_pre_hook(lambda m, a, k: keys.append(k["encoder_hidden_states"].shape), with_kwargs=True)
    out = pipe(
        "A red dog sitting on a wooden bench", negative_prompt="blue cat", num_inference_steps=2, height=64, width=96,
        output_type="np", generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (1, 64, 96, 3)
    assert keys[0] == (2, 256, 32)  # CFG batch [negative, positive], ChatGLM left-padded to 256
