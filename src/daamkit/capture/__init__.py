"""Where text meets image, one module per model family; hooks only, the pipeline's processors untouched.

Every capture installs only PyTorch hooks (forward hooks on the projection layers and on the attention
module), never replaces an attention processor: the pipeline keeps its own processors (SDPA, sliced,
LoRA, IP-Adapter ...) and its images are bit-identical with and without tracing. :func:`detect_capture`
picks the family of a pipeline's denoiser; :mod:`daamkit.capture.base` holds the protocol every
family's capture follows.
"""

from __future__ import annotations

from typing import Any

from daamkit.capture.base import CaptureSink, DenoiserCall, LayerInfo
from daamkit.capture.flux import FluxCapture
from daamkit.capture.sd3 import SD3Capture
from daamkit.capture.unet import UNetCapture
from daamkit.errors import DaamkitError

__all__ = [
    "SUPPORTED_FAMILIES",
    "CaptureSink",
    "DenoiserCall",
    "FluxCapture",
    "LayerInfo",
    "SD3Capture",
    "UNetCapture",
    "UnsupportedPipelineError",
    "detect_capture",
]

SUPPORTED_FAMILIES = (
    "Stable Diffusion 1.x/2.x and SDXL UNet pipelines (text-to-image, img2img, inpainting, ControlNet), "
    "Stable Diffusion 3/3.5 (SD3Transformer2DModel) and Flux (FluxTransformer2DModel)"
)


class UnsupportedPipelineError(DaamkitError, TypeError):
    """The pipeline's denoiser is not one of the supported families."""


def detect_capture(pipe: Any) -> UNetCapture | SD3Capture | FluxCapture:
    """The capture for this pipeline's family, or a clear error naming the supported ones."""
    unet = getattr(pipe, "unet", None)
    if unet is not None:
        from diffusers import UNet2DConditionModel

        if isinstance(unet, UNet2DConditionModel):
            return UNetCapture(unet)
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None:
        from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

        if isinstance(transformer, SD3Transformer2DModel):
            return SD3Capture(transformer)
        if isinstance(transformer, FluxTransformer2DModel):
            return FluxCapture(transformer)
    kind = type(transformer).__name__ if transformer is not None else type(unet).__name__ if unet is not None else None
    what = f"{type(pipe).__name__}" + (f" with a {kind} denoiser" if kind else "")
    raise UnsupportedPipelineError(f"daamkit cannot trace {what}. Supported: {SUPPORTED_FAMILIES}.")
