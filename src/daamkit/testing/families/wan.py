"""Wan 2.1 and Wan 2.2 (``WanPipeline``, ``WanImageToVideoPipeline``): ``WanTransformer3DModel`` with
UMT5 cross-attention, the causal Wan video VAE.

Usage::

    from daamkit.testing.families.wan import tiny_wan, wan_tokenizer

    wan_tokenizer(tmp_dir)        # once: a UMT5-style tokenizer written to tmp_dir
    pipe = tiny_wan(tmp_dir)      # Wan 2.1 text-to-video
    frames = pipe("a red dog", num_frames=9, height=48, width=64, num_inference_steps=2).frames

The variants: :func:`tiny_wan_i2v` (Wan 2.1 image-to-video: a CLIP image encoder whose tokens the
cross-attention reads through ``add_k_proj`` before the text), :func:`tiny_wan22` and
:func:`tiny_wan22_i2v` (Wan 2.2 A14B: a high-noise ``transformer`` and a low-noise ``transformer_2``
switched at ``boundary_ratio``; 2.2's image-to-video conditions by latent concatenation only) and
:func:`tiny_wan22_ti2v` (Wan 2.2 TI2V-5B: a 48-channel VAE with 16x spatial compression and per-token
timesteps, ``expand_timesteps``).

Sizes: the VAE compresses 4x in time (causal: the first frame alone) and 8x in space (16x for TI2V), the
transformer patches 1x2x2, so 9 frames of 48x64 px are 3 token frames of 3x4 tokens. The prompt is
padded to ``max_sequence_length`` (512) with zero embeddings, which the transformer attends to unmasked.
"""

from __future__ import annotations

from pathlib import Path

import torch

#: Wan's text length: the pipelines pad the prompt to it, and the I2V cross-attention splits its keys at it
WAN_TEXT_LEN = 512


def wan_tokenizer(out_dir: str | Path):
    """A UMT5-style tokenizer (``T5TokenizerFast``, sentencepiece; ``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, no
    BOS) trained on a tiny vocabulary, saved to ``out_dir``; model max length 512 as Wan's."""
    from daamkit.testing.tokenizers import t5_tokenizer

    return t5_tokenizer(out_dir, model_max_length=WAN_TEXT_LEN)


def _umt5_encoder(vocab_size: int, seed: int):
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    return UMT5EncoderModel(
        UMT5Config(vocab_size=vocab_size, d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4, dropout_rate=0.0,
                   relative_attention_num_buckets=8, feed_forward_proj="gated-gelu")
    ).eval()


def _vae(seed: int, ti2v: bool = False):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    if ti2v:  # Wan 2.2's VAE: 48 latent channels, a 2x2 pixel patch on top of the 8x compression
        return AutoencoderKLWan(
            base_dim=3, z_dim=48, in_channels=12, out_channels=12, is_residual=True, patch_size=2,
            latents_mean=[0.0] * 48, latents_std=[1.0] * 48, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
            scale_factor_spatial=16, scale_factor_temporal=4, temperal_downsample=[False, True, True],
        ).eval()
    return AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
    ).eval()


