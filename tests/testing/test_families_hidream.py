"""The tiny HiDream pipeline runs offline with its four tokenizers; the Llama 3 one prefixes <|begin_of_text|>."""

import pytest
import torch

from daamkit.testing.families.hidream import llama3_tokenizer, tiny_hidream


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("llama3_tokenizer")
    llama3_tokenizer(d)
    return str(d)


def test_llama3_tokenizer_bos_and_words(llama3_dir):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(llama3_dir)
    enc = tok("a red dog on a wooden bench", return_offsets_mapping=True)
    assert tok.convert_ids_to_tokens(enc.input_ids) == [
        "<|begin_of_text|>", "a", "Ġred", "Ġdog", "Ġon", "Ġa", "Ġwooden", "Ġbench"
    ]
    assert enc.offset_mapping[3] == (5, 9) and tok.eos_token == "<|eot_id|>" and tok.pad_token is None


@pytest.mark.parametrize(("size", "expected"), [((32, 32), (32, 32)), ((32, 48), (26, 38))])
def test_tiny_hidream_generates(clip_tokenizer_dir, clip_tokenizer_2_dir, t5_tokenizer_dir, llama3_dir, size, expected):
    pipe = tiny_hidream(clip_tokenizer_dir, clip_tokenizer_2_dir, t5_tokenizer_dir, llama3_dir)
    out = pipe(
        "a red dog on a bench", negative_prompt="blue", num_inference_steps=2, height=size[0], width=size[1],
        generator=torch.Generator().manual_seed(0), output_type="np",
    )
    # the pipeline keeps the area of default_sample_size squared and the aspect ratio
    assert out.images.shape == (1, *expected, 3)
