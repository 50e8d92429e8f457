"""Lumina-Image 2.0 (``Lumina2Pipeline``): a Gemma 2 text encoder and a ``Lumina2Transformer2DModel``.

The pipeline prefixes every prompt with its system prompt and ``" <Prompt Start> "``; the tiny Gemma tokenizer
is trained with that text too, so the prefix comes out in whole words as with the real one.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from daamkit.testing.families._lm_tokenizers import sentencepiece_bpe, training_sentences

# Lumina2Pipeline.system_prompt (pipelines/lumina2/pipeline_lumina2.py) followed by the separator it adds.
LUMINA2_PROMPT_PREFIX = (
    "You are an assistant designed to generate superior images with the superior degree of image-text alignment "
    "based on textual prompts or user prompts. <Prompt Start> "
)

# gemma-2-2b-it's chat template (Lumina2 never applies it).
GEMMA_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)


def gemma_tokenizer(out_dir: str | Path, vocab_size: int = 700):
    """A ``GemmaTokenizerFast`` on a sentencepiece BPE model with byte fallback, Gemma's ids for ``<pad>`` 0,
    ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3, ``<mask>`` 4, no dummy prefix, BOS added; saved to ``out_dir``."""
    from transformers import GemmaTokenizerFast

    with tempfile.TemporaryDirectory() as tmp:
        sentencepiece_bpe(
            training_sentences(extra=(LUMINA2_PROMPT_PREFIX + "a dog",)),
            Path(tmp) / "tokenizer.model",
            vocab_size=vocab_size,
            pad=(0, "<pad>"),
            eos=(1, "<eos>"),
            bos=(2, "<bos>"),
            unk=(3, "<unk>"),
            user_defined_symbols=("<mask>", "<start_of_turn>", "<end_of_turn>"),
            add_dummy_prefix=False,
        )
        tok = GemmaTokenizerFast.from_pretrained(
            tmp,
            add_bos_token=True,
            add_eos_token=False,
            additional_special_tokens=["<start_of_turn>", "<end_of_turn>"],
            chat_template=GEMMA_CHAT_TEMPLATE,
        )
    tok.save_pretrained(str(out_dir))
    return tok


def tiny_lumina2(tokenizer_dir: str | Path, seed: int = 0):
    """``Lumina2Pipeline`` at test size: one context-refiner, one noise-refiner and two joint layers with GQA
    (4 query, 2 key/value heads), a 2-layer ``Gemma2Model``, and a 4-level VAE because the pipeline fixes
    ``vae_scale_factor`` at 8 (a 64x64 image is an 8x8 latent, a 4x4 token grid at patch size 2)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        Lumina2Pipeline,
        Lumina2Transformer2DModel,
    )
    from transformers import Gemma2Config, Gemma2Model, GemmaTokenizerFast

    tokenizer = GemmaTokenizerFast.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    transformer = Lumina2Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=32,
        num_layers=2,
        num_refiner_layers=1,
        num_attention_heads=4,
        num_kv_heads=2,
        multiple_of=16,
        ffn_dim_multiplier=None,
        norm_eps=1e-5,
        scaling_factor=1.0,
        axes_dim_rope=(4, 2, 2),
        cap_feat_dim=32,
    )
    torch.manual_seed(seed + 1)
    text_encoder = Gemma2Model(
        Gemma2Config(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=512,
            sliding_window=64,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
    ).eval()
    torch.manual_seed(seed + 2)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 4, 4, 4),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,
        sample_size=64,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=0.3611,
        shift_factor=0.1159,
    )
    pipe = Lumina2Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
