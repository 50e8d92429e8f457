"""CogView4 (``CogView4Pipeline``): a GLM-4 text encoder and a ``CogView4Transformer2DModel``, built offline.

The GLM-4 tokenizer is tiktoken-style byte-level BPE; ``add_special_tokens=True`` prefixes ``[gMASK]<sop>``
and the pipeline left-pads the ids to a multiple of 16 itself, so the tiny tokenizer keeps both.
"""

from __future__ import annotations

from pathlib import Path

import torch

from daamkit.testing.families._lm_tokenizers import byte_level_bpe, training_sentences

# GLM-4's special tokens in id order (151329...151342 in the real vocabulary).
GLM4_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
)

# glm-4-9b-chat's template without its tool-description branch (CogView4 never applies a chat template).
GLM4_CHAT_TEMPLATE = (
    "[gMASK]<sop>{% for item in messages %}{% if item['content'] %}<|{{ item['role'] }}|>{{ item['metadata'] }}\n"
    "{{ item['content'] }}{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def glm4_tokenizer(out_dir: str | Path, model_max_length: int = 128000):
    """A GLM-4-style fast tokenizer (byte-level BPE, ``[gMASK]<sop>`` prefix, left padding with
    ``<|endoftext|>``), saved to ``out_dir``; ``AutoTokenizer.from_pretrained(out_dir)`` loads it."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = byte_level_bpe(training_sentences(), GLM4_SPECIAL_TOKENS)
    prefix = [("[gMASK]", tok.token_to_id("[gMASK]")), ("<sop>", tok.token_to_id("<sop>"))]
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="[gMASK]:0 <sop>:0 $A:0", pair="[gMASK]:0 <sop>:0 $A:0 $B:1", special_tokens=prefix
            ),
        ]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(GLM4_SPECIAL_TOKENS[1:]),
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
        chat_template=GLM4_CHAT_TEMPLATE,
    )
    fast.save_pretrained(str(out_dir))
    return fast


def tiny_cogview4(tokenizer_dir: str | Path, seed: int = 0):
    """``CogView4Pipeline`` at diffusers' test size: 2 transformer blocks, a 2-layer ``GlmModel``, a one-block
    VAE (``vae_scale_factor`` 1, so a 32x32 image is a 16x16 token grid at patch size 2)."""
    from diffusers import (
        AutoencoderKL,
        CogView4Pipeline,
        CogView4Transformer2DModel,
        FlowMatchEulerDiscreteScheduler,
    )
    from transformers import AutoTokenizer, GlmConfig, GlmModel

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    transformer = CogView4Transformer2DModel(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        text_embed_dim=32,
        time_embed_dim=8,
        condition_dim=4,
        sample_size=16,
    )
    torch.manual_seed(seed + 1)
    text_encoder = GlmModel(
        GlmConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
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
        scaling_factor=1.5035,
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        base_shift=0.25, max_shift=0.75, base_image_seq_len=256, use_dynamic_shifting=True, time_shift_type="linear"
    )
    pipe = CogView4Pipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
