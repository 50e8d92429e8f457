"""AnimateDiff (``AnimateDiffPipeline``, ``AnimateDiffVideoToVideoPipeline``): the tiny SD 1.5 UNet of
:func:`daamkit.testing.pipelines.tiny_sd_unet` turned into a ``UNetMotionModel`` by a ``MotionAdapter``
(temporal self-attention modules after every resnet/attention pair of each block, as the released
adapters have), with the tiny SD VAE, CLIP text encoder and the real CLIP tokenizer.
"""

from __future__ import annotations

import torch

from daamkit.testing.pipelines import _scheduler, _text_config, _vae, tiny_sd_unet


def _motion_adapter(seed: int):
    from diffusers import MotionAdapter

    torch.manual_seed(seed + 3)
    return MotionAdapter(
        block_out_channels=(32, 64), motion_layers_per_block=2, motion_norm_num_groups=32,
        motion_num_attention_heads=2, motion_max_seq_length=32,
    )


def tiny_animatediff(tokenizer_dir: str, seed: int = 0, video_to_video: bool = False):
    """An ``AnimateDiffPipeline`` (or ``AnimateDiffVideoToVideoPipeline``) at test size, fp32 CPU.

    The image layers are SD 1.5's (one cross-attention down and up block); 8 px per latent side; the
    VAE decodes every latent frame to one video frame."""
    from diffusers import AnimateDiffPipeline, AnimateDiffVideoToVideoPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    unet = tiny_sd_unet(seed)
    torch.manual_seed(seed + 1)
    vae = _vae()
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(_text_config())
    cls = AnimateDiffVideoToVideoPipeline if video_to_video else AnimateDiffPipeline
    pipe = cls(
        unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=CLIPTokenizer.from_pretrained(tokenizer_dir),
        motion_adapter=_motion_adapter(seed), scheduler=_scheduler(), feature_extractor=None, image_encoder=None,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
