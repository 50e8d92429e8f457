"""Chroma: ``ChromaPipeline`` (``ChromaTransformer2DModel``, a pruned Flux with a T5 encoder and a text attention
mask), built offline at diffusers' test size.

The tokenizer is :func:`daamkit.testing.tokenizers.t5_tokenizer` (T5's code path: sentencepiece, ``</s>``,
``<pad>`` = 0, right padding); the T5 encoder is the one of :func:`daamkit.testing.pipelines.tiny_flux`.
"""

from __future__ import annotations

import torch

from daamkit.testing.pipelines import _dit_vae, _t5


def tiny_chroma_transformer(seed: int = 0):
    """``ChromaTransformer2DModel`` with one double- and one single-stream block (diffusers' test size)."""
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(seed)
    return ChromaTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8), approximator_hidden_dim=32,
        approximator_layers=1, approximator_num_channels=16,
    )


def tiny_chroma(t5_dir: str, seed: int = 0):
    """``ChromaPipeline`` with true CFG (``guidance_scale`` > 1, default 5) and no IP-Adapter image encoder.

    ``t5_dir`` comes from :func:`daamkit.testing.tokenizers.t5_tokenizer`.
    """
    from diffusers import ChromaPipeline, FlowMatchEulerDiscreteScheduler
    from transformers import T5TokenizerFast

    transformer = tiny_chroma_transformer(seed)
    text_encoder = _t5(seed + 1)
    vae = _dit_vae(latent_channels=1, seed=seed + 2)  # Chroma packs 2x2 latents like Flux: 4 channels in
    pipe = ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
        tokenizer=T5TokenizerFast.from_pretrained(t5_dir), transformer=transformer,
        image_encoder=None, feature_extractor=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
