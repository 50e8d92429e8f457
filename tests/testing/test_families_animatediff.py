"""The tiny AnimateDiff pipelines generate videos of the requested frame count and size."""

from __future__ import annotations

import numpy as np
import pytest
import torch


@pytest.mark.parametrize("video_to_video", [False, True])
def test_tiny_animatediff_generates(clip_tokenizer_dir, video_to_video):
    from PIL import Image

    from daamkit.testing.families.animatediff import tiny_animatediff

    pipe = tiny_animatediff(clip_tokenizer_dir, video_to_video=video_to_video)
    assert type(pipe.unet).__name__ == "UNetMotionModel"
    kw = dict(num_inference_steps=2, height=32, width=48, output_type="np", generator=torch.Generator().manual_seed(0))
    if video_to_video:
        rng = np.random.default_rng(0)
        video = [Image.fromarray(rng.integers(0, 255, (32, 48, 3), dtype=np.uint8)) for _ in range(6)]
        out = pipe(video=video, prompt="a red dog", strength=1.0, **kw)
    else:
        out = pipe("a red dog", negative_prompt="blue cat", num_frames=6, **kw)
    assert out.frames.shape == (1, 6, 32, 48, 3)
