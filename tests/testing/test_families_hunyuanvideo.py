"""The tiny HunyuanVideo pipeline runs offline; its Llama 3 tokenizer gives the default template's real
``crop_start`` (95 ids before the prompt)."""

import pytest
import torch

from daamkit.testing.families.hunyuanvideo import (
    hunyuan_llama_tokenizer,
    hunyuan_video_template,
    tiny_hunyuan_video,
)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("hunyuan_llama")
    hunyuan_llama_tokenizer(d)
    return str(d)


def test_template_prefix_is_crop_start_long(llama_dir):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(llama_dir)
    prefix = hunyuan_video_template().split("{}")[0]
    ids = tok(hunyuan_video_template().format("a red dog")).input_ids
    assert len(tok(prefix).input_ids) == 95
    assert tok.convert_ids_to_tokens(ids[95:]) == ["a", "Ġred", "Ġdog", "<|eot_id|>"]
    assert tok.pad_token == "<pad>" and tok.eos_token == "<|eot_id|>"


def test_tiny_hunyuan_video_generates(llama_dir, clip_tokenizer_dir):
    pipe = tiny_hunyuan_video(llama_dir, clip_tokenizer_dir)
    out = pipe("a red dog", negative_prompt="blue cat", true_cfg_scale=2.0, num_inference_steps=2, height=48,
               width=64, num_frames=9, generator=torch.Generator().manual_seed(0), output_type="np")
    assert out.frames.shape == (1, 9, 48, 64, 3)
