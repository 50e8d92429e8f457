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


# stabilityai/stable-diffusion-xl-base-1.0
SDXL_PARAMS = {
    "unet": 2_567_463_684,
    "text_encoder": CLIP_L,
    "text_encoder_2": CLIP_G_PROJ,
    "vae": SD15_PARAMS["vae"],
}


def test_sdxl_parameter_counts_and_layout():
    assert configs.components("sdxl")["unet"] == ("diffusers", "UNet2DConditionModel")
    assert configs.parameter_counts("sdxl") == SDXL_PARAMS
    unet = configs.build_model("sdxl", "unet", device="meta")
    attn2 = [m for n, m in unet.named_modules() if n.endswith("attn2")]
    # transformer depths [1, 2, 10] per level: 4 + 20 down, 10 mid, 30 + 6 up
    assert len(attn2) == 70
    assert {m.heads for m in attn2} == {10, 20} and {m.to_k.in_features for m in attn2} == {2048}
    vae = configs.load_config("sdxl", "vae")
    assert (vae["scaling_factor"], vae["force_upcast"], vae["sample_size"]) == (0.13025, True, 1024)
    assert configs.model_index("sdxl")["force_zeros_for_empty_prompt"] is True


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


# ---- FLUX.2 [klein] 4B, Qwen-Image, Sana 1600M 1024px: released architectures on the meta device -----------
# Exact counts are what these configs build (regression); each is also checked against the size the release
# states, to the precision it is stated:
# * Qwen3-4B 4.02B and Qwen2.5-VL-7B 8.29B, Gemma-2-2B 2.61B: the sizes on the models' Hub pages.
# * FLUX.2 VAE 84,046,115: the released vae/diffusion_pytorch_model.safetensors (shared by FLUX.2 dev and klein).
# * FLUX.2 [klein] 4B transformer ~3.9B ("4B" with its name), Qwen-Image transformer 20.43B (model card: a 20B
#   MMDiT; 40.86 GB of bf16 weights in the released index), Sana 1600M 1.6B (model name).
QWEN3_4B = 4_022_468_096
FLUX2_KLEIN_PARAMS = {"transformer": 3_875_544_576, "text_encoder": QWEN3_4B, "vae": 84_046_115}
QWENIMAGE_PARAMS = {"transformer": 20_430_401_088, "text_encoder": 8_292_166_656, "vae": 126_892_531}
SANA_PARAMS = {"transformer": 1_604_462_752, "text_encoder": 2_614_341_888, "vae": 312_250_275}
# Z-Image: the transformer of the class defaults (the released architecture, "6B"), Qwen3-4B, Flux.1's VAE
ZIMAGE_PARAMS = {"transformer": 6_154_908_736, "text_encoder": QWEN3_4B, "vae": 83_819_683}
RELEASED = {  # (config, component): (stated size, half a unit of its last stated digit)
    ("flux2-klein", "transformer"): (3.9e9, 0.05e9),
    ("flux2-klein", "text_encoder"): (4.02e9, 0.005e9),
    ("flux2-klein", "vae"): (84_046_115, 0),
    ("qwenimage", "transformer"): (20.43e9, 0.005e9),
    ("qwenimage", "text_encoder"): (8.29e9, 0.005e9),
    ("sana", "transformer"): (1.6e9, 0.05e9),
    ("sana", "text_encoder"): (2.61e9, 0.005e9),
    ("zimage", "transformer"): (6e9, 0.5e9),
    ("zimage", "text_encoder"): (4.02e9, 0.005e9),
}


def test_new_configs_are_listed():
    assert {"flux2-klein", "qwenimage", "sana", "zimage"} <= set(configs.available())
    assert configs.components("flux2-klein")["transformer"] == ("diffusers", "Flux2Transformer2DModel")
    assert configs.components("flux2-klein")["text_encoder"] == ("transformers", "Qwen3ForCausalLM")
    assert configs.components("qwenimage")["transformer"] == ("diffusers", "QwenImageTransformer2DModel")
    assert configs.components("qwenimage")["text_encoder"] == (
        "transformers",
        "Qwen2_5_VLForConditionalGeneration",
    )
    assert configs.components("sana")["transformer"] == ("diffusers", "SanaTransformer2DModel")
    assert configs.components("sana")["vae"] == ("diffusers", "AutoencoderDC")
    assert configs.model_index("flux2-klein")["is_distilled"] is True
    assert configs.components("zimage")["transformer"] == ("diffusers", "ZImageTransformer2DModel")
    assert configs.components("zimage")["text_encoder"] == ("transformers", "Qwen3Model")


