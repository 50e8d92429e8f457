"""The capture protocol shared by every model family: which layer runs (``LayerInfo``), the denoiser
pre-hook that marks each step, what a capture reports to its sink, and the hook bookkeeping."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


@dataclass(frozen=True)
class LayerInfo:
    """One traced text-image attention module."""

    name: str  # module path in the denoiser, e.g. "up_blocks.1.attentions.0.transformer_blocks.0.attn2"
    block: str  # "down" / "mid" / "up" for UNets; "joint" / "double" / "single" for transformers
    index: int  # position among the traced layers, in forward order
    heads: int


@dataclass(frozen=True)
class DenoiserCall:
    """One forward call of the denoiser (UNet or transformer)."""

    batch: int  # rows in the denoiser batch (CFG halves included)
    latent_hw: tuple[int, int]  # latent grid (height, width) of the image tokens
    timestep: float  # falls from step to step (negated for a family whose time rises, e.g. Z-Image)
    frames: int = 1  # frames of image tokens (a video's latent frames over the temporal patch); 1 for images


@dataclass(frozen=True)
class QueryChunk:
    """Which image queries one delivery of probabilities holds: ``start:stop`` of ``total``.

    The image queries of a call are numbered frame-major (frame, row, column), as every video
    transformer flattens its tokens. Large calls (videos) are delivered in chunks so that the image
    queries x text keys block is never held whole; a delivery without a chunk holds every query.
    """

    start: int
    stop: int
    total: int


def query_chunks(total: int, size: int) -> Iterator[tuple[int, int, QueryChunk | None]]:
    """``(start, stop, chunk)`` over ``total`` image queries in chunks of ``size`` (at least 1); ``chunk``
    is None when one chunk holds them all."""
    size = max(1, size)
    for start in range(0, total, size):
        stop = min(total, start + size)
        yield start, stop, None if size >= total else QueryChunk(start, stop, total)


@dataclass(frozen=True)
class ImageQueries:
    """The generated image's queries in one text-image attention call, as the model attended with them
    (after the module's own q norm and rotary embedding), for the images of one branch.

    module: the attention module that ran (an expert's own where the pipeline takes turns between
    denoisers); q: (b, heads, N, d), a video's queries frame-major; scale: the call's softmax scale.
    """

    module: nn.Module
    q: torch.Tensor
    scale: float
    branch: str


class CaptureSink(Protocol):
    def on_denoiser_call(self, call: DenoiserCall) -> None: ...

    def branch_rows(self, batch: int) -> dict[str, slice]:
        """Which rows of a denoiser batch belong to each branch ("cond", optionally "negative")."""
        ...

    def wants(self, layer: LayerInfo, image_tokens: int) -> bool:
        """Whether any consumer uses this layer's probabilities when each frame of its image sequence
        has ``image_tokens`` positions; when not, the capture skips computing them."""
        ...

    def query_chunk(self, total: int, frame: int, bytes_per_query: int, device: torch.device | None = None) -> int:
        """How many of ``total`` image queries (``frame`` per frame) to compute at once, when each
        costs ``bytes_per_query`` of probabilities on ``device``; ``total`` means no chunking."""
        ...

    def on_attention(self, layer: LayerInfo, probs: torch.Tensor, branch: str, chunk: QueryChunk | None = None) -> None:
        """probs: (b, heads, n, T) for the image queries ``chunk`` (all of them when None)."""
        ...

    def wants_queries(self, layer: LayerInfo, image_tokens: int) -> bool:
        """Whether any consumer takes this layer's image queries (``on_image_queries``)."""
        ...

    def on_image_queries(self, layer: LayerInfo, queries: ImageQueries) -> None:
        """The image queries of one call and branch (for methods that attend with keys of their own)."""
        ...


def attention_probs(
    q: torch.Tensor, k: torch.Tensor, heads: int, scale: float, norm_q=None, norm_k=None
) -> torch.Tensor:
    """softmax(q k^T * scale) over the keys, per head, in fp32: (B, heads, Nq, Nk).

    q: (B, Nq, heads*d) and k: (B, Nk, heads*d) as the projections return them. ``norm_q``/``norm_k``
    are the module's own q/k norms, applied where its processor applies them (after the head split).
    """
    b, nq, c = q.shape
    d = c // heads
    q = q.view(b, nq, heads, d).transpose(1, 2)
    k = k.view(b, k.shape[1], heads, d).transpose(1, 2)
    if norm_q is not None:
        q = norm_q(q)
    if norm_k is not None:
        k = norm_k(k)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)).mul_(scale)
    return scores.softmax(dim=-1)


