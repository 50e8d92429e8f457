"""Explain an existing image: noise it with the pipeline's own image-to-image machinery and trace the
denoising back toward it, so photos and images made elsewhere get per-word maps too.

```python
from daamkit.jobs.explain import explain

result = explain(pipe, "photo.png", "a dog on a bench", strength=0.5)
result.heat_maps.word("dog")           # GlobalHeatMap of the traced denoising
result.record(model="...")             # a RunRecord whose image is the photo as given
```

Two ways to reach a noisy start:

* ``inversion=None`` (default): diffusers' image-to-image pipeline of the same family, built from the
  pipeline's own components (``AutoPipelineForImage2Image.from_pipe``, nothing loaded), adds seeded
  noise at ``strength`` (DDPM-style for UNets, the flow schedule for flow-matching transformers) and
  denoises ``int(steps * strength)`` steps.
* ``inversion="ddim"`` (Stable Diffusion 1.x/2.x UNets with an epsilon-predicting model and a scheduler
  DDIM can stand in for): the image's latents are walked up the same DDIM schedule deterministically
  (DDIM inversion, conditioned on the prompt) and the regeneration from the inverted latents is traced
  with a DDIM scheduler. No random noise is drawn, so the regeneration retraces the image closely.

What the maps mean: they show how the model *would* denoise this image toward this prompt, not how the
image was made (a photo was never denoised at all). Low strength keeps the image but leaves few,
nearly clean steps whose attention is weak and local; high strength gives the model room to attend
but lets it drift from the image (:attr:`ExplainResult.regenerated` shows where it went).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image
import torch

from daamkit.errors import InputError
from daamkit.heatmap import GlobalHeatMap
from daamkit.io.record import RunRecord
from daamkit.methods.base import jsonable

INVERSIONS = ("ddim",)

__all__ = ["INVERSIONS", "ExplainResult", "check_strength", "explain", "image_pipeline", "load_image"]


@dataclass
class ExplainResult:
    """What :func:`explain` traced and what it used."""

    heat_maps: GlobalHeatMap
    image: PIL.Image.Image  # the image explained, as given (RGB)
    regenerated: PIL.Image.Image  # where the traced denoising ended
    prompt: str
    settings: dict[str, Any]  # strength, inversion, steps, traced steps, timesteps, scheduler, seed, ...
    negative_prompt: str | None = None
    methods: dict[str, GlobalHeatMap] = field(default_factory=dict)  # other methods' maps ("ovam")

    def record(self, model: str | None = None) -> RunRecord:
        """A :class:`RunRecord` of the explained image (not the regeneration) and its maps."""
        return RunRecord(
            prompt=self.prompt, image=self.image, heat_maps=self.heat_maps, seed=self.settings.get("seed"),
            settings=self.settings | {"model": model}, negative_prompt=self.negative_prompt,
            meta={"image_index": 0, "explained": True},
        )


def check_strength(strength: float, steps: int | None = None) -> float:
    """``strength`` if it lies in (0, 1] (and, with ``steps``, leaves at least one step), else InputError."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength) \
            or not 0 < strength <= 1:
        raise InputError(f"strength must lie in (0, 1] (the fraction of the schedule the image is noised by), "
                         f"got {strength!r}")
    if steps is not None and int(steps * strength) < 1:
        raise InputError(f"strength {strength:g} of {steps} steps leaves no denoising step to trace: raise the "
                         f"strength or the steps (at least {math.ceil(1 / strength)} steps at this strength)")
    return float(strength)


