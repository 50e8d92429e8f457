"""Sana-Video (``SanaVideoPipeline``, ``SanaImageToVideoPipeline``): ``SanaVideoTransformer3DModel`` (linear
self-attention with Wan's 3-D rotary embedding, SDPA cross-attention to Gemma-2 text, a temporal conv in the
feed-forward), a causal Wan VAE (8 px a side, 4 video frames a latent frame after the first), Gemma-2.

The Gemma tokenizer is :func:`daamkit.testing.families.sana.gemma_tokenizer` trained on Sana-Video's own
complex human instruction (it differs from Sana's), so that instruction tokenizes into words.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch

from daamkit.testing.families.sana import gemma_tokenizer


def sana_video_complex_human_instruction() -> list[str]:
    """The default ``complex_human_instruction`` of ``SanaVideoPipeline.__call__`` (from the installed diffusers)."""
    from diffusers import SanaVideoPipeline

    return list(inspect.signature(SanaVideoPipeline.__call__).parameters["complex_human_instruction"].default)


def sana_video_tokenizer(out_dir: str | Path):
    """Gemma's tokenizer (special ids, chat template) trained on short sentences and Sana-Video's instruction."""
    return gemma_tokenizer(out_dir, extra_text=sana_video_complex_human_instruction())


def tiny_sana_video(tokenizer_dir: str, seed: int = 0, image_to_video: bool = False):
    """A ``SanaVideoPipeline`` (or ``SanaImageToVideoPipeline``) at test size, fp32 CPU: 2 blocks, patch
    (1, 2, 2), q/k RMSNorm across heads and the 480p sample size (it picks the resolution bins) as
    released, a 3-level Wan VAE (temporal downsampling in the last two), 2-layer Gemma-2, DPM-Solver++
    on flow sigmas (Sana-Video's scheduler)."""
    from diffusers import (
        AutoencoderKLWan,
        DPMSolverMultistepScheduler,
        SanaImageToVideoPipeline,
        SanaVideoPipeline,
        SanaVideoTransformer3DModel,
    )
    from transformers import Gemma2Config, Gemma2Model, GemmaTokenizer

    tokenizer = GemmaTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    transformer = SanaVideoTransformer3DModel(
        in_channels=16, out_channels=16, num_attention_heads=2, attention_head_dim=12, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=12, cross_attention_dim=24, caption_channels=32,
        mlp_ratio=2.5, attention_bias=False, sample_size=30, patch_size=(1, 2, 2), qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    torch.manual_seed(seed + 2)
    text_encoder = Gemma2Model(
        Gemma2Config(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=8192,
            sliding_window=64, pad_token_id=0, eos_token_id=1, bos_token_id=2, attn_implementation="eager",
        )
    ).eval()
    scheduler = DPMSolverMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0, beta_schedule="linear"
    )
    cls = SanaImageToVideoPipeline if image_to_video else SanaVideoPipeline
    pipe = cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe
