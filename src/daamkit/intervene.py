"""Attention interventions: reweight a word's attention where and when you choose, to test whether the
word acted there (prompt-to-prompt's attention reweighting, Hertz et al. 2022).

```python
from daamkit.intervene import AttentionEdit, intervene

with intervene(pipe, "a dog on a bench", [AttentionEdit("dog", 0.0, region=mask)]) as log:
    image = pipe("a dog on a bench", generator=torch.Generator().manual_seed(0)).images[0]
print(log.layers, log.steps)            # which layers and steps were edited
```

Semantics, exactly: in every text-image attention layer the family's capture traces, for the conditional
rows of the batch (classifier-free guidance's unconditional rows are left as they are, as in
prompt-to-prompt), and for the image queries inside ``region`` (resized to that layer's query grid: a
cell is inside when at least half of its area is), the model's own attention probabilities on the word's
text keys are multiplied by ``scale``, *without* renormalising. The probabilities are the model's
softmax over every key it attends to (image and text keys in a joint attention), with its own mask.
Several edits of one call compose multiplicatively where they meet.

How: the attention call itself runs unchanged; its output is corrected additively,
``out' = out + P[q, K] * (s - 1) @ V[K]`` over the region's queries ``q`` and the word's keys ``K``,
which equals the reweighted attention exactly and costs one (region queries x keys) product per layer.
The correction is made at the layer's own call of ``scaled_dot_product_attention`` (a
``TorchFunctionMode`` pushed by a forward pre-hook of each text-image attention module and popped by
its forward hook, as the transformer capture reads q and k), so the processor, its fused projections,
norms and rotary embeddings stay the model's. UNet cross-attention processors call it too (diffusers'
default ``AttnProcessor2_0``); a processor that does not (sliced attention, xformers) is refused with a
clear error rather than silently left unedited.

The word's key positions come from the token ids the text encoders receive, aligned as the trace aligns
them (templates, several encoders, repeats), before the denoiser first attends; every hook is removed
on exit, also after an exception. An intervention can run inside a trace (``with intervene(...),
trace(pipe) as tc:``): the trace then records the maps of the intervened model, i.e. what the later
layers and steps attend to after the edit; at an edited layer it records the probabilities the model
computed before the reweighting. A plain ``trace()`` never intervenes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from daamkit.aggregate import layer_grid
from daamkit.capture import UnsupportedPipelineError, detect_capture
from daamkit.capture.base import DenoiserCall, DenoiserPreHook, HookSet, LayerInfo
from daamkit.capture.sdpa import _SDPA, Slices, _mask_block, _masked
from daamkit.capture.transformer import TransformerCapture, _PreHook, locate
from daamkit.capture.unet import UNetCapture
from daamkit.errors import InputError, TraceError
from daamkit.tokens import WordNotFoundError, split_words

__all__ = ["AttentionEdit", "EditedCall", "InterventionLog", "intervene"]

_TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4")


@dataclass(frozen=True, eq=False)
class AttentionEdit:
    """Multiply the attention of the image queries in ``region`` on ``word``'s keys by ``scale``.

    word: a word (or consecutive words) of the prompt, as ``tc.heat_maps(0).words`` lists them.
    scale: 0 deletes the word's attention, values above 1 amplify it; must be finite and >= 0.
    region: (H, W) bool over the output image's pixels; None: everywhere.
    steps: the denoising steps ``[a, b)`` (0-based, in the order the denoiser runs); None: all.
    occurrence: which repeat of the word (0-based); None: all of them.
    image: which image of the pipeline call (0-based, in the order the pipeline returns them); None: every
        image. A batch of prompts gives ``intervene`` one prompt per image, each edit names its image.
    """

    word: str
    scale: float
    region: np.ndarray | None = None
    steps: tuple[int, int] | None = None
    occurrence: int | None = None
    image: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.word, str) or not split_words(self.word):
            raise InputError(f"an edit's word must be a word of the prompt, got {self.word!r}")
        try:
            scale = float(self.scale)
        except (TypeError, ValueError):
            raise InputError(f"an edit's scale must be a number >= 0, got {self.scale!r}") from None
        if not math.isfinite(scale) or scale < 0:
            raise InputError(f"an edit's scale must be a finite number >= 0 (0 deletes, >1 amplifies), got {self.scale!r}")
        object.__setattr__(self, "scale", scale)
        if self.region is not None:
            region = np.asarray(self.region)
            if region.ndim != 2 or region.dtype != bool:
                raise InputError(
                    f"an edit's region must be a 2-D bool array (H, W) over the output image, got "
                    f"{region.dtype} of shape {region.shape}"
                )
            if not region.any():
                raise InputError(f"the region of the edit of {self.word!r} is empty: it would edit nothing")
            object.__setattr__(self, "region", region)
        if self.steps is not None:
            steps = tuple(self.steps)
            if len(steps) != 2 or not all(isinstance(s, int | np.integer) for s in steps) or not 0 <= steps[0] < steps[1]:
                raise InputError(f"an edit's steps must be a range (a, b) of step indices with 0 <= a < b, got {self.steps!r}")
            object.__setattr__(self, "steps", (int(steps[0]), int(steps[1])))
        if self.occurrence is not None and (not isinstance(self.occurrence, int) or self.occurrence < 0):
            raise InputError(f"an edit's occurrence must be an index >= 0 or None, got {self.occurrence!r}")
        if self.image is not None and (not isinstance(self.image, int | np.integer) or self.image < 0):
            raise InputError(f"an edit's image must be an image index >= 0 or None (every image), got {self.image!r}")
        if self.image is not None:
            object.__setattr__(self, "image", int(self.image))

    def applies_to(self, image: int) -> bool:
        return self.image is None or self.image == image

    def at_step(self, step: int) -> bool:
        return self.steps is None or self.steps[0] <= step < self.steps[1]

    def to_json(self) -> dict[str, Any]:
        return {
            "word": self.word, "scale": self.scale, "steps": None if self.steps is None else list(self.steps),
            "occurrence": self.occurrence, "image": self.image,
            "region_pixels": None if self.region is None else int(np.count_nonzero(self.region)),
            "region_shape": None if self.region is None else list(self.region.shape),
        }


@dataclass(frozen=True)
class EditedCall:
    """One attention call that was corrected: at ``step``, in ``layer``, by the edits ``edits`` (indices
    into the intervention's edits), over ``queries`` image queries per row and the text keys ``keys``
    (positions in the call's key sequence)."""

    step: int
    layer: str
    edits: tuple[int, ...]
    queries: int
    keys: tuple[int, ...]


@dataclass
class InterventionLog:
    """What an intervention did, filled while the pipeline runs (the latest pipeline call's)."""

    family: str
    prompt: str | list[str]
    edits: tuple[AttentionEdit, ...]
    calls: list[EditedCall] = field(default_factory=list)
    #: each edit's text-key positions in the attention, counted from the first text key (in its image's
    #: prompt; the first image's for an edit of every image)
    word_keys: dict[int, list[int]] = field(default_factory=dict)
    generations: int = 0

    @property
    def layers(self) -> list[str]:
        """The layers where at least one call was corrected."""
        return sorted({c.layer for c in self.calls})

    @property
    def steps(self) -> list[int]:
        """The steps at which at least one call was corrected."""
        return sorted({c.step for c in self.calls})

    def to_json(self) -> dict[str, Any]:
        return {
            "family": self.family, "prompt": self.prompt, "edits": [e.to_json() for e in self.edits],
            "word_keys": {self.edits[i].word: keys for i, keys in self.word_keys.items()},
            "layers": self.layers, "steps": self.steps, "edited_calls": len(self.calls),
        }


def _check_word(prompt: str, edit: AttentionEdit) -> None:
    """The edit's word must be whole consecutive words of the prompt: said before anything runs."""
    units, query = split_words(prompt), split_words(edit.word)
    n = len(query)
    hits = sum(units[i:i + n] == query for i in range(len(units) - n + 1))
    if hits == 0:
        raise InputError(f"{edit.word!r} is not a word of the prompt {prompt!r}; its words: {', '.join(units)}")
    if edit.occurrence is not None and edit.occurrence >= hits:
        raise InputError(
            f"{edit.word!r} occurs {hits} time(s) in the prompt; occurrence must be 0..{hits - 1} (or None for all)"
        )


def _grid_region(region: np.ndarray, h: int, w: int) -> torch.Tensor:
    """The cells of an (h, w) query grid at least half inside ``region``, flattened row-major."""
    r = torch.from_numpy(np.ascontiguousarray(region)).float()[None, None]
    return (F.interpolate(r, size=(h, w), mode="area")[0, 0] >= 0.5).flatten()


@dataclass
class _TextCall:
    encoder: str
    ids: torch.Tensor
    removed: list[str] | None = None


class _EditMode(TorchFunctionMode):
    """Corrects the output of a layer's text-image attention call while that layer's module runs."""

    def __init__(self, tap: _EditTap):
        super().__init__()
        self.tap = tap

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is _SDPA:
            out = self.tap.on_sdpa(args, kwargs, out)
        return out


class _EditTap:
    """The hooks of one edited attention module (mirrors :class:`~daamkit.capture.sdpa.AttentionTap`:
    ``locate`` reads ``capture``, ``layer``, ``text_len`` and ``hidden_len`` off it)."""

    def __init__(self, run: _Intervention, layer: LayerInfo, module: nn.Module, site: Any):
        self.run, self.layer, self.module, self.site = run, layer, module, site
        self.capture = run.capture
        self.mode = _EditMode(self)
        self.entered = False
        self.seen = True
        self.pending = 0
        self.text_len: int | None = None
        self.hidden_len = 0

    def pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.seen = True
        if not self.run.active():
            return
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        self.hidden_len = int(hidden.shape[1]) if isinstance(hidden, torch.Tensor) and hidden.dim() >= 3 else 0
        self.text_len = int(context.shape[1]) if isinstance(context, torch.Tensor) and context.dim() >= 3 else None
        skip = getattr(self.site, "skip", None)
        self.pending = skip(module) if skip is not None else 0
        self.seen = False
        self.mode.__enter__()
        self.entered = True

    def post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self.entered:
            self.entered = False
            self.mode.__exit__(None, None, None)
        if not self.seen:
            self.seen = True
            raise UnsupportedPipelineError(
                f"{self.layer.name} ran without PyTorch's scaled_dot_product_attention (its attention processor is "
                f"{type(getattr(module, 'processor', None)).__name__}): interventions edit that call; use the default "
                "processor (pipe.unet.set_attn_processor(AttnProcessor2_0()) or the native attention backend)"
            )

    def where(self, q_len: int, k_len: int) -> Slices | Sequence[Slices] | None:
        if isinstance(self.capture, UNetCapture):
            return Slices(slice(0, q_len), slice(0, k_len))
        return locate(self, q_len, k_len)

    def on_sdpa(self, args: tuple, kwargs: dict, out: torch.Tensor) -> torch.Tensor:
        if self.seen:
            return out
        if self.pending > 0:
            self.pending -= 1
            return out
        self.seen = True
        q = kwargs.get("query", args[0] if args else None)
        k = kwargs.get("key", args[1] if len(args) > 1 else None)
        v = kwargs.get("value", args[2] if len(args) > 2 else None)
        if not all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v, out)):
            return out
        where = self.where(int(q.shape[2]), int(k.shape[2]))
        if where is None:
            return out
        return self.run.correct(self.layer, q, k, v, out, where, kwargs.get("attn_mask", args[3] if len(args) > 3 else None),
                                kwargs.get("scale"))

    def install(self, hooks: HookSet) -> None:
        hooks.add(self.module.register_forward_pre_hook(self.pre, with_kwargs=True))
        hooks.add(self.module.register_forward_hook(self.post, with_kwargs=True, always_call=True))


