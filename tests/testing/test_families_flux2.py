"""The tiny FLUX.2 pipelines (dev and klein) run offline, with tokenizers that behave like the real ones."""

import pytest
import torch

from daamkit.testing.families import flux2

PROMPT = "a red dog sitting on a wooden bench"


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("flux2_tokenizers")
    flux2.mistral3_tokenizer(root / "mistral")
    flux2.qwen3_tokenizer(root / "qwen3")
    return str(root / "mistral"), str(root / "qwen3")


def test_mistral_tokenizer_real_specials_chat_template_left_padding(tokenizer_dirs):
    from diffusers.pipelines.flux2.pipeline_flux2 import format_input
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dirs[0])
    assert [tok.convert_tokens_to_ids(t) for t in ("<s>", "[INST]", "[/INST]", "[IMG]", "<pad>", "[SYSTEM_PROMPT]")] == [
        1, 3, 4, 10, 11, 17,
    ]
    enc = tok.apply_chat_template(
        format_input([PROMPT]), tokenize=True, return_dict=True, padding="max_length", truncation=True, max_length=96,
    )
    tokens = tok.convert_ids_to_tokens(enc["input_ids"][0])
    assert tokens[0] == "<pad>" and tokens[-1] == "[/INST]"  # left padding: the prompt ends the sequence
    start = tokens.index("[INST]") + 1
    assert [t.lstrip("Ġ") for t in tokens[start:-1]] == PROMPT.split()
    assert tokens[tokens.index("<s>") + 1] == "[SYSTEM_PROMPT]"


def test_qwen3_tokenizer_chat_template_right_padding_offsets(tokenizer_dirs):
    from transformers import Qwen2TokenizerFast

    tok = Qwen2TokenizerFast.from_pretrained(tokenizer_dirs[1])
    text = tok.apply_chat_template(
        [{"role": "user", "content": PROMPT}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert text == f"<|im_start|>user\n{PROMPT}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    enc = tok(text, padding="max_length", max_length=40, return_offsets_mapping=True)
    tokens = tok.convert_ids_to_tokens(enc["input_ids"])
    assert tokens[:3] == ["<|im_start|>", "user", "Ċ"] and tokens[-1] == "<|endoftext|>"
    assert [text[a:b].strip() for a, b in enc["offset_mapping"][3:11]] == PROMPT.split()
    ids = [tok.convert_tokens_to_ids(t) for t in flux2.QWEN3_SPECIAL_TOKENS + flux2.QWEN3_PLAIN_ADDED_TOKENS]
    assert ids == list(range(ids[0], ids[0] + len(ids)))  # the real order
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_tiny_flux2_runs(tokenizer_dirs):
    pipe = flux2.tiny_flux2(tokenizer_dirs[0])
    image = pipe(
        prompt=PROMPT, height=32, width=48, num_inference_steps=2, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert image.size == (48, 32)


def test_tiny_flux2_klein_runs_with_cfg(tokenizer_dirs):
    pipe = flux2.tiny_flux2_klein(tokenizer_dirs[1])
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, kw: calls.append(kw["timestep"]), with_kwargs=True)
    image = pipe(
        prompt=PROMPT, height=32, width=32, num_inference_steps=2, guidance_scale=4.0,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (32, 32)
    assert len(calls) == 4  # cond and uncond per step


def test_tiny_flux2_with_reference_image_adds_tokens(tokenizer_dirs):
    import PIL.Image

    pipe = flux2.tiny_flux2(tokenizer_dirs[0])
    lengths = []
    pipe.transformer.register_forward_pre_hook(
        lambda m, a, kw: lengths.append(kw["hidden_states"].shape[1]), with_kwargs=True
    )
    ref = PIL.Image.new("RGB", (64, 64), (200, 30, 30))
    image = pipe(
        prompt=PROMPT, image=ref, height=32, width=32, num_inference_steps=1, max_sequence_length=128,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (32, 32)
    assert lengths == [16 * 16 + 32 * 32]  # generated grid + reference grid (2 px per token)
