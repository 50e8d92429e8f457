"""Sana (``SanaPipeline``): linear-attention DiT (``SanaTransformer2DModel``), Gemma-2 text encoder, DC-AE VAE.

The tokenizer is a Gemma tokenizer (BPE with byte fallback, no dummy prefix, ``<bos>`` added) trained here
on sentences of :data:`daamkit.testing.tokenizers.T5_WORDS` plus the lines of Sana's default complex human
instruction, so that instruction tokenizes into words as it does with the real Gemma vocabulary. The
special tokens sit at Gemma's ids (``<pad>`` 0, ``<eos>`` 1, ``<bos>`` 2, ``<unk>`` 3, ``<mask>`` 4,
``<start_of_turn>`` 106, ``<end_of_turn>`` 107, ``\\n`` 108) and gemma-2-it's chat template is attached.
"""

from __future__ import annotations

import inspect
import io
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from daamkit.testing.tokenizers import T5_WORDS

# gemma-2-2b-it's chat template (Sana itself does not apply it; kept so the tokenizer is the real one's double)
GEMMA2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)

# Gemma's ids 4..108: <mask>, then placeholders up to the turn markers and the newline piece
_GEMMA_USER_SYMBOLS = (
    ["<mask>", "[@BOS@]"] + [f"<unused{i}>" for i in range(100)] + ["<start_of_turn>", "<end_of_turn>", "\n"]
)


def sana_complex_human_instruction() -> list[str]:
    """The default ``complex_human_instruction`` of ``SanaPipeline.__call__`` (read from the installed diffusers)."""
    from diffusers import SanaPipeline

    return list(inspect.signature(SanaPipeline.__call__).parameters["complex_human_instruction"].default)


def gemma_tokenizer(
    out_dir: str | Path,
    words: Sequence[str] = T5_WORDS,
    extra_text: Sequence[str] | None = None,
    sentences: int = 600,
    vocab_size: int = 700,
):
    """A fast ``GemmaTokenizer`` (sentencepiece BPE, byte fallback, Gemma's special ids) saved to ``out_dir``.

    Trained on ``sentences`` random runs of ``words`` plus ``extra_text`` (default: Sana's complex human
    instruction lines). Pieces never cross a space, so ``" dog"`` is the single piece ``"▁dog"``.
    """
    import sentencepiece as spm
    from tokenizers.models import BPE
    from transformers import GemmaTokenizer
    from transformers.convert_slow_tokenizer import SentencePieceExtractor

    rng = random.Random(0)
    sents = [
        " ".join(rng.choice(words) for _ in range(rng.randint(3, 10))) + rng.choice((".", ",", "!", ""))
        for _ in range(sentences)
    ]
    sents += list(sana_complex_human_instruction() if extra_text is None else extra_text)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sents),
        model_writer=model,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type="bpe",
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=_GEMMA_USER_SYMBOLS,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        character_coverage=1.0,
        minloglevel=2,
        num_threads=1,
    )
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    spm_path = d / "tokenizer.model"
    spm_path.write_bytes(model.getvalue())
    parts = SentencePieceExtractor(str(spm_path)).extract(BPE)
    tok = GemmaTokenizer(
        vocab=parts["vocab"],
        merges=parts["merges"],
        add_bos_token=True,
        add_eos_token=False,
        extra_special_tokens=["<start_of_turn>", "<end_of_turn>"],
        chat_template=GEMMA2_CHAT_TEMPLATE,
    )
    spm_path.unlink()  # the fast tokenizer.json is the tokenizer; a stale spm file would invite the slow path
    tok.save_pretrained(str(d))
    return tok


def tiny_sana(tokenizer_dir: str, seed: int = 0, qk_norm: str | None = None):
    """A ``SanaPipeline`` at test size: 2 blocks (linear self-attention + SDPA cross-attention each), patch 1,
    a 2-block DC-AE (8 px per latent side), 2-layer Gemma-2 (one sliding, one global layer).

    ``qk_norm="rms_norm_across_heads"`` gives Sana 1.5's q/k norms in both attentions.
    """
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline, SanaTransformer2DModel
    from transformers import Gemma2Config, Gemma2Model, GemmaTokenizer

    tokenizer = GemmaTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(seed)
    transformer = SanaTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=2, num_attention_heads=2, attention_head_dim=8,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=32,
        sample_size=32, qk_norm=qk_norm,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"), decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
        encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
        downsample_block_type="conv", upsample_block_type="interpolate",
        decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407,
    )
    torch.manual_seed(seed + 2)
    text_encoder = Gemma2Model(
        Gemma2Config(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=8192,
            sliding_window=64, pad_token_id=0, eos_token_id=1, bos_token_id=2, attn_implementation="eager",
        )
    ).eval()
    # Sana's released scheduler: DPM-Solver++ on flow sigmas
    scheduler = DPMSolverMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0, beta_schedule="linear"
    )
    pipe = SanaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
