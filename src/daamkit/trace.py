"""``trace(pipe)``: record text-image attention while an unchanged diffusers pipeline runs.

```python
with trace(pipe) as tc:
    image = pipe(prompt, generator=g).images[0]
    maps = tc.heat_maps()          # GlobalHeatMap of image 0
```

The trace only adds PyTorch hooks (denoiser pre-hook, projection hooks on the text-image attention,
text-encoder pre-hooks that read the token ids the model saw) and a logging handler that reads
diffusers' own truncation warning; all of them are removed on exit, also after an exception.
"""

from __future__ import annotations

import ast
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from daamkit.aggregate import Accumulator, AggregationConfig
from daamkit.capture import UnsupportedPipelineError, detect_capture
from daamkit.capture.base import DenoiserCall, HookSet, LayerInfo, is_traced
from daamkit.errors import DaamkitError

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
_TOKENIZER_OF = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2", "text_encoder_3": "tokenizer_3"}
_TRUNCATION_MARK = "was truncated because"


class TraceError(DaamkitError, RuntimeError):
    pass


@dataclass
class _TextCall:
    encoder: str
    ids: torch.Tensor  # (rows, seq) on CPU
    removed: list[str] | None = None  # text that diffusers reported as cut off, per row


@dataclass
class _Generation:
    call: DenoiserCall
    cfg: bool
    num_images: int
    accumulator: Accumulator
    text_calls: list[_TextCall]
    step: int = 0
    last_timestep: float = 0.0
    negative_call: bool = False  # the current denoiser call runs the negative prompt alone (Flux true CFG)
    concept_sum: torch.Tensor | None = None  # (B, K, h, w) sum over blocks and steps of concept maps
    concept_calls: int = 0
    timesteps: list[float] = field(default_factory=list)


