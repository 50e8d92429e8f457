"""The tiny CogView4 pipeline runs offline; its GLM-4 tokenizer keeps the real prefix and padding."""

import pytest
import torch

from daamkit.testing.families.cogview4 import glm4_tokenizer, tiny_cogview4


@pytest.fixture(scope="module")
def glm4_dir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("glm4_tokenizer")
    glm4_tokenizer(d)
    return str(d)


def test_glm4_tokenizer_prefix_words_and_left_padding(glm4_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(glm4_dir)
    enc = tok(["a dog", "a red dog on a wooden bench"], padding="longest", return_offsets_mapping=True)
    assert tok.convert_ids_to_tokens(enc.input_ids[1]) == [
        "[gMASK]", "<sop>", "a", "Ġred", "Ġdog", "Ġon", "Ġa", "Ġwooden", "Ġbench"
    ]
    assert enc.input_ids[0][:5] == [tok.pad_token_id] * 5 and tok.pad_token == "<|endoftext|>"
    assert enc.offset_mapping[1][4] == (5, 9)


def test_tiny_cogview4_generates(glm4_dir):
    pipe = tiny_cogview4(glm4_dir)
    out = pipe(
        "a red dog on a bench", negative_prompt="blue", num_inference_steps=2, height=32, width=48,
        generator=torch.Generator().manual_seed(0), output_type="np",
    )
    assert out.images.shape == (1, 32, 48, 3)
