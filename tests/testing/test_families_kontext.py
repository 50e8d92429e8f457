"""The tiny Flux Kontext pipeline runs offline; a reference image adds its tokens after the generated ones."""

import PIL.Image
import pytest
import torch

from daamkit.testing.families import kontext
from daamkit.testing.tokenizers import clip_tokenizer, t5_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("kontext_tokenizers")
    clip_tokenizer(root / "clip")
    t5_tokenizer(root / "t5")
    return str(root / "clip"), str(root / "t5")


def test_tiny_flux_kontext_reference_tokens_follow_the_grid(tokenizer_dirs):
    pipe = kontext.tiny_flux_kontext(*tokenizer_dirs)
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["img_ids"]), with_kwargs=True)
    ref = PIL.Image.new("RGB", (48, 32), (200, 30, 30))
    image = pipe(
        image=ref, prompt="a red dog sitting on a wooden bench", height=32, width=32, max_area=32 * 32,
        _auto_resize=False, num_inference_steps=2, max_sequence_length=32, generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (32, 32)
    ids = seen[0]
    assert ids.shape[0] == 16 * 16 + 16 * 24  # output grid, then the reference grid (2 px per token)
    assert bool((ids[:256, 0] == 0).all()) and bool((ids[256:, 0] == 1).all())


def test_tiny_flux_kontext_runs_without_image(tokenizer_dirs):
    pipe = kontext.tiny_flux_kontext(*tokenizer_dirs)
    image = pipe(
        prompt="a blue bird", height=32, width=32, max_area=32 * 32, num_inference_steps=2, max_sequence_length=32,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (32, 32)