class HookSet:
    """Handles of every hook a capture installed, removed together."""

    def __init__(self) -> None:
        self.handles: list[RemovableHandle] = []

    def add(self, handle: RemovableHandle) -> None:
        self.handles.append(handle)

    def remove(self) -> None:
        """Remove every handle, also when removing one raises (a Ctrl-C arriving just then, say): a
        hook left behind would make the pipeline refuse every later trace. The first error is raised
        once all are gone."""
        first: BaseException | None = None
        while self.handles:
            handle = self.handles[-1]
            try:
                handle.remove()
            except BaseException as e:
                first = first or e
                try:  # a handle's remove() is idempotent, so a second try is safe
                    handle.remove()
                except BaseException as again:
                    first = first or again
            self.handles.pop()
        if first is not None:
            raise first


class ProjectionTap:
    """Reads one attention module's query and key projections as its own processor computes them.

    ``install`` puts four hooks on the module: a pre-hook that clears what the last call left, forward
    hooks on the query and key projections (the first output per call is kept: later calls, e.g.
    IP-Adapter's ``to_k_ip``, are other modules), and a forward hook that calls :meth:`after`.
    """

    def __init__(self, layer: LayerInfo, attn: nn.Module, sink: CaptureSink):
        self.layer, self.attn, self.sink = layer, attn, sink
        self.q: torch.Tensor | None = None
        self.k: torch.Tensor | None = None

    def reset(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.q = self.k = None

    def save_q(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if self.q is None:
            self.q = out.detach()

    def save_k(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if self.k is None:
            self.k = out.detach()

    def take(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        q, k = self.q, self.k
        self.q = self.k = None
        return q, k

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        raise NotImplementedError

    def install(self, hooks: HookSet, key_proj: nn.Module) -> None:
        hooks.add(self.attn.register_forward_pre_hook(self.reset, with_kwargs=True))
        hooks.add(self.attn.to_q.register_forward_hook(self.save_q))
        hooks.add(key_proj.register_forward_hook(self.save_k))
        hooks.add(self.attn.register_forward_hook(self.after, with_kwargs=True))


class DenoiserPreHook:
    """Forward pre-hook on the denoiser: tells the sink that a new step starts.

    Its class doubles as the marker that a trace is attached (see ``is_traced``).
    """

    def __init__(self, sink: CaptureSink, patch_size: int = 1, capture: Any = None):
        """capture: an object whose ``current`` is set to each call (the taps read the frames off it)."""
        self.sink = sink
        self.patch_size = patch_size
        self.capture = capture

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        if isinstance(timestep, torch.Tensor):
            timestep = float(timestep.flatten()[0].item()) if timestep.numel() else 0.0
        h, w = sample.shape[-2:]
        p = self.patch_size
        # a motion UNet (AnimateDiff) takes (B, C, F, H, W) and runs its image layers per frame
        frames = int(sample.shape[2]) if sample.dim() == 5 else 1
        call = DenoiserCall(
            batch=int(sample.shape[0]), latent_hw=(int(h) // p, int(w) // p), timestep=float(timestep or 0.0),
            frames=frames,
        )
        if self.capture is not None:
            self.capture.current = call
        self.sink.on_denoiser_call(call)


def is_traced(module: nn.Module) -> bool:
    return any(isinstance(h, DenoiserPreHook) for h in module._forward_pre_hooks.values())
