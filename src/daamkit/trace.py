"""``trace(pipe)``: record text-image attention while an unchanged diffusers pipeline runs.

```python
with trace(pipe) as tc:
    image = pipe(prompt, generator=g).images[0]
    maps = tc.heat_maps()          # GlobalHeatMap of image 0
```

The trace only adds PyTorch hooks (denoiser pre-hook, projection hooks on the text-image attention,
text-encoder pre-hooks that read the token ids the model saw), a logging handler that reads
diffusers' own truncation warning and, on pipelines that resize and crop their decoded image
(resolution binning), a wrapper that reads the returned size; all of them are removed on exit, also
after an exception.

The trace keeps the pipeline-level bookkeeping (steps, CFG rows, token ids) shared by every
attribution method; the maps themselves come from the method objects of :mod:`daamkit.methods`
(DAAM always, ConceptAttention when ``concepts`` are given, OVAM when ``open_vocabulary`` is, DAAM
refined by self-attention when ``refine`` is), picked by ``heat_maps(method=...)``.
"""

from __future__ import annotations

import ast
import contextlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from daamkit.aggregate import Accumulator, AggregationConfig, chunk_size
from daamkit.capture import UnsupportedPipelineError, detect_capture
from daamkit.capture.base import DenoiserCall, HookSet, ImageQueries, LayerInfo, QueryChunk, is_traced
from daamkit.errors import InputError, TraceError
from daamkit.methods import (
    CAPTURE_STREAMS,
    METHODS,
    AttributionMethod,
    ConceptMethod,
    DaamMethod,
    OvamEmbedding,
    OvamMethod,
    RefinedMethod,
    RelationMethod,
    canonical_name,
)
from daamkit.methods.relations import RELATION_METHODS, ImageRelationMethod, TextRelationMethod

if TYPE_CHECKING:
    from daamkit.capture.families import TextPart
    from daamkit.capture.sdpa import JointCall
    from daamkit.heatmap import GlobalHeatMap
    from daamkit.tokens import TokenAlignment

TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4")
_TRUNCATION_MARK = "was truncated because"


__all__ = ["Trace", "TraceError", "trace"]


@dataclass
class _TextCall:
    encoder: str
    ids: torch.Tensor  # (rows, seq) on CPU
    removed: list[str] | None = None  # text that diffusers reported as cut off, per row


@dataclass
class _Generation:
    """One pipeline call as the trace saw it; methods read it as ``trace.generation``."""

    call: DenoiserCall
    cfg: bool
    num_images: int
    text_calls: list[_TextCall]
    methods: Mapping[str, AttributionMethod]
    step: int = 0
    last_timestep: float = 0.0
    negative_call: bool = False  # the current denoiser call runs the negative prompt alone (Flux true CFG)
    separate: bool = False  # the negative prompt has calls of its own: no call holds both halves
    timesteps: list[float] = field(default_factory=list)
    # (generated, returned) image sizes when the pipeline resized and cropped its decoded image
    output_resize: tuple[tuple[int, int], tuple[int, int]] | None = None
    # (latent frames in, video frames out) of the VAE's decode of a video
    decoded: tuple[int, int] | None = None

    @property
    def accumulator(self) -> Accumulator:
        """The DAAM method's running sums (for inspecting memory and recorded layers)."""
        acc = self.methods["daam"].accumulator  # type: ignore[attr-defined]
        assert acc is not None
        return acc


_MISSING = object()


