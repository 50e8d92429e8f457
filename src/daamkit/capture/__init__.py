"""Capture of text-image attention, one module per model family.

Every capture installs only PyTorch hooks (forward hooks on the projection layers and on the attention
module), never replaces an attention processor: the pipeline keeps its own processors (SDPA, sliced,
LoRA, IP-Adapter ...) and its images are bit-identical with and without tracing.
"""

from .base import CaptureSink, DenoiserCall
from .flux import FluxCapture
from .mmdit import SD3Capture
from .unet import UNetCapture

__all__ = ["CaptureSink", "DenoiserCall", "FluxCapture", "SD3Capture", "UNetCapture"]
