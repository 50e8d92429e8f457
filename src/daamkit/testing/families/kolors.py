"""Kolors (``KolorsPipeline``): an SDXL-style ``UNet2DConditionModel`` conditioned on ChatGLM3 (``ChatGLMModel``
from ``diffusers.pipelines.kolors``).

The tokenizer is diffusers' own ``ChatGLMTokenizer`` (a slow sentencepiece tokenizer) on a BPE model trained here
on sentences of :data:`daamkit.testing.tokenizers.T5_WORDS` with ChatGLM3's settings (``<unk>`` 0 = pad, ``<s>`` 1,
``</s>`` 2, byte fallback, dummy prefix); ``[MASK] [gMASK] [sMASK] sop eop`` and the role tokens follow the
sentencepiece vocabulary as in ChatGLM3, and ChatGLM3's chat template is attached.
"""

from __future__ import annotations

import io
import random
from collections.abc import Sequence
from pathlib import Path

import torch

from daamkit.testing.tokenizers import T5_WORDS

CHATGLM3_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}[gMASK]sop<|{{ message['role'] }}|>\n {{ message['content'] }}"
    "{% else %}<|{{ message['role'] }}|>\n {{ message['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def chatglm_tokenizer(
    out_dir: str | Path,
    words: Sequence[str] = T5_WORDS,
    sentences: int = 1200,
    vocab_size: int = 500,
):
    """diffusers' ``ChatGLMTokenizer`` on a sentencepiece BPE model trained here, saved to ``out_dir``."""
    import sentencepiece as spm
    from diffusers.pipelines.kolors import ChatGLMTokenizer

    # Kolors hands the prompt to ChatGLM as typed, so capitalised words must tokenize as words too
    cased = [*words, *(w.capitalize() for w in words)]
    rng = random.Random(0)
    sents = [
        " ".join(rng.choice(cased) for _ in range(rng.randint(3, 10))) + rng.choice((".", ",", "!", ""))
        for _ in range(sentences)
    ]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sents),
        model_writer=model,
        vocab_size=vocab_size,
        hard_vocab_limit=False,
        model_type="bpe",
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        character_coverage=1.0,
        minloglevel=2,
        num_threads=1,
    )
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    (d / "tokenizer.model").write_bytes(model.getvalue())
    tok = ChatGLMTokenizer(vocab_file=str(d / "tokenizer.model"), chat_template=CHATGLM3_CHAT_TEMPLATE)
    tok.save_pretrained(str(d))
    return tok


def tiny_kolors(tokenizer_dir: str, seed: int = 0, force_zeros_for_empty_prompt: bool = False):
    """A ``KolorsPipeline`` at test size.

    The UNet is diffusers' SDXL test UNet with Kolors' text path: ChatGLM states (hidden 32 here, 4096 in Kolors)
    are projected to ``cross_attention_dim`` by ``encoder_hid_proj`` (``encoder_hid_dim_type="text_proj"``), and
    the pooled state enters the ``text_time`` added embedding. ChatGLM has 2 layers (Kolors takes the
    penultimate hidden state, so there must be at least 2).
    """
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, KolorsPipeline, UNet2DConditionModel
    from diffusers.pipelines.kolors import ChatGLMModel, ChatGLMTokenizer
    from diffusers.pipelines.kolors.text_encoder import ChatGLMConfig, RMSNorm

    tokenizer = ChatGLMTokenizer.from_pretrained(tokenizer_dir)
    hidden = 32
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=32, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=6 * 8 + hidden, cross_attention_dim=64,
        encoder_hid_dim=hidden, encoder_hid_dim_type="text_proj", norm_num_groups=1,
    )
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(
        block_out_channels=(32, 64), in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), latent_channels=4, sample_size=128,
    )
    torch.manual_seed(seed + 2)
    text_encoder = ChatGLMModel(
        ChatGLMConfig(
            num_layers=2, padded_vocab_size=tokenizer.vocab_size, hidden_size=hidden, ffn_hidden_size=37,
            kv_channels=8, num_attention_heads=4, seq_length=512, multi_query_attention=True, multi_query_group_num=2,
            add_qkv_bias=True, original_rope=True, torch_dtype="float32",
        ),
        empty_init=False,  # the default skips init and leaves the weights as uninitialised memory
    ).eval()
    with torch.no_grad():  # ChatGLM's RMSNorm allocates its weight with torch.empty even then
        for m in text_encoder.modules():
            if isinstance(m, RMSNorm):
                m.weight.fill_(1.0)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.014, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading",
    )
    pipe = KolorsPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
