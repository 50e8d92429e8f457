"""The methods that record relation maps (:mod:`daamkit.relation`): ``"image->image"`` and ``"text->text"``.

They live on a trace like the attribution methods (same lifecycle, hooks removed on exit) but give no
word maps: they are read with ``tc.relation(i, kind)``.

image->image, UNet family: each traced cross-attention layer's sibling self-attention (``attn1`` of
the same transformer block) is read by projection hooks, as the capture reads ``attn2``: the queries
and keys as the layer's processor computes them. Joint transformers: the capture's SDPA watch hands
over the q and k of each joint attention call (:class:`~daamkit.capture.sdpa.JointCall`), whose image
queries are also its image keys. Either way only the chosen queries' rows are computed, (queries x
image keys) per head, never the full (image x image) block; a region's rows are averaged with the
weight of the area it covers in each cell of the layer's grid, then the result goes through DAAM's
:class:`~daamkit.aggregate.Accumulator` (head mean, bicubic upsampling to the grid, sum over steps of
the mean over layers) with the trace's ``AggregationConfig``.

text->text (joint transformers only: cross-attention models have no text queries): the text queries
of each joint attention call over its text keys, (T x T) per head, summed the same way.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from daamkit.aggregate import Accumulator, layer_grid, layer_matches, resize_and_crop_maps
from daamkit.capture.base import LayerInfo, ProjectionTap
from daamkit.capture.families import FAMILIES
from daamkit.capture.sdpa import JointCall, block_probabilities
from daamkit.errors import InputError, TraceError
from daamkit.methods.base import AttributionMethod, jsonable
from daamkit.relation import ImageRelationMap, RelationQuery, TokenRelationMatrix, parse_queries

if TYPE_CHECKING:
    from daamkit.heatmap import GlobalHeatMap
    from daamkit.trace import Trace


def _joint(family: Any) -> bool:
    """Every site is one [text, image] sequence shared by the batch's rows (the capture then hands over
    each call's whole q and k)."""
    return all(s.layout in ("text_image", "image_text") and not (s.per_row or s.packed_rows) for s in family.sites)


#: Transformer families whose every traced attention is one joint sequence of text and image tokens.
JOINT_FAMILIES = tuple(f.name for f in FAMILIES if f.sites and _joint(f))
#: Of those, the image (not video) families.
JOINT_IMAGE_FAMILIES = tuple(f.name for f in FAMILIES if f.sites and _joint(f) and f.time is None)


class RelationMethod(AttributionMethod):
    """A method that records a relation map instead of word maps."""

    def heat_maps(self, trace: Trace, i: int, **options: Any) -> GlobalHeatMap:
        raise InputError(f"{self.name!r} is a relation, not word maps: read it with tc.relation({i}, {self.name!r})")

    @abstractmethod
    def relation(self, trace: Trace, i: int, **options: Any) -> Any:
        """The relation of image ``i`` of the latest generation (options: ``steps``, ``layers``, ``heads``)."""

    def _check_image(self, trace: Trace, i: int, video: bool = False) -> None:
        """video: whether the relation is defined for a video (text->text is: it never reads the frames)."""
        gen = trace.generation
        if gen.call.frames > 1 and not video:
            raise TraceError(f"{self.name} relations of videos are not supported: the traced call denoised several frames")
        if not 0 <= i < gen.num_images:
            raise IndexError(f"image index {i} out of range: the traced call made {gen.num_images} image(s)")

    def _meta(self, trace: Trace, i: int, layers: Sequence[str], selection: dict[str, Any]) -> dict[str, Any]:
        gen = trace.generation
        return {
            "family": trace.capture.family,
            "pipeline": type(trace.pipe).__name__,
            "relation": self.name,
            "branch": "cond",
            "image_index": i,
            "num_steps": gen.step + 1,
            "latent_hw": list(gen.call.latent_hw),
            "layers": sorted(layers),
            "config": jsonable(asdict(trace.config)),
            "selection": jsonable(selection),
        }


