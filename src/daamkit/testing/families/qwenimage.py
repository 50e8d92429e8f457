"""Qwen-Image: tiny offline ``QwenImagePipeline`` and ``QwenImageEditPipeline``, and Qwen tokenizers.

Both pipelines share one denoiser, ``QwenImageTransformer2DModel`` (double-stream MMDiT blocks only), and
encode the prompt with Qwen2.5-VL inside a fixed chat template whose system part (34 tokens for text to
image, 64 for edit with the real tokenizer) the pipeline drops by *count*
(``prompt_template_encode_start_idx``). The tokenizer built here is therefore trained so that every
word of those templates is one token, as in the real Qwen2 BPE: the count then drops exactly the system
part, as it does with the real model. The edit pipeline also feeds the reference image through the
Qwen2.5-VL vision tower (its ``<|image_pad|>`` tokens stay in the text stream) and through the VAE
(its latents are appended to the image sequence).
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from daamkit.testing.tokenizers import T5_WORDS

if TYPE_CHECKING:
    from diffusers import (
        AutoencoderKLQwenImage,
        QwenImageEditPipeline,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen2VLProcessor

# The Qwen2 pre-tokenizer (transformers' ``tokenization_qwen2.PRETOKENIZE_REGEX``).
QWEN_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

# Added tokens of the Qwen2.5 / Qwen2.5-VL tokenizer in id order (151643...), with their ``special`` flag.
QWEN2_5_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)

# The chat template of Qwen2-VL / Qwen2.5-VL (tokenizer and processor).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}"
)

# The prompt templates of diffusers' QwenImagePipeline and QwenImageEditPipeline (``prompt_template_encode``),
# written out here so the tokenizer learns their words without importing the pipelines.
QWENIMAGE_PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
QWENIMAGE_EDIT_PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
    "background), then explain how the user's text instruction should alter or modify the image. Generate a new "
    "image that meets the user's requirements while maintaining consistency with the original input where "
    "appropriate.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
# The system prompts of the two Qwen-Image templates above are 34 and 64 tokens long with the real tokenizer
# (the pipelines' ``prompt_template_encode_start_idx``); the tokenizer trained here gives the same counts.
QWENIMAGE_DROP = 34
QWENIMAGE_EDIT_DROP = 64


def _sentences(words: Sequence[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        s = " ".join(rng.choice(words) for _ in range(rng.randint(3, 10))) + rng.choice((".", ",", "!", ""))
        out.append(s[0].upper() + s[1:] if rng.random() < 0.3 else s)
    return out


def train_qwen_bpe(
    texts: Iterable[str], special: Sequence[str], vocab_size: int = 2000
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE ``(vocab, merges)`` trained on ``texts`` with Qwen2's pre-tokenizer.

    The texts are cut at the ``special`` tokens first, as encoding does, and the trainer runs until no pair
    is left (``vocab_size`` is only a cap), so every word of the training texts is a single token.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    cut = re.compile("|".join(re.escape(s) for s in special))
    pieces = [p for t in texts for p in cut.split(t) if p]
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(pieces, trainer)
    # the trained merges are reachable only through the tokenizer's JSON form
    merges = json.loads(tok.to_str())["model"]["merges"]
    return tok.get_vocab(), [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]


def qwen_tokenizer(
    out_dir: str | Path,
    added_tokens: Sequence[tuple[str, bool]] = QWEN2_5_ADDED_TOKENS,
    chat_template: str = QWEN2_5_VL_CHAT_TEMPLATE,
    templates: Sequence[str] = (),
    words: Sequence[str] = T5_WORDS,
    sentences: int = 400,
    eos_token: str = "<|im_end|>",
    model_max_length: int = 131072,
) -> Qwen2Tokenizer:
    """A ``Qwen2Tokenizer`` (fast, byte-level BPE) trained here, saved (``save_pretrained``) to ``out_dir``.

    The BPE part is trained on random runs of ``words`` alone and inside each of ``templates`` (strings with
    one ``{}``), so prompt words and the templates' own words are single tokens. ``added_tokens`` follow the
    BPE vocabulary in the real order (``<|endoftext|>`` first), so their ids are the real ones shifted down.
    """
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer

    sents = _sentences(words, sentences, seed=0)
    texts = sents + [" " + s for s in sents]
    for template in templates:
        texts += [template.format(s) for s in sents]
    vocab, merges = train_qwen_bpe(texts, [t for t, _ in added_tokens])
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        # the constructor adds its special tokens first: only <|endoftext|> may come before the others
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        errors="replace",
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
        model_max_length=model_max_length,
    )
    tok.add_tokens([AddedToken(t, special=s, normalized=False) for t, s in added_tokens])
    # the real tokenizer_config lists its special added tokens as additional special tokens, so that
    # all_special_ids (where a prompt inside a chat template ends) holds <|im_start|>, <|vision_end|>, ...
    tok.add_special_tokens({"extra_special_tokens": [t for t, s in added_tokens if s and t != "<|endoftext|>"]})
    tok.eos_token = eos_token
    tok.chat_template = chat_template
    base = len(vocab)
    for i, (t, _) in enumerate(added_tokens):
        if tok.convert_tokens_to_ids(t) != base + i:
            raise RuntimeError(f"{t} got id {tok.convert_tokens_to_ids(t)}, expected {base + i}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out))
    return Qwen2Tokenizer.from_pretrained(str(out))


def qwen2_5_vl_tokenizer(out_dir: str | Path) -> Qwen2Tokenizer:
    """The Qwen2.5-VL tokenizer of Qwen-Image (``Qwen2Tokenizer``) with Qwen-Image's prompt templates learnt."""
    return qwen_tokenizer(out_dir, templates=(QWENIMAGE_PROMPT_TEMPLATE, QWENIMAGE_EDIT_PROMPT_TEMPLATE))


