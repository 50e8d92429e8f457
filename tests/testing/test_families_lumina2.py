"""The tiny Lumina2 pipeline runs offline; its Gemma tokenizer splits the system prompt into words."""

import pytest
import torch

from daamkit.testing.families.lumina2 import LUMINA2_PROMPT_PREFIX, gemma_tokenizer, tiny_lumina2


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("gemma_tokenizer")
    gemma_tokenizer(d)
    return str(d)


def test_gemma_tokenizer_bos_words_and_specials(gemma_dir):
    from transformers import GemmaTokenizerFast

    tok = GemmaTokenizerFast.from_pretrained(gemma_dir)
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    tokens = tok.convert_ids_to_tokens(tok(LUMINA2_PROMPT_PREFIX + "a red dog").input_ids)
    assert tokens[0] == "<bos>" and tokens[-3:] == ["▁a", "▁red", "▁dog"] and len(tokens) == 34
    assert tok.convert_ids_to_tokens(tok("<start_of_turn>user").input_ids)[1] == "<start_of_turn>"


def test_tiny_lumina2_generates(gemma_dir):
    pipe = tiny_lumina2(gemma_dir)
    out = pipe(
        ["a red dog", "a yellow bird on a wooden bench"], num_inference_steps=2, height=64, width=96,
        generator=torch.Generator().manual_seed(0), output_type="np",
    )
    assert out.images.shape == (2, 64, 96, 3)
