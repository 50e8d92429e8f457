"""DAAM (Tang et al. 2023): a word's map is the text-image attention its tokens receive, upsampled to
one grid and aggregated over steps, layers and heads as the trace's ``AggregationConfig`` says
(``mode="daam"`` or the ``"reference"`` preset of PyPI ``daam`` 0.2.0). The streaming sums are those
of :class:`~daamkit.aggregate.Accumulator`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING

import torch

from daamkit.aggregate import Accumulator, resize_and_crop_maps
from daamkit.capture.base import LayerInfo, QueryChunk
from daamkit.methods.base import AttributionMethod, jsonable

if TYPE_CHECKING:
    from daamkit.heatmap import GlobalHeatMap
    from daamkit.trace import Trace


class DaamMethod(AttributionMethod):
    """Cross-attention maps of the prompt's own words; on in every trace."""

    name = "daam"
    aliases = ("cross",)
    captures = frozenset({"cross_attention"})
    chunks = True

    def __init__(self) -> None:
        super().__init__()
        self.accumulator: Accumulator | None = None

    def start_generation(self, trace: Trace) -> None:
        gen = trace.generation
        self.accumulator = Accumulator(trace.config, gen.call.latent_hw, gen.num_images, frames=gen.call.frames)

    def wants(self, trace: Trace, layer: LayerInfo, image_tokens: int) -> bool:
        assert self.accumulator is not None
        return self.accumulator.wants(layer, image_tokens)

    def on_attention(
        self, trace: Trace, layer: LayerInfo, probs: torch.Tensor, branch: str, chunk: QueryChunk | None = None
    ) -> None:
        assert self.accumulator is not None
        self.accumulator.add(layer, trace.generation.step, probs, branch, chunk)

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
        from daamkit.heatmap import GlobalHeatMap

        gen = trace.generation
        if branch not in ("cond", "negative"):
            raise ValueError(f"branch must be 'cond' or 'negative', got {branch!r}")
        if branch == "negative" and not gen.cfg:
            raise ValueError("this call ran without classifier-free guidance: there is no negative branch")
        if not 0 <= i < gen.num_images:
            raise IndexError(f"image index {i} out of range: the traced call made {gen.num_images} image(s)")
        assert self.accumulator is not None  # set with the generation
        maps = self.accumulator.result(branch, steps=steps, layers=layers, heads=heads)[i]
        alignment = trace.alignment(i, prompt=prompt, branch=branch, total=int(maps.shape[0]))
        scale = trace.capture.cell_pixels(trace.pipe)
        h, w = gen.call.latent_hw
        meta = {
            "family": trace.capture.family,
            "pipeline": type(trace.pipe).__name__,
            "branch": branch,
            "image_index": i,
            "num_steps": gen.step + 1,
            "cfg": gen.cfg,
            "latent_hw": [h, w],
            "layers": sorted(self.accumulator.layers),
            "config": jsonable(asdict(trace.config)),
            "selection": jsonable({"steps": steps, "layers": layers, "heads": heads}),
        }
        time = trace.capture.time_axis(trace.pipe, gen.call.frames)
        if time is not None and gen.decoded is not None:
            time = time.decoded(*gen.decoded)
        if time is not None:
            meta["time"] = time.to_json()
        image_size = (h * scale, w * scale)
        if gen.output_resize is not None:
            # resolution binning: the tokens cover the bin's image, the pipeline returned a crop of it
            generated, image_size = gen.output_resize
            maps = resize_and_crop_maps(maps, generated, image_size)
            meta["generated_size"] = list(generated)
        return GlobalHeatMap(maps.cpu(), alignment, image_size=image_size, meta=meta)
