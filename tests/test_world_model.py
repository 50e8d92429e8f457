"""The shipped shapes-world model: present, small, loads offline through StableDiffusionPipeline."""

from __future__ import annotations

import json

import pytest

from daamkit.world import ModelNotFoundError, default_model_path


def _model_or_skip():
    try:
        return default_model_path()
    except ModelNotFoundError as e:  # pragma: no cover - a checkout without the weights
        pytest.skip(str(e))


def test_default_model_path_error_is_clear(tmp_path, monkeypatch):
    import daamkit.world as world

    monkeypatch.setattr(world, "__file__", str(tmp_path / "__init__.py"))
    with pytest.raises(ModelNotFoundError, match="daamkit world train"):
        world.default_model_path()


def test_shipped_model_layout_and_size():
    path = _model_or_skip()
    index = json.loads((path / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["requires_safety_checker"] is False
    weights = list(path.rglob("*.safetensors"))
    assert {w.parent.name for w in weights} == {"unet", "vae", "text_encoder"}
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    assert total < 30e6


def test_shipped_model_loads_and_generates():
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    path = _model_or_skip()
    tok = CLIPTokenizer.from_pretrained(str(path / "tokenizer"))
    assert tok("a red circle").input_ids == [49406, 320, 736, 7117, 49407]
    pipe = StableDiffusionPipeline.from_pretrained(str(path), local_files_only=True)
    assert pipe.unet.dtype == pipe.vae.dtype == pipe.text_encoder.dtype == torch.float32
    pipe.set_progress_bar_config(disable=True)
    img = pipe(
        "a red circle",
        num_inference_steps=8,
        guidance_scale=5.0,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    arr = np.asarray(img)
    assert arr.shape == (64, 64, 3) and arr.std() > 5  # not a blank image
