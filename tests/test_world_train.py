"""The shapes-world training script end to end, on a toy budget: it must save a standard diffusers
folder that StableDiffusionPipeline loads offline and that generates an image."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
def test_train_tiny_end_to_end(tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from daamkit.world.train import main

    out = tmp_path / "run"
    argv = [
        "--out",
        str(out),
        "--threads",
        "1",
        "--dataset-size",
        "24",
        "--vae-channels",
        "8,8,8",
        "--vae-steps",
        "2",
        "--vae-batch",
        "4",
        "--unet-channels",
        "16,16,16",
        "--heads",
        "2",
        "--text-width",
        "16",
        "--unet-steps",
        "3",
        "--batch",
        "4",
        "--decoder-steps",
        "2",
        "--ground-minutes",
        "1",
        "--ground-steps",
        "2",
        "--sample-steps",
        "0",
    ]
    assert main(argv) == 0
    model = out / "model"
    for sub in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (model / sub).exists()
    assert list(model.rglob("*.safetensors"))
    index = json.loads((model / "model_index.json").read_text())
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any(r["phase"] == "unet_done" for r in log)
    assert any(r["phase"] == "decoder_done" for r in log)
    assert any(r["phase"] == "ground_done" for r in log)

    pipe = StableDiffusionPipeline.from_pretrained(str(model), local_files_only=True)
    assert pipe.unet.dtype == pipe.text_encoder.dtype == pipe.vae.dtype == torch.float32
    tok = CLIPTokenizer.from_pretrained(str(model / "tokenizer"))
    assert tok("a red circle").input_ids == [49406, 320, 736, 7117, 49407]  # real CLIP ids
    pipe.set_progress_bar_config(disable=True)
    img = pipe(
        "a red circle", num_inference_steps=2, height=64, width=64, generator=torch.Generator().manual_seed(0)
    ).images[0]
    assert img.size == (64, 64)

    # a finished run refuses to start over without --resume, and --resume is a no-op once done
    assert main(argv) == 2
    assert main(argv + ["--resume"]) == 0
