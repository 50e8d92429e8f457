"""The training recipe: every option of ``daamkit world train`` with its default, and the model
configurations that follow from it."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field

PHASES = ("data", "vae", "latents", "unet", "decoder", "export")


def default_threads() -> int:
    return max(1, os.cpu_count() or 2)


@dataclass(frozen=True)
class Recipe:
    """Every option of a training run. The defaults are the shipped model's recipe (``bf16`` None:
    decided by the device, see :func:`~daamkit.world.train.unet.bf16_native`).

    The fields in :data:`SESSION_OPTIONS` are about one call on one machine; the others are the
    recipe proper, which ``--resume`` takes from the run's ``args.json``."""

    # the call and the machine
    out: str = "runs/world_train"
    export_to: str | None = None
    resume: bool = False
    only: str | None = None
    threads: int = field(default_factory=default_threads)
    unet_workers: int | None = None
    data_workers: int | None = None
    seed: int = 0
    device: str = "cpu"
    # data
    data_seed: int = 0
    dataset_size: int = 40000
    ckpt_minutes: float = 4.0
    sample_steps: int = 20
    # autoencoder
    latent_channels: int = 4
    vae_from: str | None = None
    vae_channels: str = "16,32,64"
    vae_layers: int = 1
    vae_groups: int = 4
    vae_steps: int = 100000
    vae_minutes: float = 12.0
    vae_batch: int = 8
    vae_lr: float = 1e-3
    vae_kl: float = 3e-5
    vae_edge: float = 1.0
    decoder_minutes: float = 30.0
    decoder_alongside: bool | None = None
    decoder_lr: float = 5e-4
    decoder_steps: int = 1000000
    # UNet and text encoder
    unet_channels: str = "64,128,128"
    unet_layers: int = 1
    unet_groups: int = 16
    heads: int = 4
    text_width: int = 64
    text_layers: int = 0
    unet_steps: int = 1000000
    unet_minutes: float = 95.0
    batch: int = 32
    lr: float = 1e-3
    final_lr_ratio: float = 0.05
    text_lr_mult: float = 1.0
    uncond_prob: float = 0.1
    min_snr: float = 5.0
    object_weight: float = 2.0
    ema: float = 0.998
    bf16: bool | None = None
    ground_weight: float = 0.2
    object_count_weights: str = "1,2,3"
    timestep_focus: str = "100,450,0.5"

    def replace(self, **changes) -> Recipe:
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check(self) -> None:
        """Raise ValueError for an option value the run could not use, before anything is written."""
        at_least = {
            1: ("threads", "dataset_size", "latent_channels", "vae_layers", "vae_groups", "vae_batch", "vae_steps",
                "decoder_steps", "unet_layers", "unet_groups", "heads", "text_width", "unet_steps", "batch",
                "unet_workers", "data_workers"),
            0: ("seed", "data_seed", "sample_steps", "text_layers"),
        }
        for low, names in at_least.items():
            for name in names:
                value = getattr(self, name)
                if value is not None and value < low:
                    raise ValueError(f"{flag(name)} must be at least {low}, got {value}")
        for name in ("ckpt_minutes", "vae_minutes", "decoder_minutes", "unet_minutes", "vae_kl", "vae_edge",
                     "final_lr_ratio", "text_lr_mult", "min_snr", "object_weight", "ground_weight"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{flag(name)} must be a finite number of at least 0, got {value}")
        for name in ("vae_lr", "lr", "decoder_lr"):
            value = getattr(self, name)
            if not math.isfinite(value) or value <= 0:
                raise ValueError(f"{flag(name)} must be a finite number above 0, got {value}")
        for name in ("uncond_prob", "ema"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise ValueError(f"{flag(name)} must lie in [0, 1], got {value}")
        for name in ("vae_channels", "unet_channels"):
            try:
                channels = _channels(getattr(self, name))
            except ValueError:
                channels = ()
            if not channels or min(channels) < 1:
                raise ValueError(f"{flag(name)} must be a comma list of positive channel counts, e.g. 16,32,64, "
                                 f"got {getattr(self, name)!r}")
        object_count_weights(self.object_count_weights)
        timestep_focus(self.timestep_focus)


def object_count_weights(spec: str) -> tuple[float, float, float] | None:
    """The ``object_count_weights`` option as (w1, w2, w3), or None for uniform sampling of scenes."""
    try:
        w = tuple(float(x) for x in str(spec).split(","))
    except ValueError:
        w = ()
    if len(w) != 3 or min(w) < 0 or max(w) <= 0:
        raise ValueError(
            f"--object-count-weights {spec!r}: give three non-negative weights for "
            "scenes of 1, 2 and 3 objects, not all zero, e.g. 1,2,3"
        )
    return None if w[0] == w[1] == w[2] else w


def timestep_focus(spec: str) -> tuple[int, int, float] | None:
    """The ``timestep_focus`` option (``LO,HI,SHARE`` or empty) as (lo, hi, share), or None for the
    plain uniform draw."""
    spec = str(spec or "").strip()
    if not spec:
        return None
    try:
        lo_s, hi_s, share_s = spec.split(",")
        lo, hi, share = int(lo_s), int(hi_s), float(share_s)
    except ValueError:
        lo, hi, share = 0, 0, -1.0
    if not (0 <= lo < hi <= 1000 and 0 <= share <= 1):
        raise ValueError(
            f"--timestep-focus {spec!r}: give LO,HI,SHARE with 0 <= LO < HI <= 1000 and 0 <= SHARE <= 1, "
            "e.g. 100,450,0.5"
        )
    return lo, hi, share


def option_names() -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(Recipe))


def flag(key: str) -> str:
    """The command-line spelling of option ``key``."""
    return "--" + key.replace("_", "-")


# What the trained weights' shapes depend on: checkpoints only load into the architecture they were
# trained with, so --resume refuses to change these.
ARCHITECTURE = (
    "latent_channels",
    "vae_channels",
    "vae_layers",
    "vae_groups",
    "unet_channels",
    "unet_layers",
    "unet_groups",
    "heads",
    "text_width",
    "text_layers",
)

# Options about this call and this machine, not about the model being trained: --resume always takes
# them from this call, never from the record.
SESSION_OPTIONS = (
    "out",
    "export_to",
    "resume",
    "only",
    "threads",
    "unet_workers",
    "data_workers",
    "device",
    "ckpt_minutes",
    "sample_steps",
    "decoder_alongside",
)

# Options of earlier versions, with the value at which they left training as it is now. A run recorded
# with one of them at that value resumes as usual; one that used it otherwise cannot go on the same way.
RETIRED_OPTIONS = {
    "small_object_power": 0.0,
    "position_shift": 0,
    "position_shift_from": 0.0,
    "text_identity_init": False,
    "ground_detach_text": False,
    "unet_time_norm": "default",
}


def _channels(spec: str) -> tuple[int, ...]:
    return tuple(int(c) for c in spec.split(","))


def vae_config(r: Recipe) -> dict:
    ch = _channels(r.vae_channels)
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(ch),
        up_block_types=("UpDecoderBlock2D",) * len(ch),
        block_out_channels=ch,
        layers_per_block=r.vae_layers,
        act_fn="silu",
        latent_channels=r.latent_channels,
        # few channels per group would make GroupNorm an instance norm that erases each image's
        # absolute colour levels: use few, wide groups
        norm_num_groups=r.vae_groups,
        sample_size=64,
        scaling_factor=1.0,
    )


def unet_config(r: Recipe) -> dict:
    ch = _channels(r.unet_channels)
    n = len(ch)
    return dict(
        sample_size=16,
        in_channels=r.latent_channels,
        out_channels=r.latent_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
        block_out_channels=ch,
        layers_per_block=r.unet_layers,
        cross_attention_dim=r.text_width,
        attention_head_dim=r.heads,  # diffusers' legacy name: this is the number of heads
        norm_num_groups=r.unet_groups,
    )


def text_config(r: Recipe) -> dict:
    return dict(
        vocab_size=49408,
        hidden_size=r.text_width,
        intermediate_size=r.text_width * 4,
        num_hidden_layers=r.text_layers,
        num_attention_heads=max(1, r.text_width // 32),
        max_position_embeddings=77,
        projection_dim=r.text_width,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


SCHEDULER_KW = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
)
