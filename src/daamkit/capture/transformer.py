"""The capture of every diffusion-transformer family, driven by its :class:`~daamkit.capture.families.Family` entry.

The entry says which modules are text-image attention and where text keys and image queries lie in
their attention call; this class installs the hooks: a pre-hook on the denoiser (a new step, the
latent grid, the text length) and an :class:`~daamkit.capture.sdpa.AttentionTap` per module.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from daamkit.capture.base import CaptureSink, DenoiserCall, DenoiserPreHook, HookSet, LayerInfo
from daamkit.capture.sdpa import AttentionTap, Slices

if TYPE_CHECKING:
    from daamkit.capture.families import Family, Site, TextPart


def _arg(args: tuple, kwargs: dict, name: str, position: int | None) -> Any:
    if name in kwargs:
        return kwargs[name]
    if position is not None and len(args) > position:
        return args[position]
    return None


class _PreHook(DenoiserPreHook):
    """Reads the batch, the latent grid, the timestep and the text length off the denoiser's inputs."""

    def __init__(self, sink: CaptureSink, capture: TransformerCapture):
        super().__init__(sink)
        self.capture = capture

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        family = self.capture.spec
        x = _arg(args, kwargs, "hidden_states", 0)
        t = _arg(args, kwargs, family.timestep_kwarg, family.timestep_position)
        if isinstance(t, torch.Tensor):
            t = float(t.flatten()[0].item()) if t.numel() else 0.0
        self.capture.text_len = family.denoiser_text_len(args, kwargs)
        call = DenoiserCall(
            batch=int(x.shape[0]), latent_hw=family.grid(module, args, kwargs), timestep=float(t or 0.0)
        )
        self.capture.current = call
        self.sink.on_denoiser_call(call)


def locate(tap: AttentionTap, q_len: int, k_len: int) -> Slices | None:
    """Image queries and text keys of one attention call, from the module's site layout."""
    capture: TransformerCapture = tap.capture
    site: Site = capture.site_of[tap.layer.name]
    if site.locate is not None:
        return site.locate(tap, q_len, k_len)
    h, w = capture.current.latent_hw
    n_image = h * w
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

    def __init__(self, spec: Family, denoiser: nn.Module, probabilities: str = "text"):
        self.spec = spec
        self.family = spec.name
        self.denoiser = denoiser
        self.probabilities = probabilities
        self.repeated_timestep_is_negative = spec.separate_negative
        self.text_len: int | None = None
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
        self.hooks = HookSet()

    def attach(self, sink: CaptureSink) -> None:
        self.missed = set()
        self.current = None
        try:
            self.hooks.add(self.denoiser.register_forward_pre_hook(_PreHook(sink, self), with_kwargs=True))
            for layer, (_, m) in zip(self.layers, self.modules, strict=True):
                AttentionTap(layer, m, sink, self, locate).install(self.hooks)
        except BaseException:
            self.hooks.remove()
            raise

    def detach(self) -> None:
        self.hooks.remove()

    def cell_pixels(self, pipe: Any) -> int:
        """Pixels per image token along each side."""
        return int(getattr(pipe, "vae_scale_factor", 8)) * self.spec.patch(self.denoiser)

    def text_parts(self, called: list[str]) -> list[TextPart]:
        """The text encoders' parts of the text keys, in key order."""
        return self.spec.text_parts(called)
