"""The tiny Sana pipeline runs its own prompt encoding (complex human instruction, Gemma tokenizer) end to end."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory) -> str:
    from daamkit.testing.families.sana import gemma_tokenizer

    d = tmp_path_factory.mktemp("gemma_tokenizer")
    gemma_tokenizer(d)
    return str(d)


def test_gemma_tokenizer_has_gemma_special_ids_and_word_pieces(gemma_dir):
    from transformers import GemmaTokenizer

    tok = GemmaTokenizer.from_pretrained(gemma_dir)
    ids = tok.convert_tokens_to_ids(["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"])
    assert ids == [0, 1, 2, 3, 4, 106, 107]
    enc = tok("a red dog on a bench", return_offsets_mapping=True)
    assert tok.convert_ids_to_tokens(enc.input_ids) == ["<bos>", "a", "▁red", "▁dog", "▁on", "▁a", "▁bench"]
    assert enc.offset_mapping[3] == (5, 9)
    chat = tok.apply_chat_template([{"role": "user", "content": "a dog"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<bos><start_of_turn>user\na dog<end_of_turn>\n<start_of_turn>model\n"


@pytest.mark.parametrize("qk_norm", [None, "rms_norm_across_heads"])
def test_tiny_sana_generates(gemma_dir, qk_norm):
    from daamkit.testing.families.sana import tiny_sana

    pipe = tiny_sana(gemma_dir, qk_norm=qk_norm)
    out = pipe(
        "a red dog sitting on a wooden bench", negative_prompt="blue cat", num_inference_steps=2, height=32, width=32,
        use_resolution_binning=False, output_type="np", generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (1, 32, 32, 3)


def test_tiny_sana_keeps_bos_and_the_prompt_after_the_instruction(gemma_dir):
    """With the default complex human instruction, the 300 text tokens are <bos>, the prompt, then padding."""
    from daamkit.testing.families.sana import sana_complex_human_instruction, tiny_sana

    pipe = tiny_sana(gemma_dir)
    seen = []
    pipe.text_encoder.register_forward_pre_hook(lambda m, a, k: seen.append(a[0]), with_kwargs=True)
    emb, mask, _, _ = pipe.encode_prompt(
        "A Red dog", do_classifier_free_guidance=False, device="cpu",
        complex_human_instruction=sana_complex_human_instruction(),
    )
    assert emb.shape[1] == 300 and mask.sum().item() == 4
    kept = seen[0][0, [0, *range(-299, 0)]]
    assert pipe.tokenizer.convert_ids_to_tokens(kept[:5].tolist()) == ["<bos>", "▁a", "▁red", "▁dog", "<pad>"]