def tiny_wan_transformer(seed: int = 0, in_channels: int = 16, out_channels: int = 16, image_dim: int | None = None):
    """2 ``WanTransformerBlock`` s (self-attention with 3D RoPE, cross-attention with q/k RMSNorm across
    heads, cross-attention norm), 2 heads of 12, patch (1, 2, 2). ``image_dim``: Wan 2.1 I2V's image
    embedder and the ``add_k_proj``/``add_v_proj`` image-context keys in every cross-attention."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=in_channels,
        out_channels=out_channels, text_dim=32, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, image_dim=image_dim,
        # the image embedder maps the CLIP tokens to the model width, which the added keys take in (as 14B's 5120)
        added_kv_proj_dim=None if image_dim is None else 24,
    ).eval()


def _scheduler():
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def _text(tokenizer_dir: str | Path, seed: int) -> dict:
    from transformers import T5TokenizerFast

    tokenizer = T5TokenizerFast.from_pretrained(str(tokenizer_dir))
    return {"tokenizer": tokenizer, "text_encoder": _umt5_encoder(max(len(tokenizer), 32), seed)}


def _done(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_wan(tokenizer_dir: str | Path, seed: int = 0):
    """Wan 2.1 text-to-video (``WanPipeline``) at test size; ``tokenizer_dir`` as :func:`wan_tokenizer` writes it.

    Call it as the real one: ``pipe(prompt, num_frames=9, height=48, width=64, num_inference_steps=2)``
    (``num_frames - 1`` a multiple of 4, sides multiples of 16); CFG runs the negative prompt as a second
    transformer call after the positive one.
    """
    from diffusers import WanPipeline

    return _done(WanPipeline(transformer=tiny_wan_transformer(seed), vae=_vae(seed + 2), scheduler=_scheduler(),
                             **_text(tokenizer_dir, seed + 1)))


def tiny_wan22(tokenizer_dir: str | Path, seed: int = 0, boundary_ratio: float = 0.875):
    """Wan 2.2 A14B text-to-video: ``transformer`` (high noise: timesteps >= ``boundary_ratio`` * 1000) and
    ``transformer_2`` (low noise) with their own weights. With 2 steps the first runs on ``transformer``,
    the second on ``transformer_2``."""
    from diffusers import WanPipeline

    return _done(WanPipeline(
        transformer=tiny_wan_transformer(seed), transformer_2=tiny_wan_transformer(seed + 3), vae=_vae(seed + 2),
        scheduler=_scheduler(), boundary_ratio=boundary_ratio, **_text(tokenizer_dir, seed + 1),
    ))


def _clip_image_encoder(seed: int):
    from transformers import CLIPImageProcessorPil, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    # 16 px images in 4 px patches: 16 + 1 image-context tokens (the real one's 257)
    cfg = CLIPVisionConfig(hidden_size=8, projection_dim=8, num_hidden_layers=2, num_attention_heads=2, image_size=16,
                           intermediate_size=16, patch_size=4)
    return CLIPVisionModelWithProjection(cfg).eval(), CLIPImageProcessorPil(crop_size=16, size=16)


def tiny_wan_i2v(tokenizer_dir: str | Path, seed: int = 0):
    """Wan 2.1 image-to-video (``WanImageToVideoPipeline``): CLIP image tokens (17 here) enter every
    cross-attention as extra keys (``add_k_proj``) in a separate attention call before the text one; the
    first frame's latents are concatenated to the noise along channels (36 in)."""
    from diffusers import WanImageToVideoPipeline

    encoder, processor = _clip_image_encoder(seed + 4)
    return _done(WanImageToVideoPipeline(
        transformer=tiny_wan_transformer(seed, in_channels=36, image_dim=8), vae=_vae(seed + 2),
        scheduler=_scheduler(), image_encoder=encoder, image_processor=processor, **_text(tokenizer_dir, seed + 1),
    ))


def tiny_wan22_i2v(tokenizer_dir: str | Path, seed: int = 0, boundary_ratio: float = 0.875):
    """Wan 2.2 A14B image-to-video: two experts as :func:`tiny_wan22`, no image encoder (the image is
    latent-concatenated only)."""
    from diffusers import WanImageToVideoPipeline

    return _done(WanImageToVideoPipeline(
        transformer=tiny_wan_transformer(seed, in_channels=36), transformer_2=tiny_wan_transformer(seed + 3, in_channels=36),
        vae=_vae(seed + 2), scheduler=_scheduler(), image_encoder=None, image_processor=None,
        boundary_ratio=boundary_ratio, **_text(tokenizer_dir, seed + 1),
    ))


def tiny_wan22_ti2v(tokenizer_dir: str | Path, seed: int = 0, image: bool = False):
    """Wan 2.2 TI2V-5B: one transformer on the 48-channel, 16x VAE, a timestep per token
    (``expand_timesteps``). ``image=True`` gives its ``WanImageToVideoPipeline`` (the first latent frame is
    the image's, at timestep 0), else ``WanPipeline``. 9 frames of 64x96 px are 3 token frames of 2x3."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    parts = dict(transformer=tiny_wan_transformer(seed, in_channels=48, out_channels=48), vae=_vae(seed + 2, ti2v=True),
                 scheduler=_scheduler(), expand_timesteps=True, **_text(tokenizer_dir, seed + 1))
    if image:
        return _done(WanImageToVideoPipeline(image_encoder=None, image_processor=None, **parts))
    return _done(WanPipeline(**parts))
