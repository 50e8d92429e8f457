"""HunyuanVideo 1.5 (``HunyuanVideo15Pipeline``, ``HunyuanVideo15ImageToVideoPipeline``): a Qwen2.5-VL text
model in its chat template, a ByT5 glyph encoder for the prompt's quoted text, a SigLIP vision encoder
(image to video), a ``HunyuanVideo15Transformer3DModel`` (dual-stream blocks only) and the causal 3D VAE
(16x spatial, 4x temporal).

The pipelines cut the chat template's first 108 tokens (system turn and ``<|im_start|>user\\n``) off the
Qwen output by count (``prompt_template_encode_start_idx``). The Qwen tokenizer built here learns every
word of that template as one token, as the real Qwen2 vocabulary has them, so the count is 108 here too.
"""

from __future__ import annotations

from pathlib import Path

import torch

from daamkit.testing.families.qwenimage import qwen_tokenizer


def hunyuan_video15_template() -> str:
    """The chat text the pipelines encode, with ``{}`` for the prompt."""
    import inspect

    from diffusers.pipelines.hunyuan_video1_5.pipeline_hunyuan_video1_5 import HunyuanVideo15Pipeline

    system = inspect.signature(HunyuanVideo15Pipeline._get_mllm_prompt_embeds).parameters["system_message"].default
    return f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{{}}<|im_end|>\n<|im_start|>assistant\n"


def hunyuan_qwen_tokenizer(out_dir: str | Path):
    """The Qwen2.5-VL tokenizer of HunyuanVideo 1.5 with the pipelines' chat template learnt."""
    return qwen_tokenizer(out_dir, templates=(hunyuan_video15_template(),))


def _components(qwen_dir: str | Path, seed: int, image_embed_dim: int) -> dict:
    from diffusers import (
        AutoencoderKLHunyuanVideo15,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideo15Transformer3DModel,
    )
    from diffusers.guiders import ClassifierFreeGuidance
    from transformers import (
        ByT5Tokenizer,
        Qwen2_5_VLTextConfig,
        Qwen2_5_VLTextModel,
        Qwen2Tokenizer,
        T5Config,
        T5EncoderModel,
    )

    tokenizer = Qwen2Tokenizer.from_pretrained(str(qwen_dir))
    torch.manual_seed(seed)
    transformer = HunyuanVideo15Transformer3DModel(
        in_channels=9,  # latents, the conditioning frame's latents, its mask
        out_channels=4,
        num_attention_heads=4,
        attention_head_dim=8,
        num_layers=2,
        num_refiner_layers=1,
        mlp_ratio=2.0,
        patch_size=1,
        patch_size_t=1,
        text_embed_dim=16,
        text_embed_2_dim=32,
        image_embed_dim=image_embed_dim,
        rope_axes_dim=(2, 2, 4),
        target_size=64,
        task_type="t2v",
    ).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLHunyuanVideo15(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8, 8, 8, 8),
        layers_per_block=1,
        spatial_compression_ratio=16,
        temporal_compression_ratio=4,
        downsample_match_channel=False,
        upsample_match_channel=False,
    ).eval()
    torch.manual_seed(seed + 2)
    text_encoder = Qwen2_5_VLTextModel(
        Qwen2_5_VLTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=16,
            num_hidden_layers=3,  # the pipeline reads the third hidden state from the end
            num_attention_heads=2,
            num_key_value_heads=2,
            rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
            rope_theta=1000000.0,
            bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
            eos_token_id=tokenizer.eos_token_id,
        )
    ).eval()
    tokenizer_2 = ByT5Tokenizer()
    torch.manual_seed(seed + 3)
    text_encoder_2 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_2),
            d_model=32,
            d_ff=37,
            d_kv=8,
            num_layers=2,
            num_heads=4,
            dropout_rate=0.0,
            relative_attention_num_buckets=8,
        )
    ).eval()
    return dict(
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        guider=ClassifierFreeGuidance(guidance_scale=6.0),
    )


def tiny_hunyuan_video15(qwen_dir: str | Path, seed: int = 0):
    """``HunyuanVideo15Pipeline`` at test size: 2 dual-stream blocks (4 heads of 8), a 1-layer token
    refiner, a 3-layer Qwen2.5-VL text model, a 2-layer ByT5 (real byte tokenizer), a causal VAE with
    the real factors. The release's lengths stay: 1000 Qwen tokens, 256 ByT5, 729 image tokens."""
    from diffusers import HunyuanVideo15Pipeline

    pipe = HunyuanVideo15Pipeline(**_components(qwen_dir, seed, image_embed_dim=12))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_hunyuan_video15_i2v(qwen_dir: str | Path, seed: int = 0):
    """``HunyuanVideo15ImageToVideoPipeline``: the same parts plus a 1-layer SigLIP vision tower on 32 px
    images in 8 px patches (16 image tokens)."""
    from diffusers import HunyuanVideo15ImageToVideoPipeline
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    torch.manual_seed(seed + 4)
    image_encoder = SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=12, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8
        )
    ).eval()
    feature_extractor = SiglipImageProcessor(size={"height": 32, "width": 32})
    pipe = HunyuanVideo15ImageToVideoPipeline(
        **_components(qwen_dir, seed, image_embed_dim=12), image_encoder=image_encoder, feature_extractor=feature_extractor
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
