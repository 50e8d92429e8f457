"""Tiny randomly initialised pipelines of each family, built offline (diffusers' test sizes).

The text encoders use the full CLIP vocabulary (49408) so that the real Stable Diffusion tokenizer,
rebuilt offline by :mod:`daamkit.testing.tokenizers`, can drive them. Each tokenizer argument is its
folder or a tokenizer already loaded from it (shared, not copied: loading the full CLIP vocabulary
takes most of a tiny build's time).
"""

from __future__ import annotations

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PreTrainedTokenizerBase,
)

Tokenizer = str | PreTrainedTokenizerBase


def _tokenizer(cls: type, source: Tokenizer) -> PreTrainedTokenizerBase:
    return source if isinstance(source, PreTrainedTokenizerBase) else cls.from_pretrained(source)


def _text_config(hidden: int = 32, projection_dim: int = 32) -> CLIPTextConfig:
    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=2,
        hidden_size=hidden,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        pad_token_id=1,
        vocab_size=49408,
        max_position_embeddings=77,
        projection_dim=projection_dim,
        hidden_act="gelu",
    )


def _vae() -> AutoencoderKL:
    return AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        sample_size=32,
    )


def _scheduler() -> DDIMScheduler:
    return DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False, steps_offset=1
    )


def tiny_sd_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def tiny_sd(tokenizer_dir: Tokenizer, seed: int = 0) -> StableDiffusionPipeline:
    unet = tiny_sd_unet(seed)
    torch.manual_seed(seed + 1)
    vae = _vae()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_text_config())
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=_tokenizer(CLIPTokenizer, tokenizer_dir),
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl(tokenizer_dir: Tokenizer, tokenizer_2_dir: Tokenizer, seed: int = 0) -> StableDiffusionXLPipeline:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 * 8 + 32
        cross_attention_dim=64,
        norm_num_groups=1,
    )
    torch.manual_seed(seed + 1)
    vae = _vae()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_text_config())
    text_encoder_2 = CLIPTextModelWithProjection(_text_config())
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=_tokenizer(CLIPTokenizer, tokenizer_dir),
        tokenizer_2=_tokenizer(CLIPTokenizer, tokenizer_2_dir),
        scheduler=_scheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_controlnet(sd: StableDiffusionPipeline, seed: int = 0) -> StableDiffusionControlNetPipeline:
    torch.manual_seed(seed + 3)
    controlnet = ControlNetModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        in_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        cross_attention_dim=32,
        conditioning_embedding_out_channels=(16, 32),
        norm_num_groups=32,
        attention_head_dim=8,
    )
    c = sd.components
    pipe = StableDiffusionControlNetPipeline(
        vae=c["vae"],
        text_encoder=c["text_encoder"],
        tokenizer=c["tokenizer"],
        unet=c["unet"],
        controlnet=controlnet,
        scheduler=c["scheduler"],
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ----------------------------------------------------------------------- diffusion transformers ---
def _t5(seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(
        T5Config(vocab_size=200, d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4, dropout_rate=0.0,
                 relative_attention_num_buckets=8, decoder_start_token_id=0)
    ).eval()


def _dit_vae(latent_channels: int, seed: int) -> AutoencoderKL:
    """The diffusion transformers' VAE at test size: one block, no downsampling, SD3-style shift/scale."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1,
        latent_channels=latent_channels, norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False,
        shift_factor=0.0609, scaling_factor=1.5035,
    )


def tiny_sd3(clip_dir: Tokenizer, clip_2_dir: Tokenizer, t5_dir: Tokenizer, seed: int = 0, dual_attention_layers: tuple = ()):
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import T5TokenizerFast

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
        qk_norm="rms_norm", dual_attention_layers=dual_attention_layers,
    )
    torch.manual_seed(seed + 1)
    te1 = CLIPTextModelWithProjection(_text_config())
    te2 = CLIPTextModelWithProjection(_text_config())
    te3 = _t5(seed + 2)
    vae = _dit_vae(latent_channels=4, seed=seed + 3)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
        text_encoder=te1, text_encoder_2=te2, text_encoder_3=te3,
        tokenizer=_tokenizer(CLIPTokenizer, clip_dir), tokenizer_2=_tokenizer(CLIPTokenizer, clip_2_dir),
        tokenizer_3=_tokenizer(T5TokenizerFast, t5_dir),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux(clip_dir: Tokenizer, t5_dir: Tokenizer, seed: int = 0):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5TokenizerFast

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
    )
    torch.manual_seed(seed + 1)
    te1 = CLIPTextModel(_text_config())
    te2 = _t5(seed + 2)
    vae = _dit_vae(latent_channels=1, seed=seed + 3)  # Flux packs 2x2 latents: 4 channels in
    pipe = FluxPipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
        text_encoder=te1, text_encoder_2=te2,
        tokenizer=_tokenizer(CLIPTokenizer, clip_dir), tokenizer_2=_tokenizer(T5TokenizerFast, t5_dir),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
