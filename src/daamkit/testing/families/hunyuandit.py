"""HunyuanDiT (``HunyuanDiTPipeline``): ``HunyuanDiT2DModel`` with two text encoders, a bilingual BERT (CLIP-style,
WordPiece, 77 tokens) and mT5 (sentencepiece, 256 tokens), whose states are concatenated as cross-attention keys.

The BERT tokenizer is a WordPiece vocabulary trained here on sentences of
:data:`daamkit.testing.tokenizers.T5_WORDS`, laid out like Chinese BERT's ``vocab.txt`` (``[PAD]`` 0,
``[unused1..99]``, ``[UNK]`` 100, ``[CLS]`` 101, ``[SEP]`` 102, ``[MASK]`` 103, lower-casing). The mT5 tokenizer is
:func:`daamkit.testing.tokenizers.t5_tokenizer` (mT5 uses T5's sentencepiece code path and ids ``<pad>`` 0, ``</s>`` 1)
trained with capitalised words too, since HunyuanDiT hands the prompt to mT5 without lower-casing it.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import torch

from daamkit.testing.tokenizers import T5_WORDS

_BERT_HEAD = ["[PAD]"] + [f"[unused{i}]" for i in range(1, 100)] + ["[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def bert_tokenizer(
    out_dir: str | Path,
    words: Sequence[str] = T5_WORDS,
    sentences: int = 600,
    vocab_size: int = 300,
    model_max_length: int = 77,
):
    """A fast ``BertTokenizer`` (WordPiece, lower-casing, real ``[CLS]``/``[SEP]``/``[PAD]`` ids) saved to ``out_dir``."""
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizer

    rng = random.Random(0)
    sents = [
        " ".join(rng.choice(words) for _ in range(rng.randint(3, 10))) + rng.choice((".", ",", "!", ""))
        for _ in range(sentences)
    ]
    trainer = BertWordPieceTokenizer(lowercase=True)
    trainer.train_from_iterator(sents, vocab_size=vocab_size, special_tokens=_BERT_HEAD, show_progress=False)
    learned = sorted(trainer.get_vocab().items(), key=lambda kv: kv[1])
    vocab = {t: i for i, t in enumerate(_BERT_HEAD)}
    for token, _ in learned:
        vocab.setdefault(token, len(vocab))
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / "vocab.txt").write_text("".join(t + "\n" for t in vocab), encoding="utf-8")
    tok = BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=model_max_length)
    tok.save_pretrained(str(d))
    return tok


def mt5_tokenizer(out_dir: str | Path, words: Sequence[str] = T5_WORDS, model_max_length: int = 256):
    """T5's sentencepiece path (as mT5's tokenizer) trained on ``words`` and their capitalised forms."""
    from daamkit.testing.tokenizers import t5_tokenizer

    cased = [*words, *(w.capitalize() for w in words)]
    return t5_tokenizer(out_dir, model_max_length=model_max_length, words=cased, sentences=1200, vocab_size=200)


def tiny_hunyuandit(bert_dir: str, mt5_dir: str, seed: int = 0, use_style_cond_and_image_meta_size: bool = True):
    """A ``HunyuanDiTPipeline`` at test size.

    4 blocks, so that the U-Net-like long skip (blocks past the middle take ``skip=``) is present; patch 2; an
    8x-downsampling VAE, because the pipeline sizes the image RoPE grid as ``height // 8 // patch_size`` whatever
    the VAE. ``text_len``/``text_len_t5`` stay 77/256: the learned padding embedding and the T5 attention pool
    are sized by them and the pipeline always pads to these lengths.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, HunyuanDiT2DModel, HunyuanDiTPipeline
    from transformers import BertConfig, BertModel, BertTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

    tokenizer = BertTokenizer.from_pretrained(bert_dir)
    tokenizer_2 = T5TokenizerFast.from_pretrained(mt5_dir)
    torch.manual_seed(seed)
    transformer = HunyuanDiT2DModel(
        sample_size=16, num_layers=4, patch_size=2, attention_head_dim=8, num_attention_heads=3, in_channels=4,
        cross_attention_dim=32, cross_attention_dim_t5=32, pooled_projection_dim=16, hidden_size=24,
        activation_fn="gelu-approximate", text_len=77, text_len_t5=256,
        use_style_cond_and_image_meta_size=use_style_cond_and_image_meta_size,
    ).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        block_out_channels=(8, 8, 8, 8), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=4, layers_per_block=1,
        sample_size=128,
    ).eval()
    torch.manual_seed(seed + 2)
    text_encoder = BertModel(
        BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                   intermediate_size=37, max_position_embeddings=512, pad_token_id=0),
        add_pooling_layer=False,
    ).eval()
    torch.manual_seed(seed + 3)
    text_encoder_2 = T5EncoderModel(
        T5Config(vocab_size=max(len(tokenizer_2), 32), d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                 dropout_rate=0.0, relative_attention_num_buckets=8, decoder_start_token_id=0)
    ).eval()
    pipe = HunyuanDiTPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer,
        scheduler=DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.018,
                                clip_sample=False, steps_offset=1),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
