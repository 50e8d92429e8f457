"""CogVideoX and Mochi: tiny text-to-video (and CogVideoX image-to-video) pipelines with T5 text.

CogVideoX (``CogVideoXTransformer3DModel``) attends over one joint sequence [T5 text (226, padding not
masked), video tokens frame-major] in every block; latents are (B, F, C, H, W). 1.0 (2b: sin-cos
positions; 5b: rotary) has no temporal patch, 1.5 patches 2 latent frames per token frame. The causal
3D VAE compresses time by 4. Mochi (``MochiTransformer3DModel``) runs asymmetric joint attention
[video, valid T5 tokens] one batch row at a time; its VAE compresses time by 6 and drops the first 5
decoded frames. The T5 tokenizer is :func:`daamkit.testing.tokenizers.t5_tokenizer`.
"""

from __future__ import annotations

import torch


def _t5_encoder(vocab_size: int, seed: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(
        T5Config(vocab_size=vocab_size, d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4, dropout_rate=0.0,
                 relative_attention_num_buckets=8, decoder_start_token_id=0)
    ).eval()


def _t5(tokenizer_dir: str, max_length: int, seed: int):
    from transformers import T5TokenizerFast

    tokenizer = T5TokenizerFast.from_pretrained(tokenizer_dir, model_max_length=max_length)
    return tokenizer, _t5_encoder(max(len(tokenizer), 32), seed)


def _cogvideox_vae(seed: int):
    """Spatial factor 4 (3 blocks), temporal compression 4 (the first two blocks compress time)."""
    from diffusers import AutoencoderKLCogVideoX

    torch.manual_seed(seed)
    return AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 3,
        up_block_types=("CogVideoXUpBlock3D",) * 3, block_out_channels=(8, 8, 8), latent_channels=4,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
    ).eval()


def tiny_cogvideox_transformer(
    seed: int = 0, version: str = "1.0", rotary: bool = True, image: bool = False, sample_hw: tuple[int, int] = (8, 12),
):
    """2 ``CogVideoXBlock`` s, 2 heads of 16 (the 3D rotary embedding splits a head 4 + 6 + 6), patch 2.

    version "1.0": no temporal patch (2b with ``rotary=False``: sin-cos positions; 5b: rotary); "1.5":
    ``patch_size_t=2``, no patch bias. ``image``: the image-to-video model (image latents concatenated on
    channels; 5b-I2V's learned positions, which fix the latent size to ``sample_hw``; 1.5's ``ofs`` embedding).
    """
    from diffusers import CogVideoXTransformer3DModel

    v15 = version == "1.5"
    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=8 if image else 4, out_channels=4,
        time_embed_dim=4, text_embed_dim=32, num_layers=2, sample_height=sample_hw[0], sample_width=sample_hw[1],
        sample_frames=9, patch_size=2, patch_size_t=2 if v15 else None, temporal_compression_ratio=4,
        max_text_seq_length=226, use_rotary_positional_embeddings=rotary,
        use_learned_positional_embeddings=image and not v15, patch_bias=not v15,
        ofs_embed_dim=4 if (image and v15) else None,
    ).eval()


def _cogvideox(cls, tokenizer_dir: str, seed: int, **kw):
    from diffusers import CogVideoXDDIMScheduler

    tokenizer, text_encoder = _t5(tokenizer_dir, 226, seed + 1)
    pipe = cls(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=_cogvideox_vae(seed + 2),
        transformer=tiny_cogvideox_transformer(seed, **kw), scheduler=CogVideoXDDIMScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_cogvideox(tokenizer_dir: str, seed: int = 0, version: str = "1.0", rotary: bool = True):
    """``CogVideoXPipeline``: 8 px per token side (VAE 4, patch 2); 9 frames are 3 latent frames."""
    from diffusers import CogVideoXPipeline

    return _cogvideox(CogVideoXPipeline, tokenizer_dir, seed, version=version, rotary=rotary)


def tiny_cogvideox_i2v(tokenizer_dir: str, seed: int = 0, version: str = "1.0", sample_hw: tuple[int, int] = (8, 12)):
    """``CogVideoXImageToVideoPipeline``; the 1.0 model's learned positions fit ``sample_hw`` latents
    (32x48 px)."""
    from diffusers import CogVideoXImageToVideoPipeline

    return _cogvideox(CogVideoXImageToVideoPipeline, tokenizer_dir, seed, version=version, image=True,
                      sample_hw=sample_hw)


def tiny_mochi_transformer(seed: int = 0):
    """2 ``MochiTransformerBlock`` s (the last one context-pre-only), 2 heads of 8, patch 2, random RoPE
    frequencies."""
    from diffusers import MochiTransformer3DModel

    torch.manual_seed(seed)
    model = MochiTransformer3DModel(
        patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2, pooled_projection_dim=16,
        in_channels=12, out_channels=None, qk_norm="rms_norm", text_embed_dim=32, time_embed_dim=4,
        activation_fn="swiglu", max_sequence_length=256,
    )
    with torch.no_grad():  # the checkpoint's frequencies are learned; zeros would make RoPE the identity
        model.pos_frequencies.normal_(0.0, 0.5)
    return model.eval()


def tiny_mochi(tokenizer_dir: str, seed: int = 0):
    """``MochiPipeline``: VAE 8x spatial, 6x temporal (frames 6k+1 give k+1 latent frames), T5 at 256
    tokens with the attention mask; the scheduler inverts its sigmas as Mochi's does (the denoiser's
    timestep rises)."""
    from diffusers import AutoencoderKLMochi, FlowMatchEulerDiscreteScheduler, MochiPipeline

    tokenizer, text_encoder = _t5(tokenizer_dir, 256, seed + 1)
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLMochi(
        latent_channels=12, out_channels=3, encoder_block_out_channels=(32, 32, 32, 32),
        decoder_block_out_channels=(32, 32, 32, 32), layers_per_block=(1, 1, 1, 1, 1),
    ).eval()
    pipe = MochiPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=tiny_mochi_transformer(seed),
        scheduler=FlowMatchEulerDiscreteScheduler(invert_sigmas=True),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
