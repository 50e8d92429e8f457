"""Self-attention refinement of DAAM maps: a word's cross-attention map propagated through the model's
own image self-attention, as segmentation methods built on diffusion attention do (DiffSegmenter,
iSeg and others refine cross-attention with self-attention the same way).

In every traced transformer block of a UNet, the self-attention ``attn1`` runs just before the
cross-attention ``attn2``. For a selected step, the head-mean cross-attention probabilities of
``attn2`` form M (N image positions x T text tokens); the block's self-attention probabilities,
head-mean, form A (N x N, row-stochastic); the refined map is A^k M (``iterations`` = k). A pixel
then carries the word attention of the pixels it attends to, which fills in objects and sharpens
their edges. A's rows sum to 1, so the refined maps keep the scale of DAAM's, and they go through
the same upsampling and streaming sums (:class:`~daamkit.aggregate.Accumulator`, the trace's
``AggregationConfig``).

A is never held whole: it is computed a block of query rows at a time from ``attn1``'s queries and
keys (read off its ``to_q`` / ``to_k`` as the model produced them, with the module's own scale and
q/k norms) and multiplied into M at once, inside the step, within the trace's ``chunk_mib``. Memory
is O(N x T) per block plus that budget, and the sums do not grow with the steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from daamkit.aggregate import Accumulator, chunk_size, layer_grid
from daamkit.capture import UnsupportedPipelineError
from daamkit.capture.base import LayerInfo, QueryChunk
from daamkit.errors import InputError, TraceError
from daamkit.methods.daam import DaamMethod
from daamkit.methods.ovam import _split_heads

if TYPE_CHECKING:
    from daamkit.heatmap import GlobalHeatMap
    from daamkit.trace import Trace


def propagate(
    q: torch.Tensor,
    k: torch.Tensor,
    m: torch.Tensor,
    *,
    heads: int,
    scale: float,
    norm_q: nn.Module | None = None,
    norm_k: nn.Module | None = None,
    iterations: int = 1,
    rows: int | None = None,
) -> torch.Tensor:
    """A^iterations @ m in fp32, where A = the head mean of softmax(q k^T * scale) over the keys.

    q, k: (b, N, heads*d) as ``to_q`` / ``to_k`` return them; m: (b, N, T). A is computed ``rows``
    query rows at a time (all of them when None), so at most (b, heads, rows, N) scores exist at once.
    """
    qh = _split_heads(q, heads, norm_q).float()
    kt = _split_heads(k, heads, norm_k).float().transpose(-1, -2)
    n = qh.shape[2]
    if m.shape[:2] != (qh.shape[0], n) or kt.shape[-1] != n:
        raise ValueError(f"self-attention of {tuple(q.shape)} x {tuple(k.shape)} cannot refine maps {tuple(m.shape)}")
    rows = n if rows is None else max(1, min(int(rows), n))

    def block(start: int, stop: int) -> torch.Tensor:
        scores = torch.matmul(qh[:, :, start:stop], kt).mul_(scale)
        return scores.softmax(dim=-1).mean(dim=1)  # (b, stop - start, N)

    out = m.float()
    if rows >= n:  # A fits the budget: compute it once for every iteration
        a = block(0, n)
        for _ in range(iterations):
            out = torch.matmul(a, out)
        return out
    for _ in range(iterations):
        src, out = out, torch.empty_like(out)
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            out[:, start:stop] = torch.matmul(block(start, stop), src)
    return out


def _self_attention_of(denoiser: nn.Module, name: str) -> nn.Module | None:
    """The self-attention that runs before the cross-attention ``name`` in its transformer block."""
    parent, _, leaf = name.rpartition(".")
    if leaf != "attn2":
        return None
    attn1 = getattr(denoiser.get_submodule(parent), "attn1", None) if parent else None
    if not isinstance(attn1, nn.Module) or getattr(attn1, "is_cross_attention", True):
        return None
    if not isinstance(getattr(attn1, "to_q", None), nn.Module) or not isinstance(getattr(attn1, "to_k", None), nn.Module):
        return None
    return attn1


class _SelfAttentionTap:
    """Keeps the queries and keys of one block's ``attn1`` call until its ``attn2`` probabilities come."""

    def __init__(self, owner: RefinedMethod, layer: LayerInfo, attn1: nn.Module):
        self.owner, self.layer, self.attn = owner, layer, attn1
        self.q: torch.Tensor | None = None
        self.k: torch.Tensor | None = None
        self.seen_q = self.seen_k = False

    def reset(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.q = self.k = None
        self.seen_q = self.seen_k = False

    def on_q(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if not self.seen_q:
            self.seen_q = True
            self.q = self._keep(out)

    def on_k(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if not self.seen_k:
            self.seen_k = True
            self.k = self._keep(out)

    def _keep(self, out: Any) -> torch.Tensor | None:
        if not isinstance(out, torch.Tensor) or out.dim() != 3 or not self.owner._wants_block(self.layer, out):
            return None
        return out.detach()  # the model's own tensor, not a copy

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        # fused projections (to_qkv) leave to_q / to_k uncalled: compute them from the block's input
        if self.seen_q and self.seen_k:
            return
        hidden = args[0] if args else kwargs.get("hidden_states")
        if (
            not isinstance(hidden, torch.Tensor)
            or hidden.dim() != 3
            or getattr(module, "group_norm", None) is not None
            or getattr(module, "spatial_norm", None) is not None
        ):
            return
        with torch.no_grad():
            self.q = self._keep(module.to_q.forward(hidden))
            self.k = self._keep(module.to_k.forward(hidden)) if self.q is not None else None
        self.seen_q = self.seen_k = True

    def take(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        q, k = self.q, self.k
        self.q = self.k = None
        return q, k


class RefinedMethod(DaamMethod):
    """DAAM maps refined by the model's self-attention (see the module docstring).

    resolutions: downsampling factors of the blocks to use (1: the latent grid, 2: half of it, ...,
        as ``trace(factors=...)``); None: the finest one that has blocks with self-attention (whose
        self-attention is the sharpest; coarser blocks blur the maps, see benchmarks/refined_world.py).
        A block's self-attention refines its own cross-attention map; blocks at other resolutions
        are left out of the refined maps.
    iterations: k in A^k M (1: one propagation step).
    """

    name = "refined"
    aliases = ()
    families = ("unet",)
    requirement = (
        "refined maps need a UNet whose transformer blocks run self-attention (attn1) before the traced "
        "cross-attention (attn2): Stable Diffusion 1.x/2.x, SDXL and their variants"
    )
    not_enabled = "no refined maps were traced: pass refine=True (or methods=[RefinedMethod(...)]) to trace()"

    def __init__(self, resolutions: Sequence[int] | None = None, iterations: int = 1) -> None:
        super().__init__()
        if resolutions is not None:
            values = [resolutions] if isinstance(resolutions, int | str) else list(resolutions)
            if (
                not values
                or any(isinstance(r, bool) or not isinstance(r, int) or r < 1 for r in values)
                or len(set(values)) != len(values)
            ):
                raise InputError(
                    f"resolutions must be distinct downsampling factors (1, 2, 4, ...: 1 is the latent grid), "
                    f"got {resolutions!r}"
                )
            resolutions = tuple(values)
        if isinstance(iterations, bool) or not isinstance(iterations, int) or iterations < 1:
            raise InputError(f"iterations must be a whole number >= 1 (the power k of A^k M), got {iterations!r}")
        self.resolutions: tuple[int, ...] | None = resolutions
        self.used: tuple[int, ...] | None = resolutions  # what attach() settled on for this UNet
        self.iterations = iterations
        self.taps: dict[str, _SelfAttentionTap] = {}  # attn2 layer name -> its block's attn1 tap
        self._trace: Trace | None = None
        self._video = False
        # a call's cross-attention chunks, gathered per (layer, branch): (b, N, T) head means
        self._partial: dict[tuple[str, str], torch.Tensor] = {}

    @classmethod
    def from_option(cls, refine: Any) -> RefinedMethod | None:
        """The method for ``trace(refine=...)``: True (default options), a RefinedMethod, or False/None."""
        if refine is None or refine is False:
            return None
        if refine is True:
            return cls()
        if isinstance(refine, RefinedMethod):
            return refine
        raise InputError(f"refine must be True, False or a RefinedMethod(...), got {refine!r}")

    # ---- lifecycle ---------------------------------------------------------------------------
    def attach(self, trace: Trace) -> None:
        self._trace = trace
        capture = trace.capture
        denoiser = capture.denoiser
        modules = dict(capture.modules)
        found = {layer.name: _self_attention_of(denoiser, layer.name) for layer in capture.layers}
        found = {name: attn1 for name, attn1 in found.items() if attn1 is not None}
        if not found:
            raise UnsupportedPipelineError(
                f"{self.requirement}; this UNet's cross-attention layers (e.g. {capture.layers[0].name}) have no "
                "self-attention beside them: use the cross-attention maps (heat_maps)"
            )
        factors = capture.layer_factors() if hasattr(capture, "layer_factors") else {}
        have = sorted({factors[name] for name in found if name in factors})
        self.used = self.resolutions if self.resolutions is not None or not have else (have[0],)
        if self.resolutions is not None and have and not set(self.resolutions) & set(have):
            raise InputError(f"resolutions {list(self.resolutions)} match no block with self-attention: this "
                             f"UNet's have factors {', '.join(map(str, have))}")
        self.taps = {}
        for layer in capture.layers:
            attn1 = found.get(layer.name)
            if attn1 is None or layer.name not in modules:
                continue
            tap = self.taps[layer.name] = _SelfAttentionTap(self, layer, attn1)
            self.hooks.add(attn1.register_forward_pre_hook(tap.reset, with_kwargs=True))
            self.hooks.add(attn1.to_q.register_forward_hook(tap.on_q))
            self.hooks.add(attn1.to_k.register_forward_hook(tap.on_k))
            self.hooks.add(attn1.register_forward_hook(tap.after, with_kwargs=True))

    def detach(self) -> None:
        for tap in self.taps.values():
            tap.take()
        self._partial = {}
        super().detach()

    def start_generation(self, trace: Trace) -> None:
        gen = trace.generation
        self._video = gen.call.frames > 1
        self._partial = {}
        for tap in self.taps.values():
            tap.take()
        # the refined maps are head means already: the head selection applies to M before the mean
        config = trace.config.with_(heads=None, keep_heads=False)
        self.accumulator = Accumulator(config, gen.call.latent_hw, gen.num_images)

    def _factor(self, image_tokens: int) -> int | None:
        assert self.accumulator is not None
        try:
            return layer_grid(self.accumulator.latent_hw, image_tokens)[2]
        except ValueError:
            return None

    def wants(self, trace: Trace, layer: LayerInfo, image_tokens: int) -> bool:
        if self.accumulator is None or self._video or layer.name not in self.taps:
            return False
        factor = self._factor(image_tokens)
        if factor is None or (self.used is not None and factor not in self.used):
            return False
        return self.accumulator.wants(layer, image_tokens)

    def _wants_block(self, layer: LayerInfo, projected: torch.Tensor) -> bool:
        """Whether the attn1 call that produced ``projected`` (b, N, C) will be used at this step."""
        trace = self._trace
        if trace is None or self.accumulator is None:
            return False
        return bool(trace.branch_rows(int(projected.shape[0]))) and self.wants(trace, layer, int(projected.shape[1]))

    # ---- per step ----------------------------------------------------------------------------
    def on_attention(
        self, trace: Trace, layer: LayerInfo, probs: torch.Tensor, branch: str, chunk: QueryChunk | None = None
    ) -> None:
        tap = self.taps.get(layer.name)
        if tap is None or self._video or tap.q is None or tap.k is None:
            return
        total = probs.shape[2] if chunk is None else chunk.total
        if not self.wants(trace, layer, total):
            return
        heads = trace.config.heads
        m = (probs[:, list(heads)] if heads is not None else probs).float().mean(dim=1)  # (b, n, T)
        if chunk is not None and (chunk.start, chunk.stop) != (0, total):
            key = (layer.name, branch)
            held = self._partial.get(key)
            if held is None or chunk.start == 0:
                held = self._partial[key] = m.new_zeros(m.shape[0], total, m.shape[2])
            held[:, chunk.start:chunk.stop] = m
            if chunk.stop < total:
                return
            m = self._partial.pop(key)
        q, k = tap.q, tap.k
        branches = trace.branch_rows(int(q.shape[0]))
        rows = branches.get(branch)
        if rows is not None and q.shape[1] == total:
            self._refine(trace, layer, tap.attn, q[rows], k[rows], m, branch)
        if not branches or branch == list(branches)[-1]:
            tap.take()  # the last branch of this call: the block's queries and keys are done with

    def _refine(self, trace: Trace, layer: LayerInfo, attn1: nn.Module, q: torch.Tensor, k: torch.Tensor,
                m: torch.Tensor, branch: str) -> None:
        assert self.accumulator is not None
        b, n = int(q.shape[0]), int(q.shape[1])
        heads = int(attn1.heads)
        # scores and their softmax exist together: twice the (b, heads, rows, N) block per row
        rows = chunk_size(n, 0, 2 * b * heads * n * 4, trace.config.chunk_mib, q.device)
        with torch.no_grad():
            refined = propagate(
                q, k, m.to(q.device), heads=heads, scale=float(attn1.scale), norm_q=getattr(attn1, "norm_q", None),
                norm_k=getattr(attn1, "norm_k", None), iterations=self.iterations, rows=rows,
            )
        self.accumulator.add(layer, trace.generation.step, refined.unsqueeze(1), branch)

    # ---- results -----------------------------------------------------------------------------
    def heat_maps(
        self,
        trace: Trace,
        i: int,
        *,
        prompt: str | None = None,
        branch: str = "cond",
        steps: Sequence[int] | range | None = None,
        layers: Sequence[str] | None = None,
        heads: Sequence[int] | None = None,
    ) -> GlobalHeatMap:
        """As DAAM's maps; ``heads`` cannot be chosen afterwards (the refined maps are head means:
        choose the cross-attention heads with ``trace(heads=...)``)."""
        if heads is not None:
            raise InputError("refined maps are head means: select the cross-attention heads in trace(heads=...)")
        if self._video:
            raise TraceError("refined maps of videos are not supported: the traced call denoised several frames")
        assert self.accumulator is not None
        if branch == "cond" and branch not in self.accumulator.branches:
            raise TraceError(
                "no refined maps were recorded: no selected block with self-attention ran at a selected step "
                f"(resolutions {list(self.used) if self.used else 'all'}; check trace(layers=, "
                "factors=, steps=))"
            )
        hm = super().heat_maps(trace, i, prompt=prompt, branch=branch, steps=steps, layers=layers)
        hm.meta.update(method="refined", iterations=self.iterations,
                       resolutions=list(self.used) if self.used is not None else None)
        return hm
