"""The configs in daamkit/configs (SD 1.5, SD3-medium, Flux.1-dev) build the real architectures (parameter counts
on the meta device)."""

import json

import pytest
import torch

from daamkit.testing import configs

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
    for name in configs.available():
        for path in configs.config_dir(name).rglob("*.json"):
            json.loads(path.read_text())


# ---- SD3-medium and Flux.1-dev: released architectures, counted on the meta device --------------
# Parameter counts of stabilityai/stable-diffusion-3-medium-diffusers and black-forest-labs/FLUX.1-dev.
CLIP_L = 123_060_480  # CLIPTextModel (Flux); + 768 x 768 text projection in SD3
CLIP_L_PROJ = 123_650_304
CLIP_G_PROJ = 694_659_840  # OpenCLIP ViT-bigG text tower with projection (SDXL's text_encoder_2 too)
T5_XXL_ENCODER = 4_762_310_656
VAE_16CH = 83_819_683  # 16 latent channels, no quant convs (SD3 and Flux)
SD3_PARAMS = {
    "transformer": 2_028_328_000,
    "text_encoder": CLIP_L_PROJ,
    "text_encoder_2": CLIP_G_PROJ,
    "text_encoder_3": T5_XXL_ENCODER,
    "vae": VAE_16CH,
}
FLUX_PARAMS = {
    "transformer": 11_901_408_320,
    "text_encoder": CLIP_L,
    "text_encoder_2": T5_XXL_ENCODER,
    "vae": VAE_16CH,
}


def test_sd3_and_flux_are_listed():
    assert {"sd15", "sd3", "flux"} <= set(configs.available())
    assert configs.components("sd3")["transformer"] == ("diffusers", "SD3Transformer2DModel")
    assert configs.components("sd3")["tokenizer_3"] == ("transformers", "T5TokenizerFast")
    assert configs.components("flux")["transformer"] == ("diffusers", "FluxTransformer2DModel")
    assert configs.components("flux")["text_encoder_2"] == ("transformers", "T5EncoderModel")


def test_sd3_parameter_counts():
    assert configs.parameter_counts("sd3") == SD3_PARAMS


def test_flux_parameter_counts():
    assert configs.parameter_counts("flux") == FLUX_PARAMS


def test_flux_reduced_blocks_keep_full_width():
    # what benchmarks/overhead.py builds for Flux: 2 of 19 double and 4 of 38 single blocks, 2 of 24 T5 layers
    full = configs.build_model("flux", "transformer", device="meta")
    small = configs.build_model(
        "flux", "transformer", device="meta", overrides={"num_layers": 2, "num_single_layers": 4}
    )
    assert (len(full.transformer_blocks), len(full.single_transformer_blocks)) == (19, 38)
    assert (len(small.transformer_blocks), len(small.single_transformer_blocks)) == (2, 4)

    def count(m):
        return sum(p.numel() for p in m.parameters())

    double, single = count(full.transformer_blocks[0]), count(full.single_transformer_blocks[0])
    assert (
        count(small.transformer_blocks[0]) == double and count(small.single_transformer_blocks[0]) == single
    )
    assert count(full) - count(small) == 17 * double + 34 * single
    assert count(small) == 1_310_154_816
    counts = configs.parameter_counts(
        "flux",
        {"transformer": {"num_layers": 2, "num_single_layers": 4}, "text_encoder_2": {"num_layers": 2}},
    )
    assert counts["text_encoder_2"] == 517_494_784
    with pytest.raises(KeyError, match="no_such"):
        configs.build_model("flux", "transformer", device="meta", overrides={"no_such": 1})


def test_sd3_and_flux_key_settings():
    t = configs.load_config("sd3", "transformer")
    assert (t["num_layers"], t["num_attention_heads"], t["attention_head_dim"], t["patch_size"]) == (
        24,
        24,
        64,
        2,
    )
    assert (t["joint_attention_dim"], t["caption_projection_dim"], t["pooled_projection_dim"]) == (
        4096,
        1536,
        2048,
    )
    assert (t["in_channels"], t["sample_size"], t["pos_embed_max_size"]) == (16, 128, 192)
    g = configs.load_config("sd3", "text_encoder_2")
    assert (g["hidden_size"], g["num_hidden_layers"], g["num_attention_heads"], g["intermediate_size"]) == (
        1280,
        32,
        20,
        5120,
    )
    assert (g["projection_dim"], g["hidden_act"]) == (1280, "gelu")
    f = configs.load_config("flux", "transformer")
    assert (f["num_layers"], f["num_single_layers"], f["num_attention_heads"], f["attention_head_dim"]) == (
        19,
        38,
        24,
        128,
    )
    assert (f["joint_attention_dim"], f["pooled_projection_dim"], f["axes_dims_rope"]) == (
        4096,
        768,
        [16, 56, 56],
    )
    assert f["guidance_embeds"] is True and f["in_channels"] == 64
    for name, scale, shift in (("sd3", 1.5305, 0.0609), ("flux", 0.3611, 0.1159)):
        vae = configs.load_config(name, "vae")
        assert (vae["latent_channels"], vae["scaling_factor"], vae["shift_factor"]) == (16, scale, shift)
    t5 = configs.load_config("flux", "text_encoder_2")
    assert (t5["d_model"], t5["d_ff"], t5["num_layers"], t5["num_heads"], t5["vocab_size"]) == (
        4096,
        10240,
        24,
        64,
        32128,
    )


def test_without_leaves_components_out():
    with pytest.raises(ValueError, match="text_encoder_9"):
        configs.build_random_pipeline("sd3", device="meta", without=("text_encoder_9",))


def test_t5_tokenizer_offline(tmp_path):
    from daamkit.testing.tokenizers import t5_tokenizer

    tok = t5_tokenizer(tmp_path)
    ids = tok("a dog on a bench").input_ids
    assert ids[-1] == tok.eos_token_id == 1 and tok.pad_token_id == 0 and max(ids) < 200
    assert tok.model_max_length == 512


def test_fast_init_keeps_tied_weights():
    # to_empty (meta -> cpu) makes new parameters per module; T5's embed_tokens must stay tied to `shared`
    small = {"num_layers": 1, "d_model": 64, "d_ff": 64, "num_heads": 2, "d_kv": 32}
    t5 = configs.build_model("flux", "text_encoder_2", device="cpu", overrides=small)
    assert t5.encoder.embed_tokens.weight is t5.shared.weight
    meta = configs.build_model("flux", "text_encoder_2", device="meta", overrides=small)
    assert sum(p.numel() for p in t5.parameters()) == sum(p.numel() for p in meta.parameters())
