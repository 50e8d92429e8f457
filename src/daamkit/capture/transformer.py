"""The capture of every diffusion-transformer family, driven by its :class:`~daamkit.capture.families.Family` entry.

The entry says which modules are text-image attention and where text keys and image queries lie in
their attention call; this class installs the hooks: a pre-hook on the denoiser (a new step, the
latent grid, the text length) and an :class:`~daamkit.capture.sdpa.AttentionTap` per module.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from daamkit.capture.base import CaptureSink, DenoiserCall, DenoiserPreHook, HookSet, LayerInfo
from daamkit.capture.sdpa import AttentionTap, Slices
from daamkit.frames import TimeAxis

if TYPE_CHECKING:
    from daamkit.capture.families import Family, Site, TextPart


def _arg(args: tuple, kwargs: dict, name: str, position: int | None) -> Any:
    if name in kwargs:
        return kwargs[name]
    if position is not None and len(args) > position:
        return args[position]
    return None


def _vae_spatial_factor(pipe: Any) -> int:
    """Pixels per latent cell side: the pipeline's ``vae_scale_factor``, else its video or image processor's
    (video pipelines name their own attribute differently, e.g. ``vae_spatial_compression_ratio``)."""
    for name in ("vae_scale_factor", "vae_scale_factor_spatial", "vae_spatial_scale_factor"):
        factor = getattr(pipe, name, None)
        if isinstance(factor, int):
            return factor
    for name in ("video_processor", "image_processor"):
        factor = getattr(getattr(getattr(pipe, name, None), "config", None), "vae_scale_factor", None)
        if isinstance(factor, int):
            return factor
    return 8


class _PreHook(DenoiserPreHook):
    """Reads the batch, the latent grid, the timestep and the text length off the denoiser's inputs."""

    def __init__(self, sink: CaptureSink, capture: TransformerCapture):
        super().__init__(sink)
        self.capture = capture

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        family = self.capture.spec
        if family.skip_call is not None and family.skip_call(args, kwargs):
            self.capture.current = None  # the taps trace nothing in this call
            return
        x = _arg(args, kwargs, "hidden_states", 0)
        t = _arg(args, kwargs, family.timestep_kwarg, family.timestep_position)
        self.capture.inputs = (args, kwargs)
        self.capture.text_len = family.denoiser_text_len(args, kwargs)
        # Z-Image takes its latents as a list of per-sample tensors
        batch = len(x) if isinstance(x, list | tuple) else int(x.shape[0])
        if isinstance(t, torch.Tensor):
            if t.numel() > batch:
                # per-token timesteps (image to video: the conditioning frame's tokens are clean): the
                # step's noise level is that of the noisiest token
                t = t.min() if family.timestep_rises else t.max()
            t = float(t.flatten()[0].item()) if t.numel() else 0.0
        t = float(t or 0.0)
        grid = family.grid(module, args, kwargs)  # (h, w), or (frames, h, w) for a video
        frames, hw = (int(grid[0]), tuple(grid[1:])) if len(grid) == 3 else (1, tuple(grid))
        # the trace counts steps by a falling timestep
        call = DenoiserCall(
            batch=batch, latent_hw=hw, timestep=-t if family.timestep_rises else t, frames=frames
        )
        self.capture.current = call
        self.sink.on_denoiser_call(call)


def locate(tap: AttentionTap, q_len: int, k_len: int) -> Slices | Sequence[Slices] | None:
    """Image queries and text keys of one attention call, from the module's site layout."""
    capture: TransformerCapture = tap.capture
    site: Site = capture.site_of[tap.layer.name]
    if site.locate is not None:
        return site.locate(tap, q_len, k_len)
    h, w = capture.current.latent_hw
    n_image = capture.current.frames * h * w  # a video's tokens, frame-major
    text = tap.text_len if site.text_from == "module" else capture.text_len
    if site.layout == "cross":
        t = k_len if text is None else min(text, k_len)
        return Slices(slice(0, n_image), slice(0, t)) if q_len >= n_image else None
    if text is None or text <= 0:
        return None
    if site.layout == "text_image":
        return Slices(slice(text, text + n_image), slice(0, text)) if q_len >= text + n_image else None
    if site.layout == "image_text":
        return Slices(slice(0, n_image), slice(k_len - text, k_len)) if q_len >= n_image and k_len >= text else None
    raise ValueError(f"unknown attention layout {site.layout!r}")


