"""The command line of ``daamkit world train``: every option of :class:`daamkit.world.train.Recipe`
as an argparse option, and the calls that turn parsed options into a training run.

The trainer (:mod:`daamkit.world.train`) takes a :class:`Recipe` and never sees argparse."""

from __future__ import annotations

import argparse

from daamkit.world.train import PHASES, SESSION_OPTIONS, Recipe, flag, option_names, train

# Where the parser notes which options were given on the command line (see _NotedStore).
GIVEN = "given_options"


def _note_given(namespace, dest: str) -> None:
    setattr(namespace, GIVEN, sorted({*getattr(namespace, GIVEN, ()), dest}))


class _NotedStore(argparse.Action):
    """argparse's plain store, which also notes the option under ``args.given_options``: on --resume
    an option given again replaces the recorded one, while one left out keeps it, even where the
    recorded value is not today's default (a default can change between a run's start and its
    resume)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        _note_given(namespace, self.dest)


class _NotedBool(argparse.BooleanOptionalAction):
    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        _note_given(namespace, self.dest)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the options of ``daamkit world train`` to ``p``, with the defaults of :class:`Recipe`."""
    d = Recipe()
    p.register("action", None, _NotedStore)
    p.register("action", "store", _NotedStore)
    p.add_argument("--out", default=d.out, help="working folder (checkpoints, logs, samples)")
    p.add_argument("--export-to", default=d.export_to, help="pipeline folder to write (default OUT/model)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoints in --out with the options recorded in its args.json; an "
        "option given again replaces the recorded one from then on (noted in args.json under "
        "changed_on_resume), except the architecture's, which cannot change. "
        + ", ".join(flag(k) for k in SESSION_OPTIONS if k != "resume")
        + " are this call's own",
    )
    p.add_argument("--only", choices=PHASES, default=d.only, help="run a single phase (with --resume)")
    p.add_argument("--threads", type=int, default=d.threads, help="torch CPU threads")
    p.add_argument(
        "--unet-workers",
        type=int,
        default=d.unet_workers,
        help="data-parallel processes of the UNet phase on a CPU, each with --threads / N threads (they "
        "compute parts of the same batch, so the recipe does not change). Default: one per thread, as "
        "many as divide --batch; about 1.4x the steps per minute of one process on 2 cores",
    )
    p.add_argument(
        "--data-workers",
        type=int,
        default=d.data_workers,
        help="processes that render the training scenes and their grounding targets (the same data at "
        "any count). Default: one per --threads",
    )
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument(
        "--device",
        default=d.device,
        help="torch device of the latents and UNet phases (e.g. cuda); the recipe's budgets and timings "
        "are for 2 CPU cores",
    )
    p.add_argument("--data-seed", type=int, default=d.data_seed, help="first scene seed of the training set")
    p.add_argument("--dataset-size", type=int, default=d.dataset_size)
    p.add_argument("--ckpt-minutes", type=float, default=d.ckpt_minutes)
    p.add_argument(
        "--sample-steps", type=int, default=d.sample_steps, help="steps of the sample grid after export (0: none)"
    )
    # VAE
    p.add_argument(
        "--latent-channels",
        type=int,
        default=d.latent_channels,
        help="channels of the 16 x 16 latent (more: a sharper autoencoder at little UNet cost)",
    )
    p.add_argument(
        "--vae-from",
        default=d.vae_from,
        metavar="MODEL",
        help="take a trained autoencoder (encoder, decoder and scaling factor) instead of training one: "
        "`shipped` (the shipped model's), a diffusers pipeline folder or an AutoencoderKL folder. The "
        "vae and decoder phases are then skipped; a UNet trained so pairs with that autoencoder as is. "
        "With no decoder beside it the UNet has every thread from its first step, so in the same "
        "--unet-minutes it makes more steps than a default run: to compare step for step, cap them with "
        "--unet-steps",
    )
    p.add_argument("--vae-channels", default=d.vae_channels)
    p.add_argument("--vae-layers", type=int, default=d.vae_layers)
    p.add_argument("--vae-groups", type=int, default=d.vae_groups, help="GroupNorm groups in the VAE")
    p.add_argument("--vae-steps", type=int, default=d.vae_steps)
    p.add_argument("--vae-minutes", type=float, default=d.vae_minutes)
    p.add_argument("--vae-batch", type=int, default=d.vae_batch)
    p.add_argument("--vae-lr", type=float, default=d.vae_lr)
    p.add_argument("--vae-kl", type=float, default=d.vae_kl, help="KL weight (per latent element)")
    p.add_argument("--vae-edge", type=float, default=d.vae_edge, help="weight of the image-gradient L1 term")
    p.add_argument(
        "--decoder-minutes",
        type=float,
        default=d.decoder_minutes,
        help="fine-tune the decoder alone on the cached latents (0: skip); see --decoder-alongside",
    )
    p.add_argument(
        "--decoder-alongside",
        action=_NotedBool,
        default=d.decoder_alongside,
        help="run the decoder phase in a second process while the UNet phase trains (the UNet lends it "
        "one of its --threads until it ends). Default: on with --threads 2 or more, or a non-CPU "
        "--device; that is how a complete run fits about 2 hours on 2 cores",
    )
    p.add_argument("--decoder-lr", type=float, default=d.decoder_lr)
    p.add_argument("--decoder-steps", type=int, default=d.decoder_steps)
    # UNet + text encoder
    p.add_argument("--unet-channels", default=d.unet_channels)
    p.add_argument("--unet-layers", type=int, default=d.unet_layers)
    p.add_argument("--unet-groups", type=int, default=d.unet_groups, help="GroupNorm groups in the UNet")
    p.add_argument("--heads", type=int, default=d.heads, help="attention heads in every UNet attention layer")
    p.add_argument("--text-width", type=int, default=d.text_width)
    p.add_argument(
        "--text-layers",
        type=int,
        default=d.text_layers,
        help="CLIP encoder layers (0 = token + position embeddings only); see docs/model_card.md",
    )
    p.add_argument("--unet-steps", type=int, default=d.unet_steps)
    p.add_argument(
        "--unet-minutes",
        type=float,
        default=d.unet_minutes,
        help="UNet phase time budget; with the default, bf16 autocast and the decoder alongside, a "
        "whole run fits about 2 hours on 2 cores (docs/model_card.md)",
    )
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--final-lr-ratio", type=float, default=d.final_lr_ratio)
    p.add_argument("--text-lr-mult", type=float, default=d.text_lr_mult)
    p.add_argument("--uncond-prob", type=float, default=d.uncond_prob)
    p.add_argument("--min-snr", type=float, default=d.min_snr)
    p.add_argument(
        "--object-weight",
        type=float,
        default=d.object_weight,
        help="extra loss weight on latent cells covered by objects",
    )
    p.add_argument("--ema", type=float, default=d.ema)
    p.add_argument(
        "--bf16",
        action=_NotedBool,
        default=d.bf16,
        help="bfloat16 autocast for the UNet phase's forward pass (weights and optimiser stay float32); "
        "about 1.25x the steps per minute on a CPU with AVX512-BF16 or AMX. Default: on where the "
        "device has native bfloat16 (see bf16_native), off elsewhere, where emulation would be slower",
    )
    p.add_argument(
        "--ground-weight",
        type=float,
        default=d.ground_weight,
        help="weight of the cross-attention grounding loss (0: plain denoising loss)",
    )
    p.add_argument(
        "--object-count-weights",
        default=d.object_count_weights,
        help="relative sampling weights of training scenes with 1, 2 and 3 objects (UNet phase); "
        "the default favours crowded scenes, where shapes go wrong; 1,1,1 draws uniformly",
    )
    p.add_argument(
        "--timestep-focus",
        default=d.timestep_focus,
        help="LO,HI,SHARE: draw SHARE of each UNet batch's timesteps uniformly from [LO, HI) and the "
        "rest from [0, 1000). The default puts 67%% of the samples at the moderate noise levels where "
        "small objects' shapes are decided; an empty value draws all from [0, 1000)",
    )
    return p


def recipe_from_args(args: argparse.Namespace) -> Recipe:
    """The :class:`Recipe` of options parsed with :func:`add_arguments` (other attributes, such as
    the CLI's dispatch function, are left out)."""
    return Recipe(**{k: getattr(args, k) for k in option_names()})


def given_options(args: argparse.Namespace) -> set[str]:
    """The options given on the command line (noted by the parser of :func:`add_arguments`)."""
    return set(getattr(args, GIVEN, ()))


def main_from_args(args: argparse.Namespace) -> int:
    """Train with options parsed by :func:`add_arguments`; returns an exit status."""
    return train(recipe_from_args(args), given=given_options(args))
