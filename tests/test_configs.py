"""The SD 1.5 configs in daamkit/configs build the real architecture (parameter counts on the meta device)."""

import json

import pytest
import torch

from daamkit import configs

# Parameter counts of runwayml/stable-diffusion-v1-5 (safetensors of the released weights).
SD15_PARAMS = {"unet": 859_520_964, "text_encoder": 123_060_480, "vae": 83_653_863}


def test_sd15_is_listed():
    assert "sd15" in configs.available()
    assert configs.components("sd15") == {
        "scheduler": ("diffusers", "PNDMScheduler"),
        "text_encoder": ("transformers", "CLIPTextModel"),
        "tokenizer": ("transformers", "CLIPTokenizer"),
        "unet": ("diffusers", "UNet2DConditionModel"),
        "vae": ("diffusers", "AutoencoderKL"),
    }


def test_sd15_parameter_counts():
    assert configs.parameter_counts("sd15") == SD15_PARAMS


def test_sd15_key_settings():
    unet = configs.load_config("sd15", "unet")
    assert unet["block_out_channels"] == [320, 640, 1280, 1280]
    assert (unet["in_channels"], unet["cross_attention_dim"], unet["attention_head_dim"]) == (4, 768, 8)
    assert unet["sample_size"] == 64
    vae = configs.load_config("sd15", "vae")
    assert (vae["latent_channels"], vae["scaling_factor"], vae["sample_size"]) == (4, 0.18215, 512)
    te = configs.load_config("sd15", "text_encoder")
    assert (te["hidden_size"], te["num_hidden_layers"], te["num_attention_heads"]) == (768, 12, 12)
    assert (te["max_position_embeddings"], te["vocab_size"], te["hidden_act"]) == (77, 49408, "quick_gelu")
    sched = configs.load_config("sd15", "scheduler")
    assert sched["_class_name"] == "PNDMScheduler" and sched["beta_schedule"] == "scaled_linear"


def test_sd15_unet_cross_attention_layout():
    unet = configs.build_model("sd15", "unet", device="meta")
    attn2 = [m for n, m in unet.named_modules() if n.endswith("attn2")]
    assert len(attn2) == 16  # 6 down, 1 mid, 9 up: DAAM's layers
    assert {m.heads for m in attn2} == {8}
    assert {m.to_k.in_features for m in attn2} == {768}


def test_unknown_config_lists_available():
    with pytest.raises(ValueError, match="sd15"):
        configs.config_dir("nope")


def _find(model, suffix):
    # transformers 5 flattened CLIPTextModel (no `text_model.` prefix); match on the name's end
    return next(m for n, m in model.named_modules() if n == suffix or n.endswith("." + suffix))


def test_fast_init_keeps_buffers_and_statistics():
    # the text encoder is small enough (123M, ~0.5 GB) to build for real in about a second
    te = configs.build_model("sd15", "text_encoder", device="cpu", seed=0)
    assert torch.equal(_find(te, "embeddings").position_ids, torch.arange(77)[None])
    fc1 = _find(te, "encoder.layers.0.mlp.fc1").weight
    assert abs(fc1.std().item() - 1 / (3 * 768) ** 0.5) < 2e-3
    ln = _find(te, "final_layer_norm")
    assert torch.all(ln.weight == 1) and torch.all(ln.bias == 0)
    assert all(torch.isfinite(p).all() for p in te.parameters())
    out = te(torch.tensor([[49406, 320, 1929, 49407] + [49407] * 73])).last_hidden_state
    assert out.shape == (1, 77, 768) and torch.isfinite(out).all()
    again = configs.build_model("sd15", "text_encoder", device="cpu", seed=0)
    q = "encoder.layers.3.self_attn.q_proj"
    assert torch.equal(_find(again, q).weight, _find(te, q).weight)


def test_configs_are_plain_json():
    for path in configs.config_dir("sd15").rglob("*.json"):
        json.loads(path.read_text())