class _OutputResize:
    """Reads the size a pipeline resizes and crops its decoded image to.

    Resolution binning (PixArt, Sana, Sana-Video) generates at the closest aspect-ratio bin and returns the
    requested size through the image (or video) processor's ``resize_and_crop_tensor``; the requested size is
    seen nowhere else, so the method is wrapped, as an attribute of that one processor object, while
    the trace is on. ``remove`` (a hook handle's interface) puts the processor back as it was.
    """

    name = "resize_and_crop_tensor"

    def __init__(self, processor: Any, on_resize: Any):
        self.processor = processor
        self.saved = vars(processor).get(self.name, _MISSING)
        original = getattr(processor, self.name)

        def resize_and_crop_tensor(samples: torch.Tensor, new_width: int, new_height: int) -> torch.Tensor:
            if isinstance(samples, torch.Tensor) and samples.dim() in (4, 5):  # images, or videos (B, C, F, H, W)
                on_resize((int(samples.shape[-2]), int(samples.shape[-1])), (int(new_height), int(new_width)))
            return original(samples, new_width, new_height)

        setattr(processor, self.name, resize_and_crop_tensor)

    def remove(self) -> None:
        if self.saved is _MISSING:
            vars(self.processor).pop(self.name, None)
        else:
            setattr(self.processor, self.name, self.saved)


