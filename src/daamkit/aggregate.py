"""Streaming aggregation of per-layer attention maps into DAAM heat maps.

Capture hands us, for every traced attention call, the probabilities of image queries over text keys
for the images of one branch (conditional or negative). We fold them into running sums at once, so
memory is O(images x tokens x grid) and does not grow with the number of steps; per-step, per-layer
or per-head tensors are only kept when the user asks for them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F

from daamkit.capture.base import LayerInfo, QueryChunk
from daamkit.errors import InputError

Mode = Literal["daam", "reference"]
BLOCKS = ("down", "mid", "up", "single", "joint", "double", "cross")


@dataclass(frozen=True)
class AggregationConfig:
    """What to aggregate and what to keep. The defaults follow the DAAM definition.

    steps: denoising steps to include (0-based index of the denoiser call within a generation);
        ``None`` = all. A ``range`` or any sequence of ints.
    layers: layer selectors; a selector is a block kind (``"down"``, ``"mid"``, ``"up"``), a name
        prefix (``"up_blocks.1"``) or a full module name. ``None`` = all cross-attention layers.
    factors: keep only layers whose grid is the latent grid downsampled by one of these factors
        (SD 1.5 at 512 px: 1 -> 64x64, 2 -> 32x32, 4 -> 16x16, 8 -> 8x8 mid block).
    heads: head indices to include; ``None`` = all.
    keep_steps / keep_layers / keep_heads: keep separate sums per step / layer / head so that
        ``Trace.heat_maps`` can select them after the run (costs memory proportional to that count).
    negative: also aggregate the negative-prompt (unconditional) branch of classifier-free guidance.
    mode: ``"daam"`` upsamples every call's head-averaged map bicubically to the grid, clamps at 0 and
        sums; ``"reference"`` reproduces PyPI ``daam`` 0.2.0 exactly (see ``reference()``).
    grid: (height, width) of the aggregation grid; ``None`` = the latent grid of the generation.
    chunk_mib: memory budget (MiB) for one block of image-query x text-key probabilities: a call
        whose block is larger (a video's tens of thousands of queries) is computed in chunks of
        queries that fit, so the extra memory of tracing does not grow with the frame count. On CPU
        the parts are also at most ``CPU_BLOCK_MIB`` (8 MiB), which is faster there.
    probabilities: for joint attention (text and image in one sequence), ``"text"`` softmaxes the
        image queries' scores over the text keys only (the analogue of a UNet's cross-attention, and
        DAAM's definition: where each word acts, whatever share of attention text gets there);
        ``"model"`` keeps the model's own softmax over every key (a map then also shows how much each
        position attends to text at all). Cross-attention families give the same maps either way.
    """

    steps: Sequence[int] | range | None = None
    layers: Sequence[str] | None = None
    factors: Sequence[int] | None = None
    heads: Sequence[int] | None = None
    keep_steps: bool = False
    keep_layers: bool = False
    keep_heads: bool = False
    negative: bool = False
    mode: Mode = "daam"
    grid: tuple[int, int] | None = None
    probabilities: Literal["text", "model"] = "text"
    chunk_mib: float = 32.0

    def __post_init__(self) -> None:
        if not isinstance(self.chunk_mib, int | float) or not self.chunk_mib > 0:
            raise InputError(f"chunk_mib must be a positive number of MiB, got {self.chunk_mib!r}")
        if self.probabilities not in ("text", "model"):
            raise InputError(f"probabilities must be 'text' or 'model', got {self.probabilities!r}")
        if self.mode not in ("daam", "reference"):
            raise InputError(f"mode must be 'daam' or 'reference', got {self.mode!r}")
        if self.mode == "reference" and (self.keep_steps or self.keep_layers or self.keep_heads):
            raise InputError("the 'reference' mode keeps per-layer/head sums internally; keep_* options are not allowed")
        if self.steps is not None and any(int(s) < 0 for s in self.steps):
            raise InputError(f"steps must be non-negative step indices, got {list(self.steps)}")
        if self.grid is not None and (len(self.grid) != 2 or min(self.grid) < 1):
            raise InputError(f"grid must be (height, width) with positive sizes, got {self.grid}")

    @classmethod
    def reference(cls, **overrides: object) -> AggregationConfig:
        """The preset that reproduces PyPI ``daam`` 0.2.0.

        For each cross-attention layer of the down and up blocks (mid block excluded) and each head,
        the conditional branch's probabilities over the text keys are summed over all steps at the
        layer's own resolution; each (layer, head) sum is then upsampled bicubically
        (``align_corners=False``) to the latent grid, clamped at 0, and the result is the mean over
        all (layer, head) pairs.
        """
        base = dict(layers=("down", "up"), mode="reference")
        base.update(overrides)
        return cls(**base)  # type: ignore[arg-type]

    def with_(self, **changes: object) -> AggregationConfig:
        return replace(self, **changes)  # type: ignore[arg-type]

    def selects_layer(self, layer: LayerInfo, factor: int) -> bool:
        if self.factors is not None and factor not in set(self.factors):
            return False
        if self.layers is None:
            return True
        return any(_layer_matches(sel, layer) for sel in self.layers)

    def selects_step(self, step: int) -> bool:
        return self.steps is None or step in set(self.steps)

    def check_selection(self, layers: Sequence[LayerInfo], num_steps: int | None = None,
                        factors: Mapping[str, int] | None = None) -> None:
        """Raise :class:`InputError` if the selection cannot record anything for these layers and
        ``num_steps`` denoising steps, before a generation is spent on it.

        ``factors``: each layer's downsampling factor by name, where the caller knows it (the factor
        otherwise shows only once attention runs); without it ``factors`` is not checked.
        """
        layers = list(layers)
        chosen = layers
        if self.layers is not None:
            chosen = [info for info in layers if any(_layer_matches(sel, info) for sel in self.layers)]
            if not chosen:
                kinds = sorted({info.block for info in layers}, key=lambda b: BLOCKS.index(b) if b in BLOCKS else 99)
                raise InputError(
                    f"layers {list(self.layers)} match no attention layer: use a block kind ({', '.join(kinds)}), "
                    f"a name prefix or a full name, e.g. {layers[0].name}"
                )
        if self.factors is not None and factors is not None:
            have = sorted({factors[info.name] for info in chosen if info.name in factors})
            if not set(self.factors) & set(have):
                raise InputError(f"factors {list(self.factors)} match no selected layer: the layers have factors "
                                 f"{', '.join(map(str, have))}")
        if self.heads is not None:
            fewest = min(info.heads for info in chosen)
            bad = [h for h in self.heads if not 0 <= h < fewest]
            if bad:
                counts = sorted({info.heads for info in chosen})
                raise InputError(f"heads {bad} do not exist: the selected layers have {'/'.join(map(str, counts))} "
                                 f"heads, numbered 0..{fewest - 1}")
        if self.steps is not None and num_steps is not None:
            if not set(self.steps) & set(range(num_steps)):
                raise InputError(f"steps {_span(self.steps)} select none of the {num_steps} denoising steps, "
                                 f"numbered 0..{num_steps - 1}")


def _span(steps: Sequence[int] | range) -> str:
    if isinstance(steps, range) and steps.step == 1:
        return f"{steps.start}:{steps.stop}"
    return str(list(steps))


def _layer_matches(selector: str, layer: LayerInfo) -> bool:
    if selector in BLOCKS:
        return layer.block == selector
    return layer.name == selector or layer.name.startswith(selector.rstrip(".") + ".")


def layer_matches(selector: str, layer: LayerInfo) -> bool:
    """Whether a layer selector (block kind, name prefix or full name) picks ``layer``."""
    return _layer_matches(selector, layer)


def layer_grid(latent_hw: tuple[int, int], tokens: int) -> tuple[int, int, int]:
    """The (h, w, factor) of a layer whose image sequence has ``tokens`` positions.

    UNet downsamplers use stride 2 with padding, so odd sizes round up at each level.
    """
    h, w = latent_hw
    factor = 1
    while h * w > tokens:
        h, w, factor = math.ceil(h / 2), math.ceil(w / 2), factor * 2
    if h * w != tokens:
        raise ValueError(
            f"cannot place {tokens} image positions on a grid derived from the latent size {latent_hw}"
        )
    return h, w, factor


# On CPU a block of probabilities larger than this is computed in parts even within the memory budget:
# blocks of tens of MiB are mapped fresh from the OS by the allocator at every call and page-faulted in,
# which made the capture's product and softmax of one 512 px Flux block twice as slow as in 8 MiB parts.
CPU_BLOCK_MIB = 8.0


def chunk_size(total: int, frame: int, bytes_per_query: int, mib: float,
               device: torch.device | str | None = None) -> int:
    """Image queries per chunk (``total``: no chunking) so that a chunk's probabilities fit in ``mib``
    MiB; whole frames where a frame fits, since resizing works frame by frame. A block computed on the
    CPU (``device``) is also kept within ``CPU_BLOCK_MIB``."""
    if device is not None and torch.device(device).type == "cpu":
        mib = min(mib, CPU_BLOCK_MIB)
    budget = int(mib * 2**20)
    if total * bytes_per_query <= budget:
        return total
    per = max(1, budget // max(1, bytes_per_query))
    return per - per % frame if frame > 0 and per >= frame else per


@dataclass
class _BranchSums:
    sums: dict[tuple[int | None, str | None], torch.Tensor] = field(default_factory=dict)
    layers_seen: set[str] = field(default_factory=set)
    steps_seen: set[int] = field(default_factory=set)
    # reference mode: (layer) -> (B, heads, T, F, h, w) sums over steps at native resolution
    native: dict[str, torch.Tensor] = field(default_factory=dict)
    # a separate negative call (true CFG) may see another text length than the positive one
    num_tokens: int | None = None
    # chunked calls that resize: the frame under construction, per layer: (frame index, (B, heads, T, h*w))
    partial: dict[str, tuple[int, torch.Tensor]] = field(default_factory=dict)


class Accumulator:
    """Running sums of attention maps for one generation (one call of the pipeline)."""

    def __init__(self, config: AggregationConfig, latent_hw: tuple[int, int], num_images: int, frames: int = 1):
        """frames: the video's token frames (1 for an image); sums then hold (..., frames, h, w)."""
        self.config = config
        self.latent_hw = latent_hw
        self.frames = int(frames)
        self.grid = tuple(config.grid) if config.grid is not None else tuple(latent_hw)
        self.num_images = num_images
        self.branches: dict[str, _BranchSums] = {}
        self.layers: dict[str, LayerInfo] = {}

    # ---- writing -----------------------------------------------------------------------------
    def wants(self, layer: LayerInfo, image_tokens: int) -> bool:
        """Whether :meth:`add` keeps this layer's maps (the step is checked by the caller's rows)."""
        try:
            factor = layer_grid(self.latent_hw, image_tokens)[2]
        except ValueError:
            return True  # let add() raise its error with the probabilities at hand
        return self.config.selects_layer(layer, factor)

    def add(self, layer: LayerInfo, step: int, probs: torch.Tensor, branch: str = "cond",
            chunk: QueryChunk | None = None) -> None:
        """Fold one call's probabilities in.

        probs: (B, heads, N, T) softmax over the T text keys for the N image queries of the layer,
        for the B images of ``branch``, in image order; a video's queries are frame-major. With
        ``chunk``, probs hold only the queries ``chunk.start:chunk.stop``; the chunks of one call
        come in order.
        """
        cfg = self.config
        b, heads, n, t = probs.shape
        total = n if chunk is None else chunk.total
        if total % self.frames:
            raise ValueError(f"layer {layer.name} has {total} image positions, not a multiple of {self.frames} frames")
        h, w, factor = layer_grid(self.latent_hw, total // self.frames)
        if not (cfg.selects_step(step) and cfg.selects_layer(layer, factor)):
            return
        sums = self.branches.setdefault(branch, _BranchSums())
        if sums.num_tokens is None:
            sums.num_tokens = t
        elif t != sums.num_tokens:
            raise ValueError(f"layer {layer.name} sees {t} text tokens, other layers {sums.num_tokens}")
        if cfg.heads is not None:
            bad = [i for i in cfg.heads if not 0 <= i < heads]
            if bad:
                raise ValueError(f"heads {bad} out of range: layer {layer.name} has {heads} heads (0..{heads - 1})")
            probs = probs[:, list(cfg.heads)]
        self.layers[layer.name] = layer
        sums.layers_seen.add(layer.name)
        sums.steps_seen.add(step)
        probs = probs.float()
        if cfg.mode == "daam" and not cfg.keep_heads:
            # The head average reads the (B, heads, N, T) layout the capture hands over in memory
            # order; on the (B, heads, T, h, w) view below the same sums cost 10-20x as much.
            probs = probs.mean(dim=1, keepdim=True)
        hp = probs.shape[1]
        if chunk is not None and (chunk.start, chunk.stop) != (0, total):
            self._add_chunk(sums, layer, step, probs, chunk, (h, w))
            return
        # (B, heads, N, T) -> (B, heads, T, F, h, w), a view
        maps = probs.permute(0, 1, 3, 2).reshape(b, hp, t, self.frames, h, w)

        if cfg.mode == "reference":
            acc = sums.native.get(layer.name)
            sums.native[layer.name] = maps.clone() if acc is None else acc.add_(maps)
            return

        if tuple(self.grid) == (h, w):
            # Already on the grid: nothing to resize, and clamping softmax averages at 0 changes
            # nothing, so the maps are summed as they are.
            up = maps
        else:
            up = _upsample(maps, self.grid).clamp_(min=0)
        key = (step if cfg.keep_steps else None, layer.name if cfg.keep_layers else None)
        acc = sums.sums.get(key)
        if acc is None:
            # a copy: ``maps`` may be a view of the probabilities the other methods also receive
            sums.sums[key] = up.contiguous() if up is not maps else maps.clone(memory_format=torch.contiguous_format)
        else:
            acc.add_(up)

    def _add_chunk(self, sums: _BranchSums, layer: LayerInfo, step: int, probs: torch.Tensor,
                   chunk: QueryChunk, native: tuple[int, int]) -> None:
        """Fold in the queries ``chunk`` of a call; the result equals folding the whole call at once."""
        cfg = self.config
        b, hp, _, t = probs.shape
        h, w = native
        cols = probs.permute(0, 1, 3, 2)  # (B, heads, T, n)
        shape = (b, hp, t, self.frames)
        if cfg.mode == "reference":
            acc = sums.native.get(layer.name)
            if acc is None:
                acc = sums.native[layer.name] = probs.new_zeros(*shape, h, w)
            acc.view(*shape[:3], -1)[..., chunk.start:chunk.stop].add_(cols)
            return
        key = (step if cfg.keep_steps else None, layer.name if cfg.keep_layers else None)
        acc = sums.sums.get(key)
        if acc is None:
            acc = sums.sums[key] = probs.new_zeros(*shape, *self.grid)
        if tuple(self.grid) == (h, w):
            acc.view(*shape[:3], -1)[..., chunk.start:chunk.stop].add_(cols)
            return
        # Resizing works on whole frames: whole frames in the chunk go at once, a frame split between
        # chunks is gathered first (the chunks of a call come in order).
        frame = h * w
        start, stop = chunk.start, chunk.stop
        first, last = -(-start // frame), stop // frame  # whole frames first..last-1
        if first < last:
            block = cols[..., first * frame - start: last * frame - start].reshape(b, hp, t, last - first, h, w)
            acc[:, :, :, first:last].add_(_upsample(block, self.grid).clamp_(min=0))
        pieces = [(start, min(stop, first * frame))] if start < first * frame else []
        if last * frame < stop and last >= first:
            pieces.append((last * frame, stop))
        for s0, s1 in pieces:
            f = s0 // frame
            held = sums.partial.get(layer.name)
            if held is None or held[0] != f:
                held = (f, probs.new_zeros(b, hp, t, frame))
                sums.partial[layer.name] = held
            held[1][..., s0 - f * frame: s1 - f * frame] = cols[..., s0 - start: s1 - start]
            if s1 == (f + 1) * frame:
                plane = held[1].reshape(b, hp, t, 1, h, w)
                acc[:, :, :, f:f + 1].add_(_upsample(plane, self.grid).clamp_(min=0))
                del sums.partial[layer.name]

    # ---- reading -----------------------------------------------------------------------------
    def result(
        self,
        branch: str = "cond",
        steps: Iterable[int] | None = None,
        layers: Sequence[str] | None = None,
        heads: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Aggregated maps (B, T, gh, gw), (B, T, F, gh, gw) for a video: sum over steps of the mean
        over layers (and heads)."""
        out = self._result(branch, steps, layers, heads)
        return out[:, :, 0] if self.frames == 1 else out

    def _result(
        self,
        branch: str,
        steps: Iterable[int] | None,
        layers: Sequence[str] | None,
        heads: Sequence[int] | None,
    ) -> torch.Tensor:
        cfg = self.config
        if branch not in self.branches:
            if branch == "negative" and not cfg.negative:
                raise ValueError("negative-branch maps were not recorded: pass negative=True to trace()")
            raise ValueError(f"no attention was recorded for the {branch!r} branch (did the pipeline run inside the trace?)")
        sums = self.branches[branch]

        if cfg.mode == "reference":
            if steps is not None or layers is not None or heads is not None:
                raise ValueError("the 'reference' mode gives the reference aggregate only; select steps/layers/heads in trace()")
            total, count = None, 0
            for native in sums.native.values():  # one layer at a time keeps the peak small
                b, hd, t, f, h, w = native.shape
                up = _upsample(native.reshape(b, hd * t * f, h, w), self.grid).clamp_(min=0)
                part = up.reshape(b, hd, t, f, *self.grid).sum(dim=1)
                total = part if total is None else total.add_(part)
                count += hd
            return total / count

        if steps is not None and not cfg.keep_steps:
            raise ValueError("selecting steps after the run needs keep_steps=True in trace() (or steps=... in trace())")
        if layers is not None and not cfg.keep_layers:
            raise ValueError("selecting layers after the run needs keep_layers=True in trace() (or layers=... in trace())")
        if heads is not None and not cfg.keep_heads:
            raise ValueError("selecting heads after the run needs keep_heads=True in trace() (or heads=... in trace())")
        step_set = set(steps) if steps is not None else None
        chosen_layers = {
            name
            for name in sums.layers_seen
            if layers is None or any(_layer_matches(sel, self.layers[name]) for sel in layers)
        }
        if not chosen_layers:
            raise ValueError(f"no recorded layer matches {list(layers or [])}; recorded: {sorted(sums.layers_seen)}")
        total = None
        for (step, name), acc in sums.sums.items():
            if step_set is not None and step not in step_set:
                continue
            if name is not None and name not in chosen_layers:
                continue
            if heads is not None:
                acc = acc[:, list(heads)]
            total = acc.clone() if total is None else total.add_(acc)
        if total is None:
            raise ValueError(f"no recorded step matches {sorted(step_set or [])}; recorded: {sorted(sums.steps_seen)}")
        # mean over layers (the sum above ran over every selected layer) and over heads
        return total.mean(dim=1) / len(chosen_layers)

    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size()
            for s in self.branches.values()
            for t in list(s.sums.values()) + list(s.native.values())
        )


def _upsample(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic upsampling of (..., h, w) maps to ``size``, as the reference implementation does."""
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:]) if maps.dim() != 4 else maps
    if tuple(flat.shape[-2:]) == tuple(size):
        out = flat.clone()
    else:
        out = F.interpolate(flat, size=size, mode="bicubic", align_corners=False)
    return out.reshape(*lead, *size)


def resize_and_crop_maps(maps: torch.Tensor, source: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """The part of (..., gh, gw) maps of a ``source``-pixel image that a pipeline returns when it resizes
    the image (keeping its aspect ratio) to cover ``size`` and crops the centre (diffusers'
    ``resize_and_crop_tensor``, used by resolution binning), on a grid of about the same cell size.

    Each output cell takes the bilinear value at its centre's place in the source grid, so a crop by
    whole cells gives the maps' own values.
    """
    (sh, sw), (nh, nw) = source, size
    ratio = max(nh / sh, nw / sw)
    rh, rw = int(sh * ratio), int(sw * ratio)
    top, left = (rh - nh) // 2, (rw - nw) // 2
    gh, gw = maps.shape[-2:]
    oh, ow = max(1, round(gh * nh / rh)), max(1, round(gw * nw / rw))
    # output cell centres in the resized image's [0, 1] coordinates, then in grid_sample's [-1, 1]
    ys = (top + (torch.arange(oh, dtype=torch.float64) + 0.5) * nh / oh) / rh * 2 - 1
    xs = (left + (torch.arange(ow, dtype=torch.float64) + 0.5) * nw / ow) / rw * 2 - 1
    grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).to(maps.dtype)
    flat = maps.reshape(1, -1, gh, gw)
    out = F.grid_sample(flat, grid.unsqueeze(0), mode="bilinear", padding_mode="border", align_corners=False)
    return out.reshape(*maps.shape[:-2], oh, ow)
