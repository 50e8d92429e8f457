"""The tiny AuraFlow pipeline runs offline; its Pile-T5 tokenizer appends </s> and adds no BOS."""

import pytest
import torch

from daamkit.testing.families.auraflow import pile_t5_tokenizer, tiny_auraflow


@pytest.fixture(scope="module")
def pile_t5_dir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("pile_t5_tokenizer")
    pile_t5_tokenizer(d)
    return str(d)


def test_pile_t5_tokenizer_words_eos_and_extra_ids(pile_t5_dir):
    from transformers import LlamaTokenizerFast

    tok = LlamaTokenizerFast.from_pretrained(pile_t5_dir)
    enc = tok("a red dog on a wooden bench", padding="max_length", max_length=10)
    assert tok.convert_ids_to_tokens(enc.input_ids) == [
        "▁a", "▁red", "▁dog", "▁on", "▁a", "▁wooden", "▁bench", "</s>", "<unk>", "<unk>"
    ]
    assert enc.attention_mask == [1] * 8 + [0] * 2
    assert tok.convert_ids_to_tokens([len(tok) - 1]) == ["<extra_id_0>"]


def test_tiny_auraflow_generates(pile_t5_dir):
    pipe = tiny_auraflow(pile_t5_dir)
    out = pipe(
        "a red dog on a bench", negative_prompt="blue", num_inference_steps=2, height=32, width=48,
        generator=torch.Generator().manual_seed(0), output_type="np",
    )
    assert out.images.shape == (1, 32, 48, 3)