@pytest.mark.parametrize(
    "name, expected",
    [
        ("flux2-klein", FLUX2_KLEIN_PARAMS),
        ("qwenimage", QWENIMAGE_PARAMS),
        ("sana", SANA_PARAMS),
        ("zimage", ZIMAGE_PARAMS),
    ],
)
def test_new_parameter_counts(name, expected):
    counts = configs.parameter_counts(name)
    assert counts == expected
    for (config, component), (stated, half_unit) in RELEASED.items():
        if config == name:
            assert abs(counts[component] - stated) <= half_unit, (config, component)


def test_new_key_settings():
    f = configs.load_config("flux2-klein", "transformer")
    assert (f["num_layers"], f["num_single_layers"], f["num_attention_heads"], f["attention_head_dim"]) == (
        5,
        20,
        24,
        128,
    )
    # the joint context stacks three Qwen3-4B hidden states: 3 x 2560
    assert (
        f["joint_attention_dim"]
        == 3 * configs.load_config("flux2-klein", "text_encoder")["hidden_size"]
        == 7680
    )
    assert (f["in_channels"], f["guidance_embeds"], f["axes_dims_rope"]) == (128, False, [32, 32, 32, 32])
    q = configs.load_config("qwenimage", "transformer")
    assert (q["num_layers"], q["num_attention_heads"], q["attention_head_dim"], q["patch_size"]) == (
        60,
        24,
        128,
        2,
    )
    assert q["joint_attention_dim"] == configs.load_config("qwenimage", "text_encoder")["hidden_size"] == 3584
    s = configs.load_config("sana", "transformer")
    assert (s["num_layers"], s["num_attention_heads"], s["attention_head_dim"]) == (20, 70, 32)
    assert (s["num_cross_attention_heads"], s["cross_attention_head_dim"], s["cross_attention_dim"]) == (
        20,
        112,
        2240,
    )
    assert s["caption_channels"] == configs.load_config("sana", "text_encoder")["hidden_size"] == 2304
    assert (s["in_channels"], s["sample_size"], s["mlp_ratio"]) == (32, 32, 2.5)
    z = configs.load_config("zimage", "transformer")
    assert (z["dim"], z["n_heads"], z["n_layers"], z["n_refiner_layers"]) == (3840, 30, 30, 2)
    assert z["cap_feat_dim"] == configs.load_config("zimage", "text_encoder")["hidden_size"] == 2560
    vae = configs.load_config("sana", "vae")
    assert (vae["latent_channels"], vae["scaling_factor"], len(vae["encoder_block_out_channels"])) == (
        32,
        0.41407,
        6,
    )


def test_reduced_text_encoders_keep_their_width():
    # what benchmarks/overhead.py builds: few layers of the released width; a dotted key reaches a sub-config
    qwen = configs.build_model(
        "qwenimage",
        "text_encoder",
        device="meta",
        overrides={"text_config.num_hidden_layers": 2, "vision_config.depth": 1},
    )
    assert (len(qwen.model.language_model.layers), len(qwen.model.visual.blocks)) == (2, 1)
    assert qwen.config.text_config.hidden_size == 3584
    gemma = configs.build_model("sana", "text_encoder", device="meta", overrides={"num_hidden_layers": 2})
    # Gemma 2 alternates sliding-window and global layers: the first two keep one of each
    assert gemma.config.layer_types == ["sliding_attention", "full_attention"] and len(gemma.layers) == 2
    counts = configs.parameter_counts(
        "flux2-klein",
        {"transformer": {"num_layers": 2, "num_single_layers": 8}, "text_encoder": {"num_hidden_layers": 3}},
    )
    assert counts == {"transformer": 1_667_238_912, "text_encoder": 691_751_168, "vae": 84_046_115}
    with pytest.raises(KeyError, match="text_config.no_such"):
        configs.build_model("qwenimage", "text_encoder", device="meta", overrides={"text_config.no_such": 1})


def test_pipeline_settings_of_the_model_index_reach_the_pipeline(monkeypatch):
    # FLUX.2 [klein] 4B is step-distilled: the pipeline is told so by its model_index.json
    monkeypatch.setitem(configs.TOKENIZER_FACTORIES, "flux2-klein/tokenizer", lambda: None)
    small = {
        "transformer": {"num_layers": 1, "num_single_layers": 1},
        "text_encoder": {"num_hidden_layers": 1},
    }
    pipe = configs.build_random_pipeline("flux2-klein", device="meta", overrides=small)
    assert type(pipe).__name__ == "Flux2KleinPipeline" and pipe.config.is_distilled is True