@cache
def _offline_processor_class() -> type[Qwen2VLProcessor]:
    from transformers import Qwen2VLProcessor

    class OfflineQwen2VLProcessor(Qwen2VLProcessor):
        """``Qwen2VLProcessor`` with no video processor.

        transformers has Qwen2-VL's video processor only with torchvision, and without torchvision the
        processor's class check of that slot fails for any value. Images and text (all the edit pipeline
        uses) go through ``Qwen2VLProcessor.__call__`` unchanged.
        """

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return type(None)
            return super().check_argument_for_proper_class(argument_name, argument)

    return OfflineQwen2VLProcessor


def qwen2_5_vl_processor(
    tokenizer_dir: str | Path, min_pixels: int = 56 * 56, max_pixels: int = 112 * 112
) -> Qwen2VLProcessor:
    """A Qwen2-VL processor (PIL image processor, the tokenizer in ``tokenizer_dir``), built in memory.

    The real processor allows up to 12845056 pixels (about 1369 vision tokens for the edit pipeline's
    1024x1024 reference); ``max_pixels`` here keeps the reference at 112x112 pixels, 8x8 patches of 14 px,
    merged 2x2 into 16 ``<|image_pad|>`` tokens. It cannot be saved (``save_pretrained`` needs a video
    processor), so it is rebuilt from the tokenizer folder.
    """
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image_processor = Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)
    tokenizer = Qwen2Tokenizer.from_pretrained(str(tokenizer_dir))
    return _offline_processor_class()(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=None,
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
    )


def tiny_qwen2_5_vl(
    tokenizer: Qwen2Tokenizer, seed: int = 0, hidden: int = 16
) -> Qwen2_5_VLForConditionalGeneration:
    """A random ``Qwen2_5_VLForConditionalGeneration`` with a vision tower, sized for ``tokenizer``.

    Two text layers with grouped KV heads and M-RoPE as in the real model; two vision blocks, the second a
    full-attention block (``fullatt_block_indexes``) and the first a windowed one, as the real tower mixes.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": hidden,
            "intermediate_size": 2 * hidden,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1000000.0},
            "bos_token_id": ids("<|endoftext|>"),
            "eos_token_id": ids("<|im_end|>"),
            "pad_token_id": ids("<|endoftext|>"),
        },
        vision_config={
            "depth": 2,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": hidden,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwenimage_transformer(
    seed: int = 0, joint_attention_dim: int = 16, z_dim: int = 16
) -> QwenImageTransformer2DModel:
    """``QwenImageTransformer2DModel`` with two double-stream blocks (the only block kind it has)."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * z_dim,
        out_channels=z_dim,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=joint_attention_dim,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )


def tiny_qwenimage_vae(seed: int = 0, z_dim: int = 16) -> AutoencoderKLQwenImage:
    """``AutoencoderKLQwenImage`` with the real three downsamplings (8 px per latent), narrow channels: the edit
    pipeline encodes a 1024x1024 reference on every call, and 4 base channels keep that to a few seconds."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(
        base_dim=4,
        z_dim=z_dim,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * z_dim,
        latents_std=[1.0] * z_dim,
    )


def tiny_qwenimage(tokenizer_dir: str | Path, seed: int = 0) -> QwenImagePipeline:
    """A tiny ``QwenImagePipeline`` (fp32, CPU) driven by the tokenizer saved in ``tokenizer_dir``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    from transformers import Qwen2Tokenizer

    tokenizer = Qwen2Tokenizer.from_pretrained(str(tokenizer_dir))
    transformer = tiny_qwenimage_transformer(seed)
    vae = tiny_qwenimage_vae(seed)
    torch.manual_seed(seed)
    scheduler = FlowMatchEulerDiscreteScheduler()
    text_encoder = tiny_qwen2_5_vl(tokenizer, seed)
    return QwenImagePipeline(
        transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=text_encoder, tokenizer=tokenizer
    )


def tiny_qwenimage_edit(tokenizer_dir: str | Path, seed: int = 0) -> QwenImageEditPipeline:
    """A tiny ``QwenImageEditPipeline`` (fp32, CPU): the same components plus the Qwen2-VL processor.

    The pipeline always resizes the reference image to about 1024x1024 pixels (``calculate_dimensions``)
    before the VAE, so each call encodes a megapixel image and puts (1024/16)^2 = 4096 reference tokens
    after the generated image's tokens, whatever ``height``/``width`` are asked for.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPipeline

    processor = qwen2_5_vl_processor(tokenizer_dir)
    tokenizer = processor.tokenizer
    transformer = tiny_qwenimage_transformer(seed)
    vae = tiny_qwenimage_vae(seed)
    torch.manual_seed(seed)
    scheduler = FlowMatchEulerDiscreteScheduler()
    text_encoder = tiny_qwen2_5_vl(tokenizer, seed)
    return QwenImageEditPipeline(
        transformer=transformer,
        vae=vae,
        scheduler=scheduler,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        processor=processor,
    )