class _TruncationLog(logging.Handler):
    """Reads diffusers' warning that names the part of a prompt past the tokenizer's limit."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.pending: list[str] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if _TRUNCATION_MARK not in msg:
            return
        try:
            removed = ast.literal_eval(msg[msg.index("tokens: ") + len("tokens: ") :].strip())
        except (ValueError, SyntaxError):
            return
        if isinstance(removed, list):
            self.pending = [str(r) for r in removed]


class Trace:
    """One traced session of a pipeline; created by :func:`trace`."""

    def __init__(
        self,
        pipe: Any,
        config: AggregationConfig,
        concepts: Sequence[str] | None = None,
        concept_embeds: torch.Tensor | None = None,
        concept_softmax: bool = True,
    ):
        self.pipe = pipe
        self.config = config
        self.capture = detect_capture(pipe)
        self.concepts = [str(c).strip() for c in concepts] if concepts else []
        if concept_embeds is not None and len(self.concepts) != concept_embeds.shape[0]:
            raise ValueError(
                f"concept_embeds has {concept_embeds.shape[0]} rows but {len(self.concepts)} concepts were named"
            )
        if self.concepts:
            if self.capture.family not in ("sd3", "flux"):
                raise UnsupportedPipelineError(
                    "concept maps need a joint-attention transformer (SD3/SD3.5 or Flux); "
                    f"this pipeline is a {self.capture.family} model: use the cross-attention maps (heat_maps)"
                )
            if any(not c for c in self.concepts) or len(set(self.concepts)) != len(self.concepts):
                raise ValueError(f"concepts must be distinct, non-empty words, got {list(concepts or [])}")
        self._concept_embeds = concept_embeds
        self.concept_softmax = concept_softmax
        self._concept_capture = None
        self._hooks = HookSet()
        self._log = _TruncationLog()
        self._gen: _Generation | None = None
        self._pending_text: list[_TextCall] = []
        self._text_since_denoiser = True
        self._active = False

    # ---- context management ------------------------------------------------------------------
    def __enter__(self) -> Trace:
        if self._active:
            raise TraceError("this trace is already active; a Trace object can be entered once at a time")
        if is_traced(self.capture.denoiser):
            raise TraceError(
                "this pipeline is already being traced by another daamkit trace; nested or concurrent traces "
                "of one pipeline are not supported — exit the other `with trace(pipe)` block first"
            )
        try:
            if self.concepts:
                from daamkit.methods.concept import ConceptCapture, encode_concepts

                embeds = self._concept_embeds
                if embeds is None:  # before our text-encoder hooks exist, so the prompt capture is clean
                    embeds = encode_concepts(self.pipe, self.capture.family, self.concepts)
                self._concept_capture = ConceptCapture(self.capture.denoiser, self.capture.family, embeds, self)
                self._concept_capture.attach()
            self.capture.attach(self)
            for attr in TEXT_ENCODERS:
                enc = getattr(self.pipe, attr, None)
                if isinstance(enc, nn.Module):
                    self._hooks.add(enc.register_forward_pre_hook(self._text_hook(attr), with_kwargs=True))
            logging.getLogger("diffusers").addHandler(self._log)
        except BaseException:
            self._detach()
            raise
        self._active = True
        return self

    def __exit__(self, *exc: object) -> bool:
        self._detach()
        return False

    def _detach(self) -> None:
        try:
            self.capture.detach()
            if self._concept_capture is not None:
                self._concept_capture.detach()
        finally:
            self._hooks.remove()
            logging.getLogger("diffusers").removeHandler(self._log)
            self._active = False

    # ---- sink for the capture ----------------------------------------------------------------
    def _text_hook(self, attr: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            ids = args[0] if args else kwargs.get("input_ids")
            if not isinstance(ids, torch.Tensor):
                return
            if self._gen is not None and not self._text_since_denoiser:
                self._pending_text = []  # a new pipeline call started
            self._text_since_denoiser = True
            removed, self._log.pending = self._log.pending, None
            self._pending_text.append(_TextCall(attr, ids.detach().to("cpu"), removed))

        return hook

    def on_denoiser_call(self, call: DenoiserCall) -> None:
        gen = self._gen
        if (
            gen is not None
            and not self._text_since_denoiser
            and self.capture.repeated_timestep_is_negative
            and call.timestep == gen.last_timestep
            and call.batch == gen.call.batch
        ):
            gen.negative_call = True  # same step again: the negative prompt's own call
            gen.cfg = True
            return
        new = (
            gen is None
            or self._text_since_denoiser
            or call.latent_hw != gen.call.latent_hw
            or call.batch != gen.call.batch
            or call.timestep > gen.last_timestep
        )
        if new:
            cfg = self._uses_cfg(call.batch)
            n = call.batch // 2 if cfg else call.batch
            gen = self._gen = _Generation(
                call=call,
                cfg=cfg,
                num_images=n,
                accumulator=Accumulator(self.config, call.latent_hw, n),
                text_calls=list(self._pending_text),
            )
        else:
            gen.step += 1
        gen.negative_call = False
        gen.last_timestep = call.timestep
        gen.timesteps.append(call.timestep)
        self._text_since_denoiser = False

    def _uses_cfg(self, batch: int) -> bool:
        try:
            flag = self.pipe.do_classifier_free_guidance
        except AttributeError:
            flag = None
        if isinstance(flag, bool):
            return flag and batch % 2 == 0
        encoders = [c.encoder for c in self._pending_text]
        return batch % 2 == 0 and len(encoders) > len(set(encoders))

    def branch_rows(self, batch: int) -> dict[str, slice]:
        gen = self._gen
        if gen is None or not self.config.selects_step(gen.step):
            return {}
        if gen.negative_call:
            return {"negative": slice(0, batch)} if self.config.negative else {}
        if not gen.cfg:
            return {"cond": slice(0, batch)}
        n = batch // 2
        rows = {"cond": slice(n, 2 * n)}
        if self.config.negative:
            rows["negative"] = slice(0, n)
        return rows

    def on_attention(self, layer: LayerInfo, probs: torch.Tensor, branch: str) -> None:
        assert self._gen is not None
        self._gen.accumulator.add(layer, self._gen.step, probs, branch)

    def on_concepts(self, block: str, sim: torch.Tensor) -> None:
        """sim: (B, K, N) dot products of image attention outputs with concept attention outputs."""
        gen = self._gen
        assert gen is not None
        layer = LayerInfo(name=f"{block}.attn", block="joint" if self.capture.family == "sd3" else "double",
                          index=-1, heads=0)
        if not self.config.selects_layer(layer, 1):
            return
        h, w = gen.call.latent_hw
        maps = sim.reshape(sim.shape[0], sim.shape[1], h, w)
        gen.concept_sum = maps.clone() if gen.concept_sum is None else gen.concept_sum.add_(maps)
        gen.concept_calls += 1

    # ---- results -----------------------------------------------------------------------------
    @property
    def num_images(self) -> int:
        return self._require_gen().num_images

    @property
    def num_steps(self) -> int:
        """Denoiser calls recorded in the latest generation."""
        return self._require_gen().step + 1

    @property
    def layers(self) -> list[LayerInfo]:
        return list(self.capture.layers)

    def _require_gen(self) -> _Generation:
        if self._gen is None:
            raise TraceError("nothing was traced yet: call the pipeline inside the `with trace(pipe) as tc:` block")
        return self._gen

    def heat_maps(
        self,
        i: int = 0,
        *,
        prompt: str | None = None,
        branch: str = "cond",
        steps: Sequence[int] | range | None = None,
        layers: Sequence[str] | None = None,
        heads: Sequence[int] | None = None,
        method: str = "cross",
    ):
        """The :class:`~daamkit.heatmap.GlobalHeatMap` of image ``i`` of the latest pipeline call.

        prompt: the prompt of that image, if the pipeline was given ``prompt_embeds`` (daamkit then did
            not see the token ids) or to name words past the tokenizer's limit exactly.
        branch: ``"cond"`` (default) or ``"negative"`` (needs ``negative=True`` in :func:`trace`).
        steps / layers / heads: select among what was kept (``keep_steps`` etc. in :func:`trace`).
        method: ``"cross"`` (DAAM maps of the prompt's words, default) or ``"concept"`` (ConceptAttention
            maps of the ``concepts`` given to :func:`trace`, which need not be in the prompt).
        """
        from daamkit.heatmap import GlobalHeatMap

        if method == "concept":
            return self._concept_maps(i)
        if method != "cross":
            raise ValueError(f"method must be 'cross' or 'concept', got {method!r}")
        gen = self._require_gen()
        if branch not in ("cond", "negative"):
            raise ValueError(f"branch must be 'cond' or 'negative', got {branch!r}")
        if branch == "negative" and not gen.cfg:
            raise ValueError("this call ran without classifier-free guidance: there is no negative branch")
        if not 0 <= i < gen.num_images:
            raise IndexError(f"image index {i} out of range: the traced call made {gen.num_images} image(s)")
        maps = gen.accumulator.result(branch, steps=steps, layers=layers, heads=heads)[i]
        alignment = self._alignment(gen, i, prompt, branch, total=int(maps.shape[0]))
        scale = self.capture.cell_pixels(self.pipe)
        h, w = gen.call.latent_hw
        meta = {
            "family": self.capture.family,
            "pipeline": type(self.pipe).__name__,
            "branch": branch,
            "image_index": i,
            "num_steps": gen.step + 1,
            "cfg": gen.cfg,
            "latent_hw": [h, w],
            "layers": sorted(gen.accumulator.layers),
            "config": _jsonable(asdict(self.config)),
            "selection": _jsonable({"steps": steps, "layers": layers, "heads": heads}),
        }
        return GlobalHeatMap(maps.cpu(), alignment, image_size=(h * scale, w * scale), meta=meta)

    def _concept_maps(self, i: int):
        from daamkit.heatmap import GlobalHeatMap
        from daamkit.tokens import TokenAlignment, Word, split_words

        gen = self._require_gen()
        if not self.concepts:
            raise TraceError("no concepts were traced: pass concepts=[...] to trace() for method='concept'")
        if gen.concept_sum is None:
            raise TraceError("no concept maps were recorded (no selected joint block ran inside the trace)")
        if not 0 <= i < gen.num_images:
            raise IndexError(f"image index {i} out of range: the traced call made {gen.num_images} image(s)")
        maps = gen.concept_sum[i] / gen.concept_calls
        if self.concept_softmax:
            maps = maps.softmax(dim=0)
        words: list[Word] = []
        seen: dict[str, int] = {}
        for k, concept in enumerate(self.concepts):
            for part in split_words(concept):
                words.append(Word(part, len(words), seen.get(part, 0), (k,), False, False))
                seen[part] = seen.get(part, 0) + 1
        alignment = TokenAlignment(tuple(self.concepts), tuple(words), len(self.concepts), " ".join(self.concepts))
        h, w = gen.call.latent_hw
        scale = self.capture.cell_pixels(self.pipe)
        meta = {"family": self.capture.family, "method": "concept", "concepts": list(self.concepts),
                "softmax": self.concept_softmax, "image_index": i, "num_steps": gen.step + 1,
                "config": _jsonable(asdict(self.config))}
        return GlobalHeatMap(maps.float().cpu(), alignment, image_size=(h * scale, w * scale), meta=meta)

    def all_heat_maps(self, **kwargs: Any) -> list:
        return [self.heat_maps(i, **kwargs) for i in range(self.num_images)]

    def _alignment(self, gen: _Generation, i: int, prompt: str | None, branch: str, total: int):
        from daamkit.tokens import concat_alignments

        called = list(dict.fromkeys(c.encoder for c in gen.text_calls))
        encoders = self.capture.context_encoders(called)
        if not encoders:
            encoders = self.capture.context_encoders(list(TEXT_ENCODERS))[:1] or ["text_encoder"]
        parts, used = [], 0
        for k, enc in enumerate(encoders):
            tok = getattr(self.pipe, _TOKENIZER_OF[enc], None)
            length = total - used if k == len(encoders) - 1 else int(getattr(tok, "model_max_length", 77))
            parts.append(self._encoder_alignment(gen, enc, i, prompt, branch, length))
            used += len(parts[-1].tokens)
        if len(parts) == 1 and len(parts[0].tokens) == total:
            return parts[0]
        return concat_alignments(parts, total=total)

    def _encoder_alignment(
        self, gen: _Generation, encoder: str, i: int, prompt: str | None, branch: str, length: int
    ):
        from daamkit.tokens import align, recover_prompt

        own = [c for c in gen.text_calls if c.encoder == encoder]
        index = 0 if branch == "cond" else 1
        call = own[index] if len(own) > index else None
        tokenizer = getattr(self.pipe, _TOKENIZER_OF[encoder], None)
        if tokenizer is None:
            raise TraceError(f"the pipeline has {encoder} but no {_TOKENIZER_OF[encoder]}: cannot name its tokens")
        if call is None:
            if prompt is None:
                raise TraceError(
                    "daamkit did not see the token ids of this prompt (the pipeline was given prompt_embeds, or "
                    "its negative prompt was zeroed): pass prompt=... to heat_maps()"
                )
            ids = tokenizer(prompt, padding="max_length", max_length=length, truncation=True).input_ids
            return align(tokenizer, ids, prompt)
        rows = call.ids.shape[0]
        row = min(i * rows // gen.num_images, rows - 1)
        ids = call.ids[row].tolist()
        if prompt is None and call.removed is not None and row < len(call.removed):
            # batch_decode keeps the EOS/pad tokens of shorter rows; a pad '!' (SDXL) may be real text
            eos = tokenizer.eos_token or "<|endoftext|>"
            removed = " ".join(call.removed[row].replace(eos, " ").replace("<pad>", " ").split())
            if removed:
                prompt = recover_prompt(tokenizer, ids, removed)
        return align(tokenizer, ids, prompt)


def trace(
    pipe: Any,
    *,
    steps: Sequence[int] | range | None = None,
    layers: Sequence[str] | None = None,
    factors: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    keep_steps: bool = False,
    keep_layers: bool = False,
    keep_heads: bool = False,
    negative: bool = False,
    mode: str = "daam",
    grid: tuple[int, int] | None = None,
    config: AggregationConfig | None = None,
    concepts: Sequence[str] | None = None,
    concept_embeds: torch.Tensor | None = None,
    concept_softmax: bool = True,
) -> Trace:
    """Trace a diffusers pipeline: ``with trace(pipe) as tc: pipe(...); tc.heat_maps(0)``.

    The options are those of :class:`~daamkit.aggregate.AggregationConfig`; ``mode="reference"``
    selects the preset that reproduces PyPI ``daam`` 0.2.0 (``AggregationConfig.reference()``).

    concepts: words (need not be in the prompt) for ConceptAttention-style maps on SD3/Flux, read with
        ``tc.heat_maps(i, method="concept")``; ``concept_embeds`` (concepts x context dim) overrides how
        they are encoded; ``concept_softmax`` normalises the maps over the concepts at each pixel.
    """
    if config is None:
        if mode == "reference":
            config = AggregationConfig.reference(
                **{k: v for k, v in dict(steps=steps, factors=factors, heads=heads, negative=negative, grid=grid).items() if v}
            )
            if layers is not None:
                config = config.with_(layers=tuple(layers))
        else:
            config = AggregationConfig(
                steps=steps,
                layers=tuple(layers) if layers is not None else None,
                factors=factors,
                heads=heads,
                keep_steps=keep_steps,
                keep_layers=keep_layers,
                keep_heads=keep_heads,
                negative=negative,
                mode=mode,  # type: ignore[arg-type]
                grid=grid,
            )
    return Trace(pipe, config, concepts=concepts, concept_embeds=concept_embeds, concept_softmax=concept_softmax)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, range, set)):
        return [_jsonable(v) for v in obj]
    return obj