def load_image(image: str | os.PathLike[str] | PIL.Image.Image, multiple: int = 8) -> PIL.Image.Image:
    """An RGB copy of ``image`` (a PIL image or a file), or InputError if it is missing, unreadable or its
    sides are not multiples of ``multiple`` pixels. The image given is never modified."""
    if isinstance(image, PIL.Image.Image):
        picture = image.copy()
        name = "the image"
    else:
        path = Path(image).expanduser()
        name = f"image {str(path)!r}"
        if not str(image).strip():
            raise InputError("the image path is empty: give an image file (PNG, JPEG, ...)")
        if not path.exists():
            raise InputError(f"{name} does not exist: give an image file (PNG, JPEG, ...)")
        if not path.is_file():
            raise InputError(f"{name} is not a file: give an image file (PNG, JPEG, ...)")
        try:
            with PIL.Image.open(path) as opened:
                opened.load()
                picture = opened.copy()
        except (OSError, ValueError, PIL.Image.DecompressionBombError, SyntaxError) as e:
            raise InputError(f"{name} cannot be read as an image ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else 'no detail'})") from None
    if getattr(picture, "n_frames", 1) > 1:
        picture.seek(0)  # an animation: its first frame
    w, h = picture.size
    if w < multiple or h < multiple or w % multiple or h % multiple:
        raise InputError(f"{name} is {w}x{h} pixels: explain needs both sides to be positive multiples of "
                         f"{multiple} for this model (crop or resize it, e.g. to "
                         f"{max(multiple, w // multiple * multiple)}x{max(multiple, h // multiple * multiple)})")
    return picture.convert("RGB")


def size_multiple(pipe: Any) -> int:
    """What both image sides must be a multiple of: 8, or the VAE's factor times the 2x2 patches a
    transformer packs latents into (16 for Flux, SD3, ...)."""
    factor = int(getattr(pipe, "vae_scale_factor", 8) or 8)
    patch = 2 if getattr(pipe, "transformer", None) is not None else 1
    return math.lcm(8, factor * patch)


def image_pipeline(pipe: Any, scheduler: Any = None) -> Any:
    """diffusers' image-to-image pipeline of ``pipe``'s family on the same components (nothing loaded).

    It gets a scheduler of its own (a fresh one from ``pipe``'s config unless ``scheduler`` is given), so
    the image-to-image call's begin index and step state never reach ``pipe``'s scheduler.
    """
    from diffusers import AutoPipelineForImage2Image

    from daamkit.capture import UnsupportedPipelineError

    own = scheduler if scheduler is not None else type(pipe.scheduler).from_config(pipe.scheduler.config)
    try:
        i2i = AutoPipelineForImage2Image.from_pipe(pipe, scheduler=own)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise UnsupportedPipelineError(
            f"diffusers has no image-to-image pipeline for {type(pipe).__name__}, so daamkit cannot noise an "
            f"image for it ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__}); explain works with "
            "the families that have one (Stable Diffusion, SDXL, SD3, Flux, ...)"
        ) from None
    return i2i


def _check_inversion(pipe: Any, i2i: Any, inversion: str | None) -> None:
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

    from daamkit.capture import UnsupportedPipelineError

    if inversion is None:
        return
    if inversion not in INVERSIONS:
        raise InputError(f"inversion must be one of {', '.join(INVERSIONS)} (or none: noise by strength), "
                         f"got {inversion!r}")
    if not isinstance(i2i, StableDiffusionImg2ImgPipeline):
        raise UnsupportedPipelineError(
            f"DDIM inversion is offered for Stable Diffusion 1.x/2.x pipelines (a UNet with one text encoder); "
            f"this is {type(pipe).__name__}: leave out the inversion to noise the image by strength"
        )
    scheduler = pipe.scheduler
    names = {type(scheduler).__name__} | {c.__name__ for c in getattr(scheduler, "compatibles", ())}
    if DDIMScheduler.__name__ not in names:
        raise UnsupportedPipelineError(
            f"DDIM inversion needs a scheduler DDIM can stand in for (DDPM, DDIM, PNDM, Euler, DPM-Solver, ...); "
            f"{type(scheduler).__name__} is not one: leave out the inversion to noise the image by strength"
        )
    prediction = scheduler.config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise UnsupportedPipelineError(
            f"DDIM inversion here needs a model that predicts the noise (prediction_type 'epsilon'); this one "
            f"predicts {prediction!r}: leave out the inversion to noise the image by strength"
        )


