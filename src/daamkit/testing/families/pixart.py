"""PixArt-α and PixArt-Σ (``PixArtAlphaPipeline``, ``PixArtSigmaPipeline``): ``PixArtTransformer2DModel`` with
T5 cross-attention.

Both share the denoiser class; they differ in the T5 length (120 vs 300), the resolution bins and, for the
1024 px α checkpoint, the resolution/aspect-ratio embedding (``use_additional_conditions``), which the tiny
α model keeps. The T5 tokenizer is :func:`daamkit.testing.tokenizers.t5_tokenizer`.
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


def _vae(seed: int):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4, sample_size=32,
    )


def tiny_pixart_transformer(seed: int = 0, use_additional_conditions: bool = False):
    """2 ``BasicTransformerBlock`` s (self + cross attention), patch 2, learned sigma (8 output channels).

    ``sample_size=128`` as in the 1024 px checkpoints, so the pipelines take their 1024 px code paths
    (``use_additional_conditions=True`` is PixArt-α 1024's resolution/aspect-ratio embedding).
    """
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        sample_size=128, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3, caption_channels=32,
        in_channels=4, cross_attention_dim=24, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        use_additional_conditions=use_additional_conditions,
    ).eval()


def _build(cls, tokenizer_dir: str, seed: int, use_additional_conditions: bool):
    from diffusers import DPMSolverMultistepScheduler
    from transformers import T5TokenizerFast

    tokenizer = T5TokenizerFast.from_pretrained(tokenizer_dir)
    transformer = tiny_pixart_transformer(seed, use_additional_conditions)
    text_encoder = _t5_encoder(max(len(tokenizer), 32), seed + 1)
    vae = _vae(seed + 2)
    pipe = cls(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_pixart_alpha(tokenizer_dir: str, seed: int = 0):
    """``PixArtAlphaPipeline`` at test size (T5 max length 120, resolution/aspect-ratio conditioning on)."""
    from diffusers import PixArtAlphaPipeline

    return _build(PixArtAlphaPipeline, tokenizer_dir, seed, use_additional_conditions=True)


def tiny_pixart_sigma(tokenizer_dir: str, seed: int = 0):
    """``PixArtSigmaPipeline`` at test size (T5 max length 300, no extra conditioning)."""
    from diffusers import PixArtSigmaPipeline

    return _build(PixArtSigmaPipeline, tokenizer_dir, seed, use_additional_conditions=False)
