"""HiDream-I1 (``HiDreamImagePipeline``): CLIP-L, CLIP-G, T5 and Llama 3.1 encoders and a
``HiDreamImageTransformer2DModel`` (double- and single-stream blocks with MoE feed-forwards).

CLIP and T5 reuse :mod:`daamkit.testing.tokenizers`; the Llama 3 tokenizer is byte-level BPE trained here
with Llama 3.1's special tokens (``<|begin_of_text|>`` prefix; the pipeline pads with the EOS ``<|eot_id|>``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from daamkit.testing.families._lm_tokenizers import byte_level_bpe, training_sentences

# Llama 3.1's first special tokens in id order (128000...128010 in the real vocabulary).
LLAMA3_SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
    "<|python_tag|>",
)

# Meta-Llama-3-Instruct's template (3.1 adds tool and date headers to the system turn); HiDream never applies it.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def llama3_tokenizer(
    out_dir: str | Path,
    model_max_length: int = 131072,
    extra: Sequence[str] = (),
    added_tokens: Sequence[str] = (),
    pad_token: str | None = None,
    vocab_size: int = 500,
):
    """A Llama-3.1-Instruct-style fast tokenizer (byte-level BPE, ``<|begin_of_text|>`` prefix, EOS
    ``<|eot_id|>``, no pad token, as released), saved to ``out_dir``.

    extra: fixed texts a pipeline always adds (a prompt template), learnt as whole tokens. added_tokens:
    special tokens after Llama 3.1's (a derived model's ``<image>``, ``<pad>``); pad_token: one of them.
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = byte_level_bpe(training_sentences(extra), (*LLAMA3_SPECIAL_TOKENS, *added_tokens), vocab_size=vocab_size)
    bos = ("<|begin_of_text|>", tok.token_to_id("<|begin_of_text|>"))
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single=f"{bos[0]}:0 $A:0", pair=f"{bos[0]}:0 $A:0 {bos[0]}:1 $B:1", special_tokens=[bos]
            ),
        ]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token=pad_token,
        clean_up_tokenization_spaces=True,
        model_max_length=model_max_length,
        chat_template=LLAMA3_CHAT_TEMPLATE,
    )
    fast.save_pretrained(str(out_dir))
    return fast


def _clip(seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    # HiDream pads its CLIP prompts to 128 tokens (Long-CLIP-style position table), so 77 positions are too few.
    return CLIPTextModelWithProjection(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=2,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            pad_token_id=1,
            vocab_size=49408,
            max_position_embeddings=128,
            projection_dim=32,
            hidden_act="gelu",
        )
    ).eval()


def tiny_hidream(
    clip_dir: str | Path, clip_2_dir: str | Path, t5_dir: str | Path, llama_dir: str | Path, seed: int = 0
):
    """``HiDreamImagePipeline`` at test size: 2 double-stream and 2 single-stream blocks (MoE with 4 experts,
    2 active), ``llama_layers=(0, 1, 1, 1)`` over a 2-layer ``LlamaForCausalLM``, 2-layer CLIPs and T5, a one-block
    VAE (``vae_scale_factor`` 1).

    The pipeline rescales every requested size to the area of ``default_sample_size * vae_scale_factor``
    squared (128 * 8 = 1024 px for the real model); ``default_sample_size`` is set to 32 so that a 32x32 request
    stays 32x32 (a 16x16 token grid) instead of growing to 128x128.
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        HiDreamImagePipeline,
        HiDreamImageTransformer2DModel,
    )
    from transformers import (
        CLIPTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
        T5Config,
        T5EncoderModel,
        T5TokenizerFast,
    )

    tokenizer_3 = T5TokenizerFast.from_pretrained(str(t5_dir))
    tokenizer_4 = PreTrainedTokenizerFast.from_pretrained(str(llama_dir))
    torch.manual_seed(seed)
    transformer = HiDreamImageTransformer2DModel(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_channels=[32, 32],
        text_emb_dim=64,
        num_routed_experts=4,
        num_activated_experts=2,
        axes_dims_rope=(4, 2, 2),
        max_resolution=(64, 64),
        llama_layers=(0, 1, 1, 1),
    ).eval()
    text_encoder = _clip(seed + 1)
    text_encoder_2 = _clip(seed + 2)
    torch.manual_seed(seed + 3)
    text_encoder_3 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_3),
            d_model=32,
            d_ff=37,
            d_kv=8,
            num_layers=2,
            num_heads=4,
            dropout_rate=0.0,
            relative_attention_num_buckets=8,
            decoder_start_token_id=0,
        )
    ).eval()
    torch.manual_seed(seed + 4)
    text_encoder_4 = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer_4),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            max_position_embeddings=512,
            bos_token_id=tokenizer_4.bos_token_id,
            eos_token_id=tokenizer_4.eos_token_id,
        )
    ).eval()
    torch.manual_seed(seed + 5)
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
        scaling_factor=0.3611,
        shift_factor=0.1159,
    )
    pipe = HiDreamImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer.from_pretrained(str(clip_dir)),
        text_encoder_2=text_encoder_2,
        tokenizer_2=CLIPTokenizer.from_pretrained(str(clip_2_dir)),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
        text_encoder_4=text_encoder_4,
        tokenizer_4=tokenizer_4,
        transformer=transformer,
    )
    pipe.default_sample_size = 32
    pipe.set_progress_bar_config(disable=True)
    return pipe
