"""The tiny Chroma pipeline runs offline with true CFG and its text attention mask."""

import pytest
import torch

from daamkit.testing.families import chroma
from daamkit.testing.tokenizers import t5_tokenizer

PROMPT = "a red dog sitting on a wooden bench"


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("chroma_t5")
    t5_tokenizer(d)
    return str(d)


def test_tiny_chroma_runs_with_cfg_and_mask(t5_dir):
    pipe = chroma.tiny_chroma(t5_dir)
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, kw: calls.append(kw), with_kwargs=True)
    image = pipe(
        PROMPT, negative_prompt="blue car", height=32, width=48, num_inference_steps=2, max_sequence_length=32,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (48, 32)
    assert len(calls) == 4  # cond, uncond per step
    mask = calls[0]["attention_mask"]
    n_image = 16 * 24
    assert mask.shape == (1, 32 + n_image)
    # the prompt's 8 tokens, </s> and the one unmasked pad, then the image
    assert int(mask[0, :32].sum()) == 10 and bool((mask[0, 32:] == 1).all())
