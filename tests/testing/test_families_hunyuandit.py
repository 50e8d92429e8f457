"""The tiny HunyuanDiT pipeline runs its own BERT + mT5 prompt encoding end to end."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory) -> tuple[str, str]:
    from daamkit.testing.families.hunyuandit import bert_tokenizer, mt5_tokenizer

    bert, mt5 = tmp_path_factory.mktemp("bert_tokenizer"), tmp_path_factory.mktemp("mt5_tokenizer")
    bert_tokenizer(bert)
    mt5_tokenizer(mt5)
    return str(bert), str(mt5)


def test_bert_tokenizer_has_bert_special_ids_and_whole_words(tokenizer_dirs):
    from transformers import BertTokenizer

    tok = BertTokenizer.from_pretrained(tokenizer_dirs[0])
    assert tok.convert_tokens_to_ids(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]) == [0, 100, 101, 102, 103]
    enc = tok("A Red dog on a bench", return_offsets_mapping=True)
    assert tok.convert_ids_to_tokens(enc.input_ids) == ["[CLS]", "a", "red", "dog", "on", "a", "bench", "[SEP]"]
    assert enc.offset_mapping[3] == (6, 9)


def test_tiny_hunyuandit_generates_with_both_text_encoders_in_the_keys(tokenizer_dirs):
    from daamkit.testing.families.hunyuandit import tiny_hunyuandit

    pipe = tiny_hunyuandit(*tokenizer_dirs)
    keys = []
    pipe.transformer.blocks[0].attn2.register_forward_pre_hook(
        lambda m, a, k: keys.append(k["encoder_hidden_states"].shape), with_kwargs=True
    )
    out = pipe(
        "A red dog sitting on a wooden bench", negative_prompt="blue cat", num_inference_steps=2, height=64, width=96,
        use_resolution_binning=False, output_type="np", generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (1, 64, 96, 3)
    assert keys[0] == (2, 77 + 256, 32)  # [BERT 77 | mT5 256], CFG batch [negative, positive]
