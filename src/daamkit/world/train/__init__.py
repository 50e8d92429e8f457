"""Train the shapes-world latent diffusion model from scratch on CPU.

Phases (each resumable; a finished phase is skipped on resume):

1. ``data``    render a fixed training set of scenes (train split only: no held-out pair or template;
               in ``data_workers`` processes) and tokenise its captions with the real CLIP BPE ids
               (:mod:`.data`);
2. ``vae``     train an ``AutoencoderKL`` (64 px RGB -> ``latent_channels`` x 16 x 16 latents), or take
               a trained one whole with ``vae_from`` (then phase ``decoder`` is skipped too)
               (:mod:`.autoencoder`);
3. ``latents`` encode the training set once (posterior mean and std cached);
4. ``unet``    train ``UNet2DConditionModel`` + ``CLIPTextModel`` (0 layers by default: embeddings
               only) jointly on the cached latents (epsilon prediction, min-SNR weighting, 10% caption
               dropout for classifier-free guidance, a cross-attention grounding loss, an EMA of the
               weights) (:mod:`.unet`, :mod:`.grounding`); on a CPU split over ``unet_workers``
               single-threaded data-parallel processes (by default one per thread), which give more
               steps per minute than threads do (:mod:`.workers`);
5. ``decoder`` fine-tune the VAE decoder alone on the cached latents; by default (2+ threads) in a
               second process alongside ``unet``, which lends it one thread until it ends;
6. ``export``  write a standard diffusers ``StableDiffusionPipeline`` folder (fp16 safetensors) and
               generate a sample grid through ``StableDiffusionPipeline.from_pretrained``
               (:mod:`.export`).

Everything goes under ``out`` (checkpoints, ``log.jsonl``, samples); the pipeline folder is
``<out>/model`` unless ``export_to`` says otherwise.

    >>> from daamkit.world.train import Recipe, train
    >>> train(Recipe(out="runs/world_train"))  # the shipped model's recipe  # doctest: +SKIP

``daamkit world train`` is the command line of :func:`train`. The modules import diffusers and
transformers only inside the functions that need them.
"""

from .autoencoder import load_vae, vae_source
from .data import GROUNDED_ROLES, MAX_OBJECTS, data_workers
from .driver import adopt_record, decoder_runs_alongside, train
from .export import SAMPLE_PROMPTS, export, sample_grid
from .grounding import grounded_tokens, grounding_loss
from .recipe import (
    ARCHITECTURE,
    PHASES,
    RETIRED_OPTIONS,
    SCHEDULER_KW,
    SESSION_OPTIONS,
    Recipe,
    flag,
    option_names,
    text_config,
    unet_config,
    vae_config,
)
from .unet import bf16_native, build_unet_and_text, unet_optimizer
from .workers import unet_workers

__all__ = [
    "ARCHITECTURE",
    "GROUNDED_ROLES",
    "MAX_OBJECTS",
    "PHASES",
    "RETIRED_OPTIONS",
    "SAMPLE_PROMPTS",
    "SCHEDULER_KW",
    "SESSION_OPTIONS",
    "Recipe",
    "adopt_record",
    "bf16_native",
    "build_unet_and_text",
    "data_workers",
    "decoder_runs_alongside",
    "export",
    "flag",
    "grounded_tokens",
    "grounding_loss",
    "load_vae",
    "option_names",
    "sample_grid",
    "text_config",
    "train",
    "unet_config",
    "unet_optimizer",
    "unet_workers",
    "vae_config",
    "vae_source",
]