class _Intervention:
    """The state of one ``intervene`` block: steps and CFG rows as the trace counts them, the words'
    keys, the hooks."""

    def __init__(self, pipe: Any, prompt: str | Sequence[str], edits: Sequence[AttentionEdit], branch: str):
        if branch != "cond":
            raise InputError(f"branch must be 'cond' (edits apply to the prompt's own rows), got {branch!r}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise InputError("the prompt must be the non-empty text (or list of texts) the pipeline is called with")
        edits = tuple(edits)
        if not edits:
            raise InputError("give at least one AttentionEdit")
        for e in edits:
            if not isinstance(e, AttentionEdit):
                raise InputError(f"edits must be AttentionEdit objects, got {type(e).__name__}")
            if e.image is None or len(prompts) == 1:
                for p in dict.fromkeys(prompts):
                    _check_word(p, e)
            elif e.image < len(prompts):
                _check_word(prompts[e.image], e)
        self.pipe, self.prompts, self.edits = pipe, prompts, edits
        self.capture = detect_capture(pipe, probabilities="model")
        family = self.capture.family
        if isinstance(self.capture, UNetCapture):
            if type(self.capture.denoiser).__name__ == "UNetMotionModel":
                raise UnsupportedPipelineError("interventions edit images: a motion UNet (AnimateDiff, video) is not supported")
            self.sites: dict[str, Any] = {}
            self.modules = [(layer, m) for layer, (_, m) in zip(self.capture.layers, self.capture.modules, strict=True)]
        else:
            spec = self.capture.spec
            if spec.time is not None or any(s.per_row for s in spec.sites):
                raise UnsupportedPipelineError(
                    f"interventions edit images: the {family} family is a video model, which is not supported"
                )
            self.sites = dict(self.capture.site_of)
            self.modules = [(layer, m) for _, layer, m in self.capture.taps]
        from daamkit.trace import _guider_separates

        self.separate_negative = self.capture.repeated_timestep_is_negative or _guider_separates(pipe)
        self.log = InterventionLog(family=family, prompt=prompt if isinstance(prompt, str) else prompts, edits=edits)
        self.hooks = HookSet()
        self.factors = self.capture.layer_factors() if isinstance(self.capture, UNetCapture) else {}
        # per generation
        self.call: DenoiserCall | None = None
        self.step = -1
        self.last_t = 0.0
        self.cfg = False
        self.negative_call = False
        self.text_since_denoiser = True
        self.pending_text: list[_TextCall] = []
        self.text_calls: list[_TextCall] = []
        self.keys: dict[tuple[int, int], list[list[int] | None]] = {}  # (n text keys, image) -> edits' positions
        self.regions: dict[tuple[int, int, int], torch.Tensor] = {}

    # ---- hooks -----------------------------------------------------------------------------------
    def attach(self) -> None:
        try:
            sink = self
            if isinstance(self.capture, UNetCapture):
                pres = [(self.capture.denoiser, DenoiserPreHook(sink, capture=self.capture))]
            else:
                pres = [(d, _PreHook(sink, self.capture)) for d in self.capture.denoisers]
            for d, pre in pres:
                # a plain function, not a DenoiserPreHook: a trace of the same call must not take this
                # pipeline for one that is already traced
                self.hooks.add(d.register_forward_pre_hook(_call(pre), with_kwargs=True))
            for layer, m in self.modules:
                _EditTap(self, layer, m, self.sites.get(layer.name)).install(self.hooks)
            for attr in _TEXT_ENCODERS:
                enc = getattr(self.pipe, attr, None)
                if isinstance(enc, nn.Module):
                    self.hooks.add(enc.register_forward_pre_hook(self._text_hook(attr), with_kwargs=True))
        except BaseException:
            self.hooks.remove()
            raise

    def detach(self) -> None:
        self.hooks.remove()
        if isinstance(self.capture, TransformerCapture):
            self.capture.inputs = ((), {})

    def _text_hook(self, attr: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            ids = args[0] if args else kwargs.get("input_ids")
            if not isinstance(ids, torch.Tensor):
                return
            if not self.text_since_denoiser:
                self.pending_text = []  # a new pipeline call started
            self.text_since_denoiser = True
            self.pending_text.append(_TextCall(attr, ids.detach().to("cpu")))

        return hook

    # ---- the sink of the capture's denoiser pre-hook (the trace's step counting) ------------------
    def on_denoiser_call(self, call: DenoiserCall) -> None:
        prev = self.call
        if (
            prev is not None and not self.text_since_denoiser and self.separate_negative
            and call.timestep == self.last_t and call.batch == prev.batch
        ):
            self.negative_call = True  # the negative prompt's own call at the same step
            return
        new = (
            prev is None or self.text_since_denoiser or call.latent_hw != prev.latent_hw
            or call.batch != prev.batch or call.timestep > self.last_t
        )
        if new:
            self.call, self.step = call, 0
            self.cfg = self._uses_cfg(call.batch)
            self.text_calls = list(self.pending_text)
            self.keys, self.regions = {}, {}
            self.log.calls, self.log.word_keys = [], {}
            self.log.generations += 1
            self._check_regions(call)
        else:
            self.step += 1
        self.negative_call = False
        self.last_t = call.timestep
        self.text_since_denoiser = False

    def _uses_cfg(self, batch: int) -> bool:
        if self.separate_negative:
            return False
        flag = getattr(self.pipe, "do_classifier_free_guidance", None)
        if isinstance(flag, bool):
            return flag and batch % 2 == 0
        encoders = [c.encoder for c in self.pending_text]
        return batch % 2 == 0 and len(encoders) > len(set(encoders))

    def _check_regions(self, call: DenoiserCall) -> None:
        n = self.num_images()
        for e in self.edits:
            if e.image is not None and e.image >= n:
                raise InputError(f"the edit of {e.word!r} is for image {e.image}, but the pipeline call makes {n} image(s)")
        cell = self.capture.cell_pixels(self.pipe)
        size = (call.latent_hw[0] * cell, call.latent_hw[1] * cell)
        for e in self.edits:
            if e.region is not None and tuple(e.region.shape) != size:
                raise InputError(
                    f"the region of the edit of {e.word!r} is {e.region.shape[0]}x{e.region.shape[1]} pixels but the "
                    f"pipeline generates {size[0]}x{size[1]} images: give a mask of the output image's size "
                    "(with resolution binning, call the pipeline with use_resolution_binning=False)"
                )

    def branch_rows(self, batch: int) -> dict[str, slice]:
        if self.call is None or self.negative_call:
            return {}
        if not self.cfg:
            return {"cond": slice(0, batch)}
        n = batch // 2
        return {"cond": slice(0, n) if self.capture.cond_first else slice(n, 2 * n)}

    def active(self) -> bool:
        """Whether the current denoiser call has rows and edits to apply."""
        call = self.capture.current
        return (
            call is not None and self.call is not None and not self.negative_call
            and any(e.at_step(self.step) and e.scale != 1.0 for e in self.edits)
        )

    # ---- the correction ---------------------------------------------------------------------------
    def num_images(self) -> int:
        assert self.call is not None
        return self.call.batch // 2 if self.cfg else self.call.batch

    def word_keys(self, n_text: int, image: int) -> list[list[int] | None]:
        """Each edit's positions among the ``n_text`` text keys of ``image`` (None for an edit of another
        image), from the token ids its prompt was encoded with."""
        if (n_text, image) in self.keys:
            return self.keys[(n_text, image)]
        from daamkit.trace import key_alignment

        n = self.num_images()
        prompt = self.prompts[min(image * len(self.prompts) // n, len(self.prompts) - 1)]
        try:
            alignment = key_alignment(self.pipe, self.capture, self.text_calls, n, image, prompt=None,
                                      branch="cond", total=n_text)
        except TraceError:  # no ids seen (prompt_embeds): tokenize the prompt given
            alignment = key_alignment(self.pipe, self.capture, self.text_calls, n, image, prompt=prompt,
                                      branch="cond", total=n_text)
        keys: list[list[int] | None] = []
        for i, e in enumerate(self.edits):
            if not e.applies_to(image):
                keys.append(None)
                continue
            try:
                keys.append(alignment.positions(e.word, e.occurrence))
            except (WordNotFoundError, ValueError) as err:
                msg = err.message if isinstance(err, WordNotFoundError) else str(err)
                raise InputError(f"edit of {e.word!r} (image {image}): {msg} (was the pipeline called with the "
                                 "intervention's prompt?)") from None
            self.log.word_keys.setdefault(i, keys[-1])
        self.keys[(n_text, image)] = keys
        return keys

    def region_queries(self, i: int, layer: LayerInfo, n_image: int) -> torch.Tensor | None:
        """Edit ``i``'s region on ``layer``'s image queries (bool, n_image), None for everywhere."""
        e = self.edits[i]
        if e.region is None:
            return None
        assert self.call is not None
        h, w, _ = layer_grid(self.call.latent_hw, n_image)
        key = (i, h, w)
        if key not in self.regions:
            self.regions[key] = _grid_region(e.region, h, w)
        return self.regions[key]

    def correct(
        self, layer: LayerInfo, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
        where: Slices | Sequence[Slices], mask: torch.Tensor | None, scale: float | None,
    ) -> torch.Tensor:
        rows = self.branch_rows(int(q.shape[0])).get("cond")
        if rows is None:
            return out
        first = where if isinstance(where, Slices) else where[0]
        n_text = len(range(*first.keys.indices(int(k.shape[2]))))
        n_image = len(range(*first.queries.indices(int(q.shape[2]))))
        row_range = range(*rows.indices(int(q.shape[0])))
        used: set[int] = set()
        queries = 0
        union_all: set[int] = set()
        for r in row_range:
            image = r - row_range.start  # the cond rows hold the images in order
            active = [i for i, e in enumerate(self.edits)
                      if e.applies_to(image) and e.at_step(self.step) and e.scale != 1.0]
            if not active:
                continue
            keys = self.word_keys(n_text, image)
            union_keys = sorted({p for i in active for p in keys[i]})
            col = {p: c for c, p in enumerate(union_keys)}
            inside = torch.zeros(n_image, dtype=torch.bool)
            regions = {}
            for i in active:
                regions[i] = self.region_queries(i, layer, n_image)
                inside |= True if regions[i] is None else regions[i]
            qidx = inside.nonzero().flatten()
            if qidx.numel() == 0 or not union_keys:
                continue
            # each (query, key) pair's factor: edits that meet there multiply
            factor = torch.ones(qidx.numel(), len(union_keys))
            for i in active:
                sel = slice(None) if regions[i] is None else regions[i][qidx].nonzero().flatten()[:, None]
                factor[sel, torch.tensor([col[p] for p in keys[i]])] *= self.edits[i].scale
            s = first if isinstance(where, Slices) else where[r]
            q0 = range(*s.queries.indices(int(q.shape[2])))
            k0 = range(*s.keys.indices(int(k.shape[2])))
            qpos = (q0.start + q0.step * qidx).to(q.device)
            kpos = torch.tensor([k0.start + k0.step * p for p in union_keys], device=k.device)
            if out.requires_grad and not used:
                out = out.clone()
            with torch.no_grad():
                self._correct_row(out, q, k, v, r, qpos, kpos, (factor - 1.0).to(out.device), mask, scale)
            used.update(active)
            union_all.update(union_keys)
            queries = max(queries, int(qidx.numel()))
        if used:
            self.log.calls.append(EditedCall(self.step, layer.name, tuple(sorted(used)), queries, tuple(sorted(union_all))))
        return out

    @staticmethod
    def _correct_row(
        out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, r: int, qpos: torch.Tensor,
        kpos: torch.Tensor, delta: torch.Tensor, mask: torch.Tensor | None, scale: float | None,
    ) -> None:
        """out[r, :, qpos] += (P[r, :, qpos, kpos] * delta) @ V[r, :, kpos], P the model's softmax over all keys."""
        heads = int(q.shape[1])
        kr, vr = k[r:r + 1], v[r:r + 1]
        if kr.shape[1] != heads:  # grouped-query attention
            kr = kr.repeat_interleave(heads // kr.shape[1], dim=1)
            vr = vr.repeat_interleave(heads // vr.shape[1], dim=1)
        sc = float(q.shape[-1] ** -0.5) if scale is None else float(scale)
        qi = q[r:r + 1][:, :, qpos].float()
        m = None if mask is None else _mask_block(mask, slice(r, r + 1), qpos, slice(None))
        scores = _masked(torch.matmul(qi, kr.float().transpose(-1, -2)).mul_(sc), m)
        probs = torch.nan_to_num_(scores.softmax(dim=-1), nan=0.0)[..., kpos]
        corr = torch.matmul(probs * delta, vr[:, :, kpos].float())  # (1, heads, nq, Dv)
        out[r].index_add_(1, qpos.to(out.device), corr[0].to(out.dtype))


def _call(pre: Any):
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        pre(module, args, kwargs)

    return hook


@contextlib.contextmanager
def intervene(
    pipe: Any, prompt: str | Sequence[str], edits: Sequence[AttentionEdit], *, branch: str = "cond"
) -> Iterator[InterventionLog]:
    """Reweight the attention on words of ``prompt`` while ``pipe`` runs inside the block (see the module
    docstring for the exact semantics); yields an :class:`InterventionLog` filled as the pipeline runs.

    The pipeline must be called with ``prompt`` (or its ``prompt_embeds``, for families without a
    chat template); a batch of prompts is given as a list, and an edit with ``image=j`` applies to image
    ``j`` alone (with several images per prompt, image ``j`` is of prompt ``j * len(prompt) // images``). Every hook is removed on exit, also after an exception. Raises ``InputError`` for an
    edit whose word is not in the prompt, an empty or misshaped region, and
    ``UnsupportedPipelineError`` for a family it cannot edit (video models, non-diffusers denoisers).
    """
    run = _Intervention(pipe, prompt, edits, branch)
    run.attach()
    try:
        yield run.log
    finally:
        run.detach()