class _StartFromLatents:
    """Mixin for a scheduler whose ``add_noise`` hands the latents back as they are: the image-to-image
    pipeline, given inverted latents as its image, then starts its denoising from them unchanged."""

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return original_samples


def _ddim_schedulers(pipe: Any) -> tuple[Any, Any]:
    """(DDIM scheduler to invert with, the same one starting from given latents) from ``pipe``'s config.

    Sample clipping and thresholding are off: latents are not images in [-1, 1], and the inversion
    relies on the step being invertible; eta is 0 (the pipeline's default)."""
    from diffusers import DDIMScheduler

    class StartFromLatentsDDIM(_StartFromLatents, DDIMScheduler):
        pass

    overrides = dict(clip_sample=False, thresholding=False)
    return DDIMScheduler.from_config(pipe.scheduler.config, **overrides), \
        StartFromLatentsDDIM.from_config(pipe.scheduler.config, **overrides)


@torch.no_grad()
def ddim_invert(i2i: Any, image: PIL.Image.Image, prompt: str, *, scheduler: Any, steps: int, strength: float,
                guidance_scale: float = 1.0, negative_prompt: str | None = None) -> torch.Tensor:
    """Latents of ``image`` walked up ``scheduler``'s DDIM schedule (``steps`` steps) to where an
    image-to-image call of ``strength`` starts, so that DDIM's (eta 0) regeneration from them with the
    same prompt and guidance retraces the image.

    Each inversion step is the algebraic inverse of :meth:`DDIMScheduler.step` with the noise predicted
    at the lower noise level (the usual approximation). The image is encoded with the VAE's mean, not a
    sample: nothing here is random."""
    device = i2i._execution_device
    unet, vae = i2i.unet, i2i.vae
    pixels = i2i.image_processor.preprocess(image).to(device=device, dtype=vae.dtype)
    latents = vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor
    latents = latents.to(unet.dtype)
    cfg = guidance_scale > 1.0
    cond, uncond = i2i.encode_prompt(prompt, device, 1, cfg, negative_prompt)
    context = torch.cat([uncond, cond]) if cfg else cond
    scheduler.set_timesteps(steps, device=device)
    start = steps - min(int(steps * strength), steps)
    timesteps = scheduler.timesteps[start:]  # descending: the regeneration's steps
    stride = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    alphas = scheduler.alphas_cumprod.to(device=device, dtype=torch.float64)
    final = float(scheduler.final_alpha_cumprod)
    x = latents.to(torch.float64)
    for t in reversed(timesteps.tolist()):
        below = t - stride  # DDIM's step goes from t to here
        a_from = float(alphas[below]) if below >= 0 else final
        a_to = float(alphas[t])
        model_in = torch.cat([x] * 2) if cfg else x
        eps = unet(model_in.to(unet.dtype), t, encoder_hidden_states=context).sample.to(torch.float64)
        if cfg:
            e_uncond, e_cond = eps.chunk(2)
            eps = e_uncond + guidance_scale * (e_cond - e_uncond)
        x0 = (x - math.sqrt(1 - a_from) * eps) / math.sqrt(a_from)
        x = math.sqrt(a_to) * x0 + math.sqrt(1 - a_to) * eps
    return x.to(latents.dtype)


