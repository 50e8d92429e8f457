"""AuraFlow (``AuraFlowPipeline``): a UMT5 encoder with the Pile-T5 tokenizer and an ``AuraFlowTransformer2DModel``.

Pile-T5's tokenizer is LLaMA's (sentencepiece BPE with byte fallback, ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2) loaded
as ``LlamaTokenizerFast`` that appends ``</s>`` and adds no BOS, plus 100 ``<extra_id_N>`` tokens at the end.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from daamkit.testing.families._lm_tokenizers import sentencepiece_bpe, training_sentences

# In the released vocabulary <extra_id_99> ... <extra_id_0> take the ids after the sentencepiece pieces.
PILE_T5_EXTRA_IDS = tuple(f"<extra_id_{i}>" for i in range(99, -1, -1))


def pile_t5_tokenizer(out_dir: str | Path, model_max_length: int = 512, vocab_size: int = 600):
    """A Pile-T5-style ``LlamaTokenizerFast`` (no BOS, EOS appended, right padding), saved to ``out_dir``.

    The released tokenizer's pad token is not recorded offline; ``<unk>`` (id 0) is used, the ``pad_token_id``
    of AuraFlow's UMT5 config. The pipeline zeroes padded embeddings anyway.
    """
    from transformers import LlamaTokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        sentencepiece_bpe(
            training_sentences(),
            Path(tmp) / "tokenizer.model",
            vocab_size=vocab_size,
            unk=(0, "<unk>"),
            bos=(1, "<s>"),
            eos=(2, "</s>"),
            pad=None,
            add_dummy_prefix=True,
        )
        tok = LlamaTokenizerFast.from_pretrained(
            tmp,
            add_bos_token=False,
            add_eos_token=True,
            legacy=False,
            pad_token="<unk>",
            padding_side="right",
            model_max_length=model_max_length,
            additional_special_tokens=list(PILE_T5_EXTRA_IDS),
        )
    tok.save_pretrained(str(out_dir))
    return tok


def tiny_auraflow(tokenizer_dir: str | Path, seed: int = 0):
    """``AuraFlowPipeline`` at test size: one MMDiT (joint) block and two single-stream DiT blocks, a 2-layer
    ``UMT5EncoderModel``, a one-block VAE (``vae_scale_factor`` 1: a 32x32 image is a 16x16 token grid)."""
    from diffusers import (
        AuraFlowPipeline,
        AuraFlowTransformer2DModel,
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
    )
    from transformers import LlamaTokenizerFast, UMT5Config, UMT5EncoderModel

    tokenizer = LlamaTokenizerFast.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    transformer = AuraFlowTransformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=4,
        num_mmdit_layers=1,
        num_single_dit_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=32,
        caption_projection_dim=32,
        out_channels=4,
        pos_embed_max_size=1024,
    )
    torch.manual_seed(seed + 1)
    text_encoder = UMT5EncoderModel(
        UMT5Config(
            vocab_size=len(tokenizer),
            d_model=32,
            d_ff=37,
            d_kv=8,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            dropout_rate=0.0,
            feed_forward_proj="gated-gelu",
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            decoder_start_token_id=0,
        )
    ).eval()
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=0.13025,
    )
    pipe = AuraFlowPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
