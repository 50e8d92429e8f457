"""The tiny LTX-Video pipelines run 2 steps and return 1 + 8 (latent frames - 1) frames of the requested size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image


@pytest.fixture(scope="module")
def components(t5_tokenizer_dir):
    from daamkit.testing.families.ltx import tiny_ltx_components

    return tiny_ltx_components(t5_tokenizer_dir)


def _image():
    return Image.fromarray((np.random.RandomState(0).rand(32, 64, 3) * 255).astype("uint8"))


@pytest.mark.parametrize("kind", ["t2v", "i2v", "condition"])
def test_tiny_ltx_generates(components, kind):
    from diffusers import LTXConditionPipeline, LTXImageToVideoPipeline, LTXPipeline
    from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXVideoCondition

    cls, extra = {
        "t2v": (LTXPipeline, {}),
        "i2v": (LTXImageToVideoPipeline, {"image": _image()}),
        "condition": (LTXConditionPipeline, {"conditions": [LTXVideoCondition(image=_image(), frame_index=8)]}),
    }[kind]
    pipe = cls(**components)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_temporal_compression_ratio == 8 and pipe.vae_spatial_compression_ratio == 8
    out = pipe(prompt="a red dog on a bench", negative_prompt="blue cat", num_inference_steps=2, height=32, width=64,
               num_frames=17, output_type="np", generator=torch.Generator().manual_seed(0), **extra).frames
    assert out.shape == (1, 17, 32, 64, 3) and np.isfinite(out).all()


def test_tiny_ltx_builders(t5_tokenizer_dir):
    from diffusers import LTXConditionPipeline, LTXImageToVideoPipeline, LTXPipeline

    from daamkit.testing.families.ltx import tiny_ltx, tiny_ltx_condition, tiny_ltx_i2v

    assert isinstance(tiny_ltx(t5_tokenizer_dir), LTXPipeline)
    assert isinstance(tiny_ltx_i2v(t5_tokenizer_dir), LTXImageToVideoPipeline)
    assert isinstance(tiny_ltx_condition(t5_tokenizer_dir), LTXConditionPipeline)