class _SelfTap(ProjectionTap):
    """A UNet self-attention layer's queries and keys, handed to the method after the layer ran."""

    def __init__(self, layer: LayerInfo, attn: nn.Module, owner: ImageRelationMethod):
        super().__init__(layer, attn, sink=None)  # type: ignore[arg-type]  # reports to owner, not a sink
        self.owner = owner

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        q, k = self.take()
        if q is not None and k is not None:
            with torch.no_grad():
                self.owner._on_self_attention(self.layer, self.attn, q, k)


def _self_attention_layers(trace: Trace) -> list[tuple[LayerInfo, nn.Module]]:
    """The self-attention beside each traced cross-attention layer of a UNet (``attn1`` of its block)."""
    modules = dict(trace.capture.denoiser.named_modules())
    found = []
    for layer in trace.capture.layers:
        parent, _, leaf = layer.name.rpartition(".")
        sibling = f"{parent}.attn1" if leaf == "attn2" else None
        attn = modules.get(sibling) if sibling else None
        if attn is None or getattr(attn, "is_cross_attention", True) or getattr(attn, "to_q", None) is None:
            continue
        found.append((LayerInfo(sibling, layer.block, layer.index, int(attn.heads)), attn))
    return found


class ImageRelationMethod(RelationMethod):
    """Where the ``query`` (a point (y, x) in pixels, a boolean (H, W) mask, or a list of them) attends
    in the image; read with ``tc.relation(i, "image->image")``."""

    name = "image->image"
    captures = frozenset({"joint_attention"})
    families = ("unet", *JOINT_IMAGE_FAMILIES)
    requirement = (
        "image->image relations need a Stable Diffusion UNet (self-attention) or a joint-attention transformer "
        f"({', '.join(JOINT_IMAGE_FAMILIES)})"
    )
    not_enabled = "no image->image relation was traced: pass relations=['image->image'] and query=(y, x) to trace()"

    def __init__(self, query: Any) -> None:
        super().__init__()
        self.queries: list[RelationQuery] = parse_queries(query)
        self.accumulator: Accumulator | None = None
        self._trace: Trace | None = None
        self._size: tuple[int, int] = (0, 0)
        self._selection: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._video = False

    def attach(self, trace: Trace) -> None:
        self._trace = trace
        if trace.capture.family != "unet":
            return  # joint families: the capture hands over each call (on_joint_attention)
        layers = _self_attention_layers(trace)
        if not layers:
            raise InputError(f"{type(trace.capture.denoiser).__name__} has no self-attention beside its "
                             "cross-attention layers: image->image relations cannot be read")
        for layer, attn in layers:
            _SelfTap(layer, attn, self).install(self.hooks, attn.to_k)

    def start_generation(self, trace: Trace) -> None:
        gen = trace.generation
        self._video = gen.call.frames > 1
        scale = trace.capture.cell_pixels(trace.pipe)
        h, w = gen.call.latent_hw
        self._size = (h * scale, w * scale)
        self._selection = {}
        if not self._video:
            for q in self.queries:
                q.check(self._size)
        self.accumulator = Accumulator(trace.config, gen.call.latent_hw, gen.num_images)

    def _select(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions, weights): the image queries any query touches on a layer of ``n`` image
        positions, and each query's weight on them (queries, positions)."""
        got = self._selection.get(n)
        if got is None:
            assert self._trace is not None
            gh, gw, _ = layer_grid(self._trace.generation.call.latent_hw, n)
            weights = torch.stack([q.weights(self._size, (gh, gw)) for q in self.queries])
            positions = torch.nonzero(weights.sum(0) > 0).flatten()
            got = self._selection[n] = (positions, weights[:, positions])
        return got

    def _add(self, layer: LayerInfo, probs: torch.Tensor, weights: torch.Tensor) -> None:
        """probs: (b, heads, chosen queries, image keys) -> each query's weighted row, as the
        (b, heads, image keys, queries) block the accumulator folds like word maps."""
        assert self.accumulator is not None and self._trace is not None
        rel = torch.einsum("qs,bhsn->bhnq", weights.to(probs), probs)
        self.accumulator.add(layer, self._trace.generation.step, rel, "cond")

    def _on_self_attention(self, layer: LayerInfo, attn: nn.Module, q: torch.Tensor, k: torch.Tensor) -> None:
        trace, acc = self._trace, self.accumulator
        if trace is None or acc is None or self._video or q.dim() != 3 or k.shape[:2] != q.shape[:2]:
            return
        rows = trace.branch_rows(q.shape[0]).get("cond")
        if rows is None or not acc.wants(layer, q.shape[1]):
            return
        positions, weights = self._select(int(q.shape[1]))
        heads = int(attn.heads)
        qh = q[rows][:, positions.to(q.device)].unflatten(-1, (heads, -1)).transpose(1, 2)
        kh = k[rows].unflatten(-1, (heads, -1)).transpose(1, 2)
        if getattr(attn, "norm_q", None) is not None:
            qh = attn.norm_q(qh)
        if getattr(attn, "norm_k", None) is not None:
            kh = attn.norm_k(kh)
        probs = block_probabilities(qh, kh, slice(None), slice(None), scale=float(attn.scale))
        self._add(layer, probs, weights)

    def on_joint_attention(self, trace: Trace, layer: LayerInfo, call: JointCall) -> None:
        acc = self.accumulator
        rows = call.rows.get("cond")
        if acc is None or self._video or rows is None:
            return
        span = range(*call.where.queries.indices(int(call.q.shape[2])))
        if not acc.wants(layer, len(span)):
            return
        positions, weights = self._select(len(span))
        where = torch.as_tensor(span, device=call.q.device)[positions.to(call.q.device)]
        probs = block_probabilities(call.q, call.k, where, call.where.queries, scale=call.scale, mask=call.mask,
                                    rows=rows, probabilities=trace.config.probabilities)
        self._add(layer, probs, weights)

    def relation(
        self,
        trace: Trace,
        i: int,
        *,
        steps: Sequence[int] | range | None = None,
        layers: Sequence[str] | None = None,
        heads: Sequence[int] | None = None,
        **_: Any,
    ) -> ImageRelationMap:
        self._check_image(trace, i)
        acc = self.accumulator
        if acc is None or "cond" not in acc.branches:
            raise TraceError("no image->image relation was recorded (no selected attention layer ran inside the "
                             "trace, or its projections were fused)")
        try:
            maps = acc.result("cond", steps=steps, layers=layers, heads=heads)[i]
        except ValueError as e:
            raise InputError(str(e)) from None
        gen = trace.generation
        size = self._size
        meta = self._meta(trace, i, list(acc.layers), {"steps": steps, "layers": layers, "heads": heads})
        meta["queries"] = [q.label() for q in self.queries]
        if gen.output_resize is not None:
            generated, size = gen.output_resize
            maps = resize_and_crop_maps(maps, generated, size)
            meta["generated_size"] = list(generated)
        return ImageRelationMap(maps.cpu(), list(self.queries), tuple(size), meta)