class _VideoDecode:
    """Reads how many latent frames a video pipeline's VAE decodes and how many frames it gives.

    A pipeline may pad latent frames at the start for the temporal patch and drop them before decoding
    (CogVideoX 1.5), and a VAE may decode its first latent frame alone or not depending on the count
    (CogVideoX's decodes in pairs of latent frames): neither is seen at the denoiser. ``decode`` is
    wrapped, as an attribute of that one VAE object, while the trace is on; ``remove`` puts it back.
    """

    name = "decode"

    def __init__(self, vae: Any, on_decode: Any):
        self.vae = vae
        self.saved = vars(vae).get(self.name, _MISSING)
        original = getattr(vae, self.name)

        def decode(z: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            out = original(z, *args, **kwargs)
            sample = getattr(out, "sample", None)
            if sample is None and isinstance(out, tuple | list) and out:
                sample = out[0]
            if isinstance(z, torch.Tensor) and z.dim() == 5 and isinstance(sample, torch.Tensor) and sample.dim() == 5:
                on_decode(int(z.shape[2]), int(sample.shape[2]))  # (B, C, F, H, W) in and out
            return out

        setattr(vae, self.name, decode)

    def remove(self) -> None:
        if self.saved is _MISSING:
            vars(self.vae).pop(self.name, None)
        else:
            setattr(self.vae, self.name, self.saved)


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


def _guider_separates(pipe: Any) -> bool:
    """Whether a modular pipeline's guider runs the negative prompt as its own denoiser call.

    Modular pipelines call the denoiser once per condition of their guider, the conditional one
    first: a second call at the same timestep is then the negative prompt's. Guiders that add more
    predictions (perturbed or skipped layers) would make a third call the trace cannot name."""
    guider = getattr(pipe, "guider", None)
    if guider is None:
        return False
    predictions = list(getattr(guider, "_input_predictions", None) or [])
    if predictions[:2] != ["pred_cond", "pred_uncond"] or len(predictions) > 2:
        raise UnsupportedPipelineError(
            f"the pipeline's guider {type(guider).__name__} predicts {predictions}: daamkit traces guiders that "
            "run a conditional and an unconditional call (e.g. ClassifierFreeGuidance, AdaptiveProjectedGuidance)"
        )
    return True


class Trace:
    """One traced session of a pipeline; created by :func:`trace`."""

    def __init__(
        self,
        pipe: Any,
        config: AggregationConfig,
        concepts: Sequence[str] | None = None,
        concept_embeds: torch.Tensor | None = None,
        concept_softmax: bool = True,
        methods: Sequence[AttributionMethod] = (),
        open_vocabulary: Sequence[str | OvamEmbedding] | None = None,
        relations: Sequence[str] | None = None,
        query: Any = None,
    ):
        """methods: attribution methods besides DAAM (always on) and the concept / OVAM / relation
        methods that ``concepts`` / ``open_vocabulary`` / ``relations`` build; each name may occur once."""
        self.pipe = pipe
        self.config = config
        self.capture = detect_capture(pipe, probabilities=config.probabilities)
        self._separate_negative = self.capture.repeated_timestep_is_negative or _guider_separates(pipe)
        chosen: list[AttributionMethod] = [DaamMethod()]
        concept = ConceptMethod.from_options(concepts, concept_embeds, concept_softmax)
        if concept is not None:
            chosen.append(concept)
        ovam = OvamMethod.from_options(open_vocabulary)
        if ovam is not None:
            chosen.append(ovam)
        chosen.extend(_relation_methods(relations, query))
        chosen.extend(methods)
        self._methods: dict[str, AttributionMethod] = {}
        taken: set[str] = set()  # names and aliases: heat_maps(method=...) must name one method
        for m in chosen:
            clash = taken & {m.name, *m.aliases}
            if clash:
                raise InputError(f"method {m.name!r}: the name(s) {sorted(clash)} already belong to another method")
            taken |= {m.name, *m.aliases}
            unknown = m.captures - CAPTURE_STREAMS
            if unknown:
                raise InputError(f"method {m.name!r} needs {sorted(unknown)}; the trace captures {sorted(CAPTURE_STREAMS)}")
            if m.families is not None and self.capture.family not in m.families:
                raise UnsupportedPipelineError(
                    f"{m.requirement}; this pipeline is a {self.capture.family} model: "
                    "use the cross-attention maps (heat_maps)"
                )
            self._methods[m.name] = m
        self._attention_methods = [m for m in self._methods.values() if "cross_attention" in m.captures]
        self._joint_methods = [m for m in self._methods.values() if "joint_attention" in m.captures]
        self._query_methods = [m for m in self._methods.values() if "image_queries" in m.captures]
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
            # methods first: one may run the text encoders (concept embeddings), which our token-id
            # hooks must not take for the prompt
            for m in self._methods.values():
                m.attach(self)
            self.capture.attach(self)
            for attr in TEXT_ENCODERS:
                enc = getattr(self.pipe, attr, None)
                if isinstance(enc, nn.Module):
                    self._hooks.add(enc.register_forward_pre_hook(self._text_hook(attr), with_kwargs=True))
            for name in ("image_processor", "video_processor"):
                processor = getattr(self.pipe, name, None)
                if callable(getattr(processor, _OutputResize.name, None)):
                    self._hooks.add(_OutputResize(processor, self._on_output_resize))
            vae = getattr(self.pipe, "vae", None)
            if isinstance(vae, nn.Module) and callable(getattr(vae, _VideoDecode.name, None)):
                self._hooks.add(_VideoDecode(vae, self._on_video_decode))
            logging.getLogger("diffusers").addHandler(self._log)
        except BaseException:
            with contextlib.suppress(Exception):  # the error that stopped the attach is the one to report
                self._detach()
            raise
        self._active = True
        return self

    def __exit__(self, *exc: object) -> bool:
        self._detach()
        return False

    def _detach(self) -> None:
        # Every step runs even if an earlier one raised (an exception, or Ctrl-C while coming off):
        # the first error is raised at the end, after everything is off.
        errors: list[BaseException] = []

        def attempt(step) -> None:
            try:
                step()
            except BaseException as e:
                errors.append(e)

        for m in reversed(list(self._methods.values())):
            attempt(m.detach)
            attempt(m.hooks.remove)
        attempt(self.capture.detach)
        attempt(self._hooks.remove)
        attempt(lambda: logging.getLogger("diffusers").removeHandler(self._log))
        self._active = False
        if errors:
            raise errors[0]

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

    def _on_output_resize(self, generated: tuple[int, int], returned: tuple[int, int]) -> None:
        if self._gen is not None and generated != returned:
            self._gen.output_resize = (generated, returned)

    def _on_video_decode(self, latent_frames: int, frames: int) -> None:
        if self._gen is not None:
            self._gen.decoded = (latent_frames, frames)

    def on_denoiser_call(self, call: DenoiserCall) -> None:
        gen = self._gen
        if (
            gen is not None
            and not self._text_since_denoiser
            and self._separate_negative
            and call.timestep == gen.last_timestep
            and call.batch == gen.call.batch
        ):
            gen.negative_call = True  # same step again: the negative prompt's own call
            gen.cfg = gen.separate = True
            return
        new = (
            gen is None
            or self._text_since_denoiser
            or call.latent_hw != gen.call.latent_hw
            or call.frames != gen.call.frames
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
                text_calls=list(self._pending_text),
                methods=self._methods,
            )
            for m in self._methods.values():
                m.start_generation(self)
        else:
            gen.step += 1
        gen.negative_call = False
        gen.last_timestep = call.timestep
        gen.timesteps.append(call.timestep)
        self._text_since_denoiser = False

    def _uses_cfg(self, batch: int) -> bool:
        if self._separate_negative:
            return False  # the negative prompt comes in calls of its own, never in this batch
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
        if not gen.cfg or gen.separate:
            return {"cond": slice(0, batch)}
        n = batch // 2
        cond, negative = (slice(0, n), slice(n, 2 * n)) if self.capture.cond_first else (slice(n, 2 * n), slice(0, n))
        rows = {"cond": cond}
        if self.config.negative:
            rows["negative"] = negative
        return rows

    def wants(self, layer: LayerInfo, image_tokens: int) -> bool:
        if self._gen is None:
            return True  # on_attention's own checks say what is wrong
        return any(m.wants(self, layer, image_tokens) for m in self._attention_methods)

    def wants_queries(self, layer: LayerInfo, image_tokens: int) -> bool:
        if self._gen is None:
            return bool(self._query_methods)
        return any(m.wants(self, layer, image_tokens) for m in self._query_methods)

    def on_image_queries(self, layer: LayerInfo, queries: ImageQueries) -> None:
        for m in self._query_methods:
            m.on_image_queries(self, layer, queries)

    def query_chunk(self, total: int, frame: int, bytes_per_query: int, device: torch.device | None = None) -> int:
        if not all(m.chunks for m in self._attention_methods):
            return total
        return chunk_size(total, frame, bytes_per_query, self.config.chunk_mib, device)

    def on_attention(self, layer: LayerInfo, probs: torch.Tensor, branch: str, chunk: QueryChunk | None = None) -> None:
        assert self._gen is not None
        for m in self._attention_methods:
            if chunk is None:
                m.on_attention(self, layer, probs, branch)
            else:
                m.on_attention(self, layer, probs, branch, chunk)

    def on_joint_attention(self, layer: LayerInfo, call: JointCall) -> None:
        for m in self._joint_methods:
            m.on_joint_attention(self, layer, call)

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

    @property
    def generation(self) -> _Generation:
        """The latest pipeline call (steps, CFG, images, token ids); raises if nothing was traced yet."""
        return self._require_gen()

    def _require_gen(self) -> _Generation:
        if self._gen is None:
            raise TraceError("nothing was traced yet: call the pipeline inside the `with trace(pipe) as tc:` block")
        return self._gen

    @property
    def method_names(self) -> list[str]:
        """The attribution methods this trace records, by the names ``heat_maps(method=...)`` takes."""
        return [n for n, m in self._methods.items() if not isinstance(m, RelationMethod)]

    @property
    def relation_names(self) -> list[str]:
        """The relations this trace records, by the kinds ``relation(i, kind)`` takes."""
        return [n for n, m in self._methods.items() if isinstance(m, RelationMethod)]

    def method(self, name: str) -> AttributionMethod:
        """The method object recording ``name`` (or one of its aliases) on this trace."""
        for m in self._methods.values():  # this trace's own methods first: they need not be in METHODS
            if name == m.name or name in m.aliases:
                return m
        canonical = canonical_name(name)
        if canonical is not None:  # a known method this trace was not given
            self._require_gen()
            raise TraceError(METHODS[canonical].not_enabled or f"method {name!r} was not enabled on this trace")
        available = ", ".join(
            repr(n) + (f" (alias {', '.join(map(repr, m.aliases))})" if m.aliases else "") for n, m in self._methods.items()
        )
        raise InputError(f"unknown attribution method {name!r}; this trace has: {available}")

    @property
    def _concept_capture(self) -> Any:
        """The concept side stream, if concepts were traced (kept for inspection in tests)."""
        concept = self._methods.get("concept")
        return getattr(concept, "capture", None)

    def heat_maps(
        self,
        i: int = 0,
        *,
        prompt: str | None = None,
        branch: str = "cond",
        steps: Sequence[int] | range | None = None,
        layers: Sequence[str] | None = None,
        heads: Sequence[int] | None = None,
        method: str = "daam",
    ) -> GlobalHeatMap:
        """The :class:`~daamkit.heatmap.GlobalHeatMap` of image ``i`` of the latest pipeline call.

        prompt: the prompt of that image, if the pipeline was given ``prompt_embeds`` (daamkit then did
            not see the token ids) or to name words past the tokenizer's limit exactly.
        branch: ``"cond"`` (default) or ``"negative"`` (needs ``negative=True`` in :func:`trace`).
        steps / layers / heads: select among what was kept (``keep_steps`` etc. in :func:`trace`).
        method: ``"daam"`` (DAAM maps of the prompt's words, default; ``"cross"`` is the same),
            ``"concept"`` (ConceptAttention maps of the ``concepts`` given to :func:`trace`, which need
            not be in the prompt; the selection options do not apply to them), ``"ovam"`` (OVAM maps
            of the ``open_vocabulary`` words, which need not be in the prompt either) or ``"refined"``
            (DAAM maps refined by the model's self-attention, traced with ``refine``).
        """
        missed = sorted(getattr(self.capture, "missed", None) or ())
        if missed:
            raise TraceError(
                f"{len(missed)} traced attention layer(s), e.g. {missed[0]}, ran without PyTorch's "
                "scaled_dot_product_attention, so daamkit could not read their queries and keys (an attention "
                "backend such as flash-attn, sage or xformers): trace with the native backend, e.g. "
                "pipe.transformer.set_attention_backend('native')"
            )
        return self.method(method).heat_maps(
            self, i, prompt=prompt, branch=branch, steps=steps, layers=layers, heads=heads
        )

    def relation(
        self,
        i: int = 0,
        kind: str = "image->image",
        *,
        steps: Sequence[int] | range | None = None,
        layers: Sequence[str] | None = None,
        heads: Sequence[int] | None = None,
        prompt: str | None = None,
    ) -> Any:
        """The relation ``kind`` of image ``i`` of the latest pipeline call, traced with
        ``trace(relations=[kind], ...)``: an :class:`~daamkit.relation.ImageRelationMap` for
        ``"image->image"``, a :class:`~daamkit.relation.TokenRelationMatrix` for ``"text->text"``.

        steps / layers / heads: select among what was kept, as for :meth:`heat_maps`. prompt: for
        ``"text->text"`` where the pipeline was given ``prompt_embeds``.
        """
        from daamkit.relation import check_kind

        check_kind(kind)
        method = self._methods.get(kind)
        if not isinstance(method, RelationMethod):
            self._require_gen()
            raise TraceError(RELATION_METHODS[kind].not_enabled)
        missed = sorted(getattr(self.capture, "missed", None) or ())
        if missed:
            raise TraceError(
                f"{len(missed)} traced attention layer(s), e.g. {missed[0]}, ran without PyTorch's "
                "scaled_dot_product_attention, so daamkit could not read their queries and keys: trace with the "
                "native backend, e.g. pipe.transformer.set_attention_backend('native')"
            )
        return method.relation(self, i, steps=steps, layers=layers, heads=heads, prompt=prompt)

    def all_heat_maps(self, **kwargs: Any) -> list:
        return [self.heat_maps(i, **kwargs) for i in range(self.num_images)]

    def alignment(self, i: int, *, prompt: str | None, branch: str, total: int) -> TokenAlignment:
        """The words of image ``i``'s prompt on the ``total`` text keys of the ``branch`` attention."""
        gen = self._require_gen()
        return key_alignment(self.pipe, self.capture, gen.text_calls, gen.num_images, i,
                             prompt=prompt, branch=branch, total=total)


def key_alignment(
    pipe: Any, capture: Any, text_calls: Sequence[Any], num_images: int, i: int, *,
    prompt: str | None, branch: str, total: int,
) -> TokenAlignment:
    """The words of image ``i``'s prompt on the ``total`` text keys of the ``branch`` attention, from
    the token ids the text encoders received (``text_calls``: objects with ``encoder``, ``ids`` (rows,
    seq) and ``removed``, in call order) and the family's text parts. Shared by the trace and by
    attention interventions, which must find a word's keys before the denoiser attends to them."""
    from daamkit.tokens import concat_alignments

    called = list(dict.fromkeys(c.encoder for c in text_calls))
    text_parts = capture.text_parts(called)
    parts, used = [], 0
    for k, part in enumerate(text_parts):
        tok = getattr(pipe, part.tokenizer, None)
        if k == len(text_parts) - 1:
            length = total - used
        else:
            length = part.length or int(getattr(tok, "model_max_length", 77))
        parts.append(_encoder_alignment(pipe, text_calls, num_images, part, i, prompt, branch, length))
        used += len(parts[-1].tokens)
    if len(parts) == 1 and len(parts[0].tokens) == total:
        return parts[0]
    return concat_alignments(parts, total=total)


def _encoder_alignment(
    pipe: Any, text_calls: Sequence[Any], num_images: int, part: TextPart, i: int, prompt: str | None,
    branch: str, length: int,
) -> TokenAlignment:
    from daamkit.tokens import align, align_in_template, recover_prompt

    encoder = part.encoder
    own = [c for c in text_calls if c.encoder == encoder]
    index = 0 if branch == "cond" else 1
    call = own[index] if len(own) > index else None
    tokenizer = getattr(pipe, part.tokenizer, None)
    if tokenizer is None:
        raise TraceError(f"the pipeline has {encoder} but no {part.tokenizer}: cannot name its tokens")
    if isinstance(part.drop, str):
        drop = int(getattr(pipe, part.drop, 0) or 0)
    elif callable(part.drop):
        drop = 0 if call is None else int(part.drop(call.ids[0].tolist(), length))
    else:
        drop = int(part.drop)
    if part.after is not None:
        if call is None:
            raise TraceError(
                "daamkit did not see the token ids of this prompt (the pipeline was given prompt_embeds): "
                "this family wraps the prompt in a template, so its positions are unknown without the ids"
            )
        rows = call.ids.shape[0]
        row = min(i * rows // num_images, rows - 1)
        return align_in_template(tokenizer, call.ids[row].tolist(), part.after, prompt, drop=drop, length=length)
    if call is None:
        if prompt is None:
            raise TraceError(
                "daamkit did not see the token ids of this prompt (the pipeline was given prompt_embeds, or "
                "its negative prompt was zeroed): pass prompt=... to heat_maps()"
            )
        ids = tokenizer(prompt, padding="max_length", max_length=length, truncation=True).input_ids
        return align(tokenizer, ids, prompt)
    rows = call.ids.shape[0]
    row = min(i * rows // num_images, rows - 1)
    ids = call.ids[row].tolist()
    ids = part.select(ids, length) if part.select is not None else ids[drop:]
    if prompt is None and call.removed is not None and row < len(call.removed):
        # batch_decode keeps the EOS/pad tokens of shorter rows; a pad '!' (SDXL) may be real text
        eos = tokenizer.eos_token or "<|endoftext|>"
        removed = " ".join(call.removed[row].replace(eos, " ").replace("<pad>", " ").split())
        if removed:
            prompt = recover_prompt(tokenizer, ids, removed)
    return align(tokenizer, ids, prompt)


def _relation_methods(relations: Sequence[str] | None, query: Any) -> list[AttributionMethod]:
    from daamkit.relation import check_kind

    if isinstance(relations, str):
        relations = [relations]
    kinds = [check_kind(k) for k in relations or ()]
    if len(set(kinds)) != len(kinds):
        raise InputError(f"relations must be distinct, got {kinds}")
    if query is not None and "image->image" not in kinds:
        raise InputError("query=... names where an image->image relation looks from: add relations=['image->image']")
    return [ImageRelationMethod(query) if k == "image->image" else TextRelationMethod() for k in kinds]


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
    probabilities: str = "text",
    chunk_mib: float = 32.0,
    config: AggregationConfig | None = None,
    concepts: Sequence[str] | None = None,
    concept_embeds: torch.Tensor | None = None,
    concept_softmax: bool = True,
    open_vocabulary: Sequence[str | OvamEmbedding] | None = None,
    refine: bool | RefinedMethod = False,
    methods: Sequence[AttributionMethod] = (),
    relations: Sequence[str] | None = None,
    query: Any = None,
) -> Trace:
    """Trace a diffusers pipeline: ``with trace(pipe) as tc: pipe(...); tc.heat_maps(0)``.

    The options are those of :class:`~daamkit.aggregate.AggregationConfig`; ``mode="reference"``
    selects the preset that reproduces PyPI ``daam`` 0.2.0 (``AggregationConfig.reference()``).

    probabilities: ``"text"`` (default) or ``"model"``: how joint attention is normalised, see
        :class:`~daamkit.aggregate.AggregationConfig`.
    chunk_mib: memory budget of one block of probabilities; larger calls (videos) run in chunks.
    concepts: words (need not be in the prompt) for ConceptAttention-style maps on joint-attention
        transformers (``daamkit.methods.ConceptMethod.families``: images, and videos with maps over time
        as DAAM's), read with
        ``tc.heat_maps(i, method="concept")``; ``concept_embeds`` (concepts x context dim) overrides how
        they are encoded; ``concept_softmax`` normalises the maps over the concepts at each pixel.
    open_vocabulary: words (need not be in the prompt) and/or learned tokens
        (:func:`daamkit.methods.optimize_token`) for OVAM maps on cross-attention models (UNets,
        AnimateDiff, PixArt, Sana, HunyuanDiT, Wan, LTX, LTX-2, Sana-Video), read with ``tc.heat_maps(i, method="ovam")``; they form one attribution prompt.
    refine: also record DAAM maps refined by the model's own self-attention (UNets), read with
        ``tc.heat_maps(i, method="refined")``; True for the defaults or a
        :class:`~daamkit.methods.RefinedMethod` (``resolutions``, ``iterations``). Off by default: it
        costs a pass over each used block's self-attention per selected step.
    methods: further :class:`~daamkit.methods.AttributionMethod` objects, e.g.
        ``OvamMethod([...], keep_queries=True)`` to learn a token from the traced image.
    relations: relation maps to record beside the word maps, read with ``tc.relation(i, kind)``:
        ``"image->image"`` (where ``query`` attends in the image; UNets and joint transformers) and
        ``"text->text"`` (token-to-token attention of the prompt; joint transformers).
    query: for ``"image->image"``: a point (y, x) in pixels of the generated image, a boolean (H, W)
        mask, or a list of them (one map each).
    """
    refined = RefinedMethod.from_option(refine)
    if refined is not None:
        methods = [*methods, refined]
    if config is None:
        if mode == "reference":
            config = AggregationConfig.reference(
                **{k: v for k, v in dict(steps=steps, factors=factors, heads=heads, negative=negative, grid=grid).items() if v}
            )
            if layers is not None:
                config = config.with_(layers=tuple(layers))
            config = config.with_(probabilities=probabilities, chunk_mib=chunk_mib)
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
                probabilities=probabilities,  # type: ignore[arg-type]
                chunk_mib=chunk_mib,
            )
    return Trace(pipe, config, concepts=concepts, concept_embeds=concept_embeds, concept_softmax=concept_softmax,
                 methods=methods, open_vocabulary=open_vocabulary, relations=relations, query=query)
