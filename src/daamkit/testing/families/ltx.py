"""LTX-Video (``LTXPipeline``, ``LTXImageToVideoPipeline``, ``LTXConditionPipeline``): ``LTXVideoTransformer3DModel``
with T5 cross-attention ``attn2``, packed (B, N, C) latents, a causal video VAE.

The three pipelines share their components. The tiny VAE keeps LTX's temporal compression 8 (three
spatio-temporal down/up blocks) with patch size 1 instead of 4, so one latent cell is 8 px instead of 32;
its decoder drops the first frame of every temporal upsampling as the real one does, so ``n`` latent
frames decode to ``1 + 8 (n - 1)`` video frames. The T5 tokenizer is :func:`daamkit.testing.tokenizers.t5_tokenizer`.
"""

from __future__ import annotations

import torch


def tiny_ltx_components(tokenizer_dir: str, seed: int = 0) -> dict:
    """Transformer (2 blocks, 2 heads of 16: the rotary embedding pads 2 of 32 dims as the real 2048 does),
    VAE (temporal and spatial compression 8, causal first frame), 2-layer T5 encoder, flow-match scheduler."""
    from diffusers import AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXVideoTransformer3DModel
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    tokenizer = T5TokenizerFast.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    transformer = LTXVideoTransformer3DModel(
        in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=2, attention_head_dim=16,
        cross_attention_dim=32, num_layers=2, caption_channels=32,
    ).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLLTXVideo(
        latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True, False), decoder_spatio_temporal_scaling=(True, True, True, False),
        patch_size=1, patch_size_t=1, encoder_causal=True, decoder_causal=False,
    ).eval()
    vae.use_framewise_encoding = False
    vae.use_framewise_decoding = False
    torch.manual_seed(seed + 2)
    text_encoder = T5EncoderModel(
        T5Config(vocab_size=max(len(tokenizer), 32), d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                 dropout_rate=0.0, relative_attention_num_buckets=8, decoder_start_token_id=0)
    ).eval()
    return {
        "transformer": transformer, "vae": vae, "text_encoder": text_encoder, "tokenizer": tokenizer,
        "scheduler": FlowMatchEulerDiscreteScheduler(),
    }


def _pipe(cls, tokenizer_dir: str, seed: int):
    pipe = cls(**tiny_ltx_components(tokenizer_dir, seed))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_ltx(tokenizer_dir: str, seed: int = 0):
    """``LTXPipeline`` (text to video) at test size."""
    from diffusers import LTXPipeline

    return _pipe(LTXPipeline, tokenizer_dir, seed)


def tiny_ltx_i2v(tokenizer_dir: str, seed: int = 0):
    """``LTXImageToVideoPipeline``: the image is encoded into the first latent frame, which keeps timestep 0."""
    from diffusers import LTXImageToVideoPipeline

    return _pipe(LTXImageToVideoPipeline, tokenizer_dir, seed)


def tiny_ltx_condition(tokenizer_dir: str, seed: int = 0):
    """``LTXConditionPipeline``: conditions at frame 0 overwrite the first latent frames; conditions at later
    frames become extra tokens placed before the video's tokens; the transformer gets ``video_coords``."""
    from diffusers import LTXConditionPipeline

    return _pipe(LTXConditionPipeline, tokenizer_dir, seed)
