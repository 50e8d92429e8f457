"""Where text meets image, one declarative entry per model family; hooks only, the pipeline's processors untouched.

Every capture installs only PyTorch hooks, never replaces an attention processor: the pipeline keeps
its own processors (SDPA, sliced, LoRA, IP-Adapter ...) and its images are bit-identical with and
without tracing. :mod:`daamkit.capture.families` is the table of families; the transformer families
read queries and keys at the attention call itself (:mod:`daamkit.capture.sdpa`), the UNet family at
its projections (:mod:`daamkit.capture.unet`). :func:`detect_capture` picks the entry of a pipeline.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from daamkit.capture.base import CaptureSink, DenoiserCall, LayerInfo
from daamkit.capture.families import FAMILIES, Family, Site, TextPart, family_of
from daamkit.capture.transformer import TransformerCapture
from daamkit.capture.unet import UNetCapture
from daamkit.errors import DaamkitError

__all__ = [
    "FAMILIES",
    "SUPPORTED_FAMILIES",
    "CaptureSink",
    "DenoiserCall",
    "Family",
    "LayerInfo",
    "Site",
    "TextPart",
    "TransformerCapture",
    "UNetCapture",
    "UnsupportedPipelineError",
    "detect_capture",
]

SUPPORTED_FAMILIES = "; ".join(f.title for f in FAMILIES)


class UnsupportedPipelineError(DaamkitError, TypeError):
    """The pipeline's denoiser is not one of the supported families."""


def detect_capture(pipe: Any, probabilities: str = "text") -> UNetCapture | TransformerCapture:
    """The capture for this pipeline's family, or a clear error naming the supported ones.

    probabilities: for joint attention, ``"text"`` (softmax over the text keys) or ``"model"`` (the
    model's own softmax over every key), see :func:`daamkit.capture.sdpa.text_probabilities`.
    """
    found = family_of(pipe)
    if found is None:
        unet, transformer = getattr(pipe, "unet", None), getattr(pipe, "transformer", None)
        denoiser = transformer if transformer is not None else unet
        what = type(pipe).__name__ + (f" with a {type(denoiser).__name__} denoiser" if denoiser is not None else "")
        raise UnsupportedPipelineError(
            f"daamkit cannot trace {what}. Supported: {SUPPORTED_FAMILIES}. "
            "`daamkit families` lists every denoiser of the installed diffusers and its status."
        )
    family, denoiser = found
    if family.capture == "projections":
        return UNetCapture(denoiser)
    experts = [e for e in (getattr(pipe, a, None) for a in family.experts) if isinstance(e, nn.Module)]
    return TransformerCapture(family, denoiser, probabilities=probabilities, experts=experts)
