"""LTX-2 (``LTX2Pipeline``): ``LTX2VideoTransformer3DModel``, an audio-video transformer whose video stream
cross-attends (``attn2``) to text tokens that went through Gemma-3 (every layer's hidden states) and the
``LTX2TextConnectors``; a causal video VAE (temporal compression 8), an audio VAE and a vocoder.

The tokenizer is the Gemma one of :func:`daamkit.testing.families.sana.gemma_tokenizer` (Gemma-3 shares
``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3; LTX2Pipeline uses no chat template and pads on the left).
The video connector keeps LTX-2's learnable registers (128 of them, so ``max_sequence_length`` must be a
multiple of 128): it moves the prompt's tokens to the front in their order and fills the rest with registers.
The tiny VAE has LTX-2's down/up block kinds with patch size 1 instead of 4: 8 px per latent cell, temporal
compression 8.
"""

from __future__ import annotations

import torch


def tiny_ltx2_components(tokenizer_dir: str, seed: int = 0, registers: int | None = 128) -> dict:
    from diffusers import (
        AutoencoderKLLTX2Audio,
        AutoencoderKLLTX2Video,
        FlowMatchEulerDiscreteScheduler,
        LTX2VideoTransformer3DModel,
    )
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, GemmaTokenizerFast

    tokenizer = GemmaTokenizerFast.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    text_config = {
        "vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 2048,
        "sliding_window": 64, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2,
    }
    vision_config = {
        "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
        "image_size": 28, "patch_size": 14,
    }
    text_encoder = Gemma3ForConditionalGeneration(
        Gemma3Config(text_config=text_config, vision_config=vision_config, mm_tokens_per_image=4)
    ).eval()
    hidden = text_encoder.config.text_config.hidden_size
    torch.manual_seed(seed + 1)
    transformer = LTX2VideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=8,
        cross_attention_dim=16, audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2,
        audio_attention_head_dim=4, audio_cross_attention_dim=8, num_layers=2, qk_norm="rms_norm_across_heads",
        caption_channels=hidden, rope_double_precision=False, rope_type="split",
    ).eval()
    torch.manual_seed(seed + 2)
    connectors = LTX2TextConnectors(
        caption_channels=hidden, text_proj_in_factor=text_encoder.config.text_config.num_hidden_layers + 1,
        video_connector_num_attention_heads=4, video_connector_attention_head_dim=8, video_connector_num_layers=1,
        video_connector_num_learnable_registers=registers, audio_connector_num_attention_heads=4,
        audio_connector_attention_head_dim=8, audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=registers, connector_rope_base_seq_len=32, rope_theta=10000.0,
        rope_double_precision=False, causal_temporal_positioning=False, rope_type="split",
    ).eval()
    torch.manual_seed(seed + 3)
    vae = AutoencoderKLLTX2Video(
        latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True, True), decoder_spatio_temporal_scaling=(True, True, True),
        decoder_inject_noise=(False, False, False, False), upsample_residual=(False, False, False),
        upsample_factor=(1, 1, 1), patch_size=1, patch_size_t=1,
        # stated as the real config states 32 and 8: the default derives them from the block count
        spatial_compression_ratio=8, temporal_compression_ratio=8,
    ).eval()
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    torch.manual_seed(seed + 4)
    audio_vae = AutoencoderKLLTX2Audio(
        base_channels=4, output_channels=2, ch_mult=(1,), num_res_blocks=1, attn_resolutions=None, in_channels=2,
        resolution=32, latent_channels=2, norm_type="pixel", causality_axis="height", dropout=0.0,
        mid_block_add_attention=False, sample_rate=16000, mel_hop_length=160, is_causal=True, mel_bins=8,
    ).eval()
    torch.manual_seed(seed + 5)
    vocoder = LTX2Vocoder(
        in_channels=audio_vae.config.output_channels * audio_vae.config.mel_bins, hidden_channels=32,
        out_channels=2, upsample_kernel_sizes=[4, 4], upsample_factors=[2, 2], resnet_kernel_sizes=[3],
        resnet_dilations=[[1, 3, 5]], leaky_relu_negative_slope=0.1, output_sampling_rate=16000,
    ).eval()
    return {
        "transformer": transformer, "vae": vae, "audio_vae": audio_vae, "scheduler": FlowMatchEulerDiscreteScheduler(),
        "text_encoder": text_encoder, "tokenizer": tokenizer, "connectors": connectors, "vocoder": vocoder,
    }


def tiny_ltx2(tokenizer_dir: str, seed: int = 0, registers: int | None = 128):
    """``LTX2Pipeline`` (text to video and audio) at test size."""
    from diffusers import LTX2Pipeline

    pipe = LTX2Pipeline(**tiny_ltx2_components(tokenizer_dir, seed, registers))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_ltx2_i2v(tokenizer_dir: str, seed: int = 0, registers: int | None = 128):
    """``LTX2ImageToVideoPipeline``: the image is encoded into the first latent frame, which keeps timestep 0."""
    from diffusers import LTX2ImageToVideoPipeline

    pipe = LTX2ImageToVideoPipeline(**tiny_ltx2_components(tokenizer_dir, seed, registers))
    pipe.set_progress_bar_config(disable=True)
    return pipe
