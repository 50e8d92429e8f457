"""HunyuanVideo (``HunyuanVideoPipeline``): a Llama 3 text encoder (LLaVA-Llama-3 in the release) whose
prompt sits in a fixed template, CLIP-L for a pooled vector, a ``HunyuanVideoTransformer3DModel``
(token refiner, dual-stream then single-stream blocks) and the causal 3D VAE (8x spatial, 4x temporal).

The pipeline cuts the template's first ``crop_start`` tokens (95 for the default template with the real
tokenizer) off the encoder's output by count. The Llama 3 tokenizer built here learns every word of that
template as one token, as the real vocabulary has them, so the same count cuts exactly the template's
system part and ``<|start_header_id|>user<|end_header_id|>\\n\\n``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from daamkit.testing.families.hidream import llama3_tokenizer

# LLaVA-Llama-3 adds these after Llama 3's special tokens; the pipeline pads with <pad>.
LLAVA_LLAMA3_ADDED = ("<image>", "<pad>")


def hunyuan_video_template() -> str:
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

    return DEFAULT_PROMPT_TEMPLATE["template"]


def hunyuan_llama_tokenizer(out_dir: str | Path):
    """The Llama 3 tokenizer of HunyuanVideo, the default prompt template's words learnt as whole tokens."""
    template = hunyuan_video_template()
    return llama3_tokenizer(
        out_dir,
        extra=[template.format(""), template.format("a red dog")],
        added_tokens=LLAVA_LLAMA3_ADDED,
        pad_token="<pad>",
        vocab_size=900,
    )


def tiny_hunyuan_video(llama_dir: str | Path, clip_dir: str | Path, seed: int = 0, patch_size: int = 2):
    """``HunyuanVideoPipeline`` at test size: 1 dual-stream and 1 single-stream block (4 heads of 8), a
    1-layer token refiner, a 3-layer ``LlamaModel``, a 2-layer CLIP, a 4-block causal VAE (8x, 4x temporal)."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTokenizer,
        LlamaConfig,
        LlamaModel,
        PreTrainedTokenizerFast,
    )

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(llama_dir))
    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=4,
        attention_head_dim=8,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=patch_size,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 2, 4),
    ).eval()
    torch.manual_seed(seed + 1)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        act_fn="silu",
        norm_num_groups=4,
        scaling_factor=0.476986,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
    ).eval()
    torch.manual_seed(seed + 2)
    text_encoder = LlamaModel(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=37,
            num_hidden_layers=3,  # the pipeline reads the third hidden state from the end
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=4,
            max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    ).eval()
    torch.manual_seed(seed + 3)
    text_encoder_2 = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=2,
            hidden_size=8,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            pad_token_id=1,
            vocab_size=49408,
            projection_dim=8,
        )
    ).eval()
    pipe = HunyuanVideoPipeline(
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=CLIPTokenizer.from_pretrained(str(clip_dir)),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