class TextRelationMethod(RelationMethod):
    """Token-to-token attention of the prompt inside joint attention; read with ``tc.relation(i, "text->text")``."""

    name = "text->text"
    captures = frozenset({"joint_attention"})
    families = JOINT_FAMILIES
    requirement = (
        "text->text relations need a joint-attention transformer, where text queries attend to text keys "
        f"({', '.join(JOINT_FAMILIES)}); cross-attention models have no text queries"
    )
    not_enabled = "no text->text relation was traced: pass relations=['text->text'] to trace()"

    def __init__(self) -> None:
        super().__init__()
        self.sums: dict[tuple[int | None, str | None], torch.Tensor] = {}
        self.layers: dict[str, LayerInfo] = {}
        self.steps: set[int] = set()
        self.num_images = 0

    def start_generation(self, trace: Trace) -> None:
        self.sums, self.layers, self.steps = {}, {}, set()
        self.num_images = trace.generation.num_images

    def on_joint_attention(self, trace: Trace, layer: LayerInfo, call: JointCall) -> None:
        rows = call.rows.get("cond")
        cfg = trace.config
        if rows is None or not cfg.selects_layer(layer, 1):
            return
        text = call.where.keys
        span = range(*text.indices(int(call.k.shape[2])))
        if not len(span):
            return
        probs = block_probabilities(call.q, call.k, text, text, scale=call.scale, mask=call.mask,
                                    valid=call.where.valid, rows=rows, probabilities=cfg.probabilities)
        if cfg.heads is not None:
            bad = [h for h in cfg.heads if not 0 <= h < probs.shape[1]]
            if bad:
                raise InputError(f"heads {bad} out of range: layer {layer.name} has {probs.shape[1]} heads")
            probs = probs[:, list(cfg.heads)]
        if not cfg.keep_heads:
            probs = probs.mean(1, keepdim=True)
        step = trace.generation.step
        key = (step if cfg.keep_steps else None, layer.name if cfg.keep_layers else None)
        acc = self.sums.get(key)
        if acc is not None and acc.shape != probs.shape:
            raise TraceError(f"layer {layer.name} sees {probs.shape[-1]} text tokens, other layers {acc.shape[-1]}")
        self.sums[key] = probs.clone() if acc is None else acc.add_(probs)
        self.layers[layer.name] = layer
        self.steps.add(step)

    def _result(self, trace: Trace, steps: Sequence[int] | range | None, layers: Sequence[str] | None,
                heads: Sequence[int] | None) -> torch.Tensor:
        cfg = trace.config
        for what, given, kept in (("steps", steps, cfg.keep_steps), ("layers", layers, cfg.keep_layers),
                                  ("heads", heads, cfg.keep_heads)):
            if given is not None and not kept:
                raise InputError(f"selecting {what} after the run needs keep_{what}=True in trace() "
                                 f"(or {what}=... in trace())")
        chosen = {n for n, info in self.layers.items() if layers is None or any(layer_matches(s, info) for s in layers)}
        if not chosen:
            raise InputError(f"no recorded layer matches {list(layers or [])}; recorded: {sorted(self.layers)}")
        step_set = set(steps) if steps is not None else None
        total = None
        for (step, name), acc in self.sums.items():
            if (step_set is not None and step not in step_set) or (name is not None and name not in chosen):
                continue
            if heads is not None:
                acc = acc[:, list(heads)]
            total = acc.clone() if total is None else total.add_(acc)
        if total is None:
            raise InputError(f"no recorded step matches {sorted(step_set or [])}; recorded: {sorted(self.steps)}")
        return total.mean(1) / len(chosen)

    def relation(
        self,
        trace: Trace,
        i: int,
        *,
        prompt: str | None = None,
        steps: Sequence[int] | range | None = None,
        layers: Sequence[str] | None = None,
        heads: Sequence[int] | None = None,
        **_: Any,
    ) -> TokenRelationMatrix:
        """prompt: the image's prompt where the pipeline was given ``prompt_embeds`` (as for heat_maps);
        ``i`` indexes the call's images or videos."""
        self._check_image(trace, i, video=True)
        if not self.sums:
            raise TraceError("no text->text relation was recorded (no selected joint attention layer ran inside "
                             "the trace)")
        matrix = self._result(trace, steps, layers, heads)[i]
        alignment = trace.alignment(i, prompt=prompt, branch="cond", total=int(matrix.shape[-1]))
        meta = self._meta(trace, i, list(self.layers), {"steps": steps, "layers": layers, "heads": heads})
        return TokenRelationMatrix(matrix.cpu(), alignment, meta)


RELATION_METHODS: dict[str, type[RelationMethod]] = {
    cls.name: cls for cls in (ImageRelationMethod, TextRelationMethod)
}
