"""Tiny randomly initialised pipelines of each family, built offline (diffusers' test sizes).

The text encoders use the full CLIP vocabulary (49408) so that the real Stable Diffusion tokenizer,
rebuilt offline by ``daamkit.vocab``, can drive them.
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
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer


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


def tiny_sd(tokenizer_dir: str, seed: int = 0) -> StableDiffusionPipeline:
    unet = tiny_sd_unet(seed)
    torch.manual_seed(seed + 1)
    vae = _vae()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_text_config())
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl(tokenizer_dir: str, tokenizer_2_dir: str, seed: int = 0) -> StableDiffusionXLPipeline:
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
        tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
        tokenizer_2=CLIPTokenizer.from_pretrained(tokenizer_2_dir),
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