def explain(
    pipe: Any,
    image: str | os.PathLike[str] | PIL.Image.Image,
    prompt: str,
    *,
    strength: float = 0.5,
    inversion: str | None = None,
    steps: int = 30,
    guidance_scale: float = 7.5,
    seed: int = 0,
    negative_prompt: str | None = None,
    trace_options: dict[str, Any] | None = None,
    open_vocabulary: Sequence[str] | None = None,
    progress: bool = False,
) -> ExplainResult:
    """Noise ``image`` to ``strength`` and trace ``pipe``'s denoising of it toward ``prompt``.

    image: a PIL image (not modified) or an image file; both sides multiples of 8 (16 for transformer
        models), used at its own size.
    strength: the fraction of the ``steps``-step schedule the image is noised by, in (0, 1];
        ``int(steps * strength)`` denoising steps are traced.
    inversion: None (seeded noise through diffusers' image-to-image pipeline) or ``"ddim"`` (deterministic
        DDIM inversion, then the DDIM regeneration is traced; Stable Diffusion 1.x/2.x UNets).
    trace_options: options of :func:`daamkit.trace` (layers, steps, heads, ...); ``open_vocabulary``:
        words for OVAM maps as in ``daamkit generate`` (in :attr:`ExplainResult.methods`).

    Raises InputError for a bad image, strength, step count or inversion name, and
    UnsupportedPipelineError for a pipeline without an image-to-image variant or an inversion its
    family or scheduler cannot take. ``pipe`` is left as it was (its scheduler included).
    """
    from daamkit.jobs.generate import check_prompts, make_generators
    from daamkit.trace import trace

    check_prompts(prompt)
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise InputError(f"steps must be a whole number of at least 1, got {steps!r}")
    if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale):
        raise InputError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
    strength = check_strength(strength, steps)
    if inversion is not None and inversion not in INVERSIONS:
        raise InputError(f"inversion must be one of {', '.join(INVERSIONS)} (or none: noise by strength), "
                         f"got {inversion!r}")
    picture = load_image(image, size_multiple(pipe))
    if inversion == "ddim":
        from diffusers import StableDiffusionImg2ImgPipeline

        probe = image_pipeline(pipe)
        if isinstance(probe, StableDiffusionImg2ImgPipeline):
            _check_inversion(pipe, probe, inversion)
            invert_with, regenerate_with = _ddim_schedulers(pipe)
            i2i = image_pipeline(pipe, scheduler=regenerate_with)
        else:
            _check_inversion(pipe, probe, inversion)  # raises: not a family inversion is offered for
    else:
        i2i = image_pipeline(pipe)
    i2i.set_progress_bar_config(disable=not progress)

    options = dict(trace_options or {})
    if open_vocabulary:
        options["open_vocabulary"] = list(open_vocabulary)
    kwargs: dict[str, Any] = dict(strength=strength, num_inference_steps=steps, guidance_scale=guidance_scale,
                                  generator=make_generators(i2i, [seed])[0])
    if negative_prompt is not None:
        kwargs["negative_prompt"] = negative_prompt
    if inversion == "ddim":
        kwargs["image"] = ddim_invert(i2i, picture, prompt, scheduler=invert_with, steps=steps, strength=strength,
                                      guidance_scale=guidance_scale, negative_prompt=negative_prompt)
        kwargs["eta"] = 0.0
    else:
        kwargs["image"] = picture.copy()  # the pipeline reads it only, but the caller's copy stays out of reach
    with trace(i2i, **options) as tc:
        out = i2i(prompt, **kwargs)
        maps = {name: tc.heat_maps(0, method=name) for name in tc.method_names}
        timesteps = [float(t) for t in tc.generation.timesteps]
    settings = {
        "mode": "explain",
        "strength": strength,
        "inversion": inversion,
        "steps": steps,
        "traced_steps": len(timesteps),
        "timesteps": timesteps,
        "seed": seed,
        "guidance_scale": float(guidance_scale),
        "negative_prompt": negative_prompt,
        "scheduler": "DDIMScheduler" if inversion == "ddim" else type(i2i.scheduler).__name__,
        "pipeline": type(i2i).__name__,
        "image_size": list(picture.size),
        "trace": jsonable(trace_options or {}),
    }
    if open_vocabulary:
        settings["open_vocabulary"] = list(open_vocabulary)
    return ExplainResult(
        heat_maps=maps["daam"], image=picture, regenerated=out.images[0], prompt=prompt, settings=settings,
        negative_prompt=negative_prompt, methods={k: v for k, v in maps.items() if k != "daam"},
    )