class TransformerCapture:
    """Installs and removes the hooks of one transformer denoiser, as its family entry describes."""

    repeated_timestep_is_negative = False
    cond_first = False

    def __init__(self, spec: Family, denoiser: nn.Module, probabilities: str = "text",
                 experts: Sequence[nn.Module] = ()):
        """experts: further denoisers of the pipeline that take turns with ``denoiser`` (Wan 2.2's
        high- and low-noise transformers); their modules of the same path count as the same layer."""
        self.spec = spec
        self.family = spec.name
        self.denoiser = denoiser
        self.denoisers = [denoiser, *experts]
        self.probabilities = probabilities
        self.repeated_timestep_is_negative = spec.separate_negative
        self.cond_first = spec.cond_first
        self.text_len: int | None = None
        self.inputs: tuple[tuple, dict] = ((), {})  # the current denoiser call's, for a site's ``locate``
        self.current: DenoiserCall | None = None
        self.missed: set[str] = set()
        self.site_of: dict[str, Site] = {}
        self.modules: list[tuple[str, nn.Module]] = []
        for name, m in denoiser.named_modules():
            for site in spec.sites:
                if re.fullmatch(site.pattern, name) and all(getattr(m, a, None) is not None for a in site.needs):
                    self.site_of[name] = site
                    self.modules.append((name, m))
                    break
        if not self.modules:
            raise ValueError(f"no text-image attention found in {type(denoiser).__name__}")
        self.layers = [
            LayerInfo(name=name, block=self.site_of[name].block, index=i, heads=int(getattr(m, "heads", 0) or 0))
            for i, (name, m) in enumerate(self.modules)
        ]
        # (layer, module) of every denoiser: an expert's module at the same path is the same layer
        self.taps: list[tuple[nn.Module, LayerInfo, nn.Module]] = []
        for d in self.denoisers:
            mods = dict(d.named_modules())
            for layer in self.layers:
                if layer.name not in mods:
                    raise ValueError(f"{type(d).__name__} has no module {layer.name}: its experts differ in layout")
                self.taps.append((d, layer, mods[layer.name]))
        self.hooks = HookSet()

    def attach(self, sink: CaptureSink) -> None:
        self.missed = set()
        self.current = None
        try:
            for d in self.denoisers:
                self.hooks.add(d.register_forward_pre_hook(_PreHook(sink, self), with_kwargs=True))
            for _, layer, m in self.taps:
                site = self.site_of[layer.name]
                AttentionTap(layer, m, sink, self, locate, skip=site.skip, per_row=site.per_row).install(self.hooks)
        except BaseException:
            self.hooks.remove()
            raise

    def detach(self) -> None:
        self.inputs = ((), {})
        self.hooks.remove()

    def cell_pixels(self, pipe: Any) -> int:
        """Pixels per image token along each side."""
        return _vae_spatial_factor(pipe) * self.spec.patch(self.denoiser)

    def time_axis(self, pipe: Any, frames: int) -> TimeAxis | None:
        """How the ``frames`` token frames lie on the returned video (None for an image family)."""
        if self.spec.time is not None:
            return self.spec.time(pipe, self.denoiser, frames)
        return TimeAxis(frames) if frames > 1 else None

    def text_parts(self, called: list[str]) -> list[TextPart]:
        """The text encoders' parts of the text keys, in key order."""
        return self.spec.text_parts(called)
