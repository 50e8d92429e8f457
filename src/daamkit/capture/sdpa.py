"""Reads the queries and keys a transformer's attention uses, at its call of scaled-dot-product attention.

Diffusers' transformer processors build q and k in many ways (fused projections, q/k RMSNorm, several
rotary conventions, text and image streams concatenated in either order, reference-image tokens)
and then hand them to ``torch.nn.functional.scaled_dot_product_attention``, directly or through
``diffusers.models.attention_dispatch.dispatch_attention_fn`` with its native backend. That call is
the one place where q and k are exactly what the model attends with. While a traced module runs, a
:class:`torch.overrides.TorchFunctionMode` watches for that call, computes the image-query x text-key
probabilities from the very tensors it receives, and lets the call run unchanged: the processor, its
kernel and the image stay as they are. The mode is pushed by a forward pre-hook on the attention
module and popped by an ``always_call`` forward hook, so it is off outside traced modules and after an
exception.

A backend that bypasses PyTorch's attention (flash-attn, xformers, sage) hides q and k; the layers
where that happened are listed in ``missed`` so the trace can say so instead of returning empty maps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from daamkit.capture.base import CaptureSink, ImageQueries, LayerInfo, query_chunks

_SDPA = F.scaled_dot_product_attention

#: How the text probabilities of a joint attention are normalised (``AggregationConfig.probabilities``).
PROBABILITIES = ("text", "model")


def _length(s: slice, n: int) -> int:
    return len(range(*s.indices(n)))


@dataclass(frozen=True)
class Slices:
    """Where the generated image's queries and the prompt's keys lie in one attention call.

    valid: optional (batch, text keys) bool, False where a row's key inside ``keys`` is not text
    although the model does not mask it (a learnt pad token after a shorter caption): such keys get
    no text probability, and ``"text"`` probabilities are normalised without them.
    """

    queries: slice
    keys: slice
    valid: torch.Tensor | None = None

    def part(self, start: int, stop: int, q_len: int) -> Slices:
        """The same call restricted to image queries ``start:stop`` (counted from the first image query)."""
        r = range(*self.queries.indices(q_len))[start:stop]
        return Slices(slice(r.start, r.stop, r.step), self.keys, self.valid)


def _mask_block(mask: torch.Tensor, rows: slice, queries: slice | torch.Tensor, keys: slice) -> torch.Tensor:
    """The part of an SDPA mask (any shape that broadcasts to (B, H, Nq, Nk)) for these rows,
    queries and keys, as (b, h|1, nq|1, nk)."""
    m = mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    if m.shape[0] != 1:
        m = m[rows]
    if m.shape[-2] != 1:
        m = m[..., queries, :]
    if m.shape[-1] != 1:
        m = m[..., keys]
    return m


def _masked(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return scores
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, float("-inf"))
    return scores + mask.float()


def text_probabilities(
    q: torch.Tensor,
    k: torch.Tensor,
    where: Slices,
    *,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    rows: slice = slice(None),
    probabilities: str = "text",
    chunk: int = 1024,
) -> torch.Tensor:
    """Attention probabilities of the image queries on the text keys, (b, heads, n_image, n_text), fp32.

    q: (B, H, Nq, D) and k: (B, Hk, Nk, D) as scaled-dot-product attention receives them (Hk may divide
    H: grouped-query attention). ``probabilities="text"`` softmaxes over the text keys only, the analogue
    of a UNet's cross-attention; ``"model"`` softmaxes over every key the model attends to and then keeps
    the text columns, i.e. the model's own probabilities. The model's mask holds in both: masked keys get
    no probability; a query whose text keys are all masked gets zeros.
    """
    if probabilities not in PROBABILITIES:
        raise ValueError(f"probabilities must be one of {PROBABILITIES}, got {probabilities!r}")
    d = q.shape[-1]
    scale = float(d**-0.5) if scale is None else float(scale)
    qi = q[rows][:, :, where.queries].float()
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    k = k[rows]
    valid = None if where.valid is None else where.valid[rows][:, None, None, :].to(q.device)
    if probabilities == "text":
        kt = k[:, :, where.keys].float()
        m = None if mask is None else _mask_block(mask, rows, where.queries, where.keys)
        scores = _masked(torch.matmul(qi, kt.transpose(-1, -2)).mul_(scale), m)
        if valid is not None:
            scores = scores.masked_fill_(~valid, float("-inf"))
        return torch.nan_to_num_(scores.softmax(dim=-1), nan=0.0)
    # The model's softmax runs over all keys; its normaliser is taken in chunks of queries so that the
    # full (queries x keys) block is never held at once.
    kf = k.float()
    n_text = len(range(*where.keys.indices(k.shape[2])))
    out = qi.new_empty(qi.shape[0], qi.shape[1], qi.shape[2], n_text)
    q_range = range(*where.queries.indices(q.shape[2]))
    for start in range(0, qi.shape[2], chunk):
        stop = min(start + chunk, qi.shape[2])
        qs = slice(q_range.start + start * q_range.step, q_range.start + stop * q_range.step, q_range.step)
        m = None if mask is None else _mask_block(mask, rows, qs, slice(None))
        scores = _masked(torch.matmul(qi[:, :, start:stop], kf.transpose(-1, -2)).mul_(scale), m)
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)
        out[:, :, start:stop] = torch.nan_to_num((scores[..., where.keys] - lse).exp_(), nan=0.0)
    return out if valid is None else out.masked_fill_(~valid, 0.0)


@dataclass(frozen=True)
class JointCall:
    """One joint attention call as scaled-dot-product attention received it: q (B, H, L, D), k (B, Hk, L, D)
    over one sequence of text and image tokens, where they lie (``where``: the generated image's queries,
    which are also its keys, and the text keys, which are also its queries), the model's mask and scale,
    and the batch rows of each branch."""

    q: torch.Tensor
    k: torch.Tensor
    where: Slices
    mask: torch.Tensor | None
    scale: float | None
    rows: dict[str, slice]


def block_probabilities(
    q: torch.Tensor,
    k: torch.Tensor,
    queries: torch.Tensor | slice,
    keys: slice,
    *,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    rows: slice = slice(None),
    probabilities: str = "text",
) -> torch.Tensor:
    """Attention probabilities of some queries on one span of keys, (b, heads, n_queries, n_keys), fp32.

    q: (B, H, Nq, D), k: (B, Hk, Nk, D) as scaled-dot-product attention receives them; ``queries`` are
    positions on the query axis (an index tensor or a slice). ``"text"`` softmaxes over the ``keys``
    span only, ``"model"`` over every key (the model's own probabilities) and keeps the span; only the
    chosen queries' rows are computed. valid: optional (B, n_keys) bool, False for keys of the span
    that get no probability. The model's mask holds in both.
    """
    if probabilities not in PROBABILITIES:
        raise ValueError(f"probabilities must be one of {PROBABILITIES}, got {probabilities!r}")
    scale = float(q.shape[-1] ** -0.5) if scale is None else float(scale)
    qi = q[rows][:, :, queries].float()
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    k = k[rows].float()
    span = range(*keys.indices(k.shape[2]))
    if probabilities == "text":
        k = k[:, :, keys]
    m = None if mask is None else _mask_block(mask, rows, queries, keys if probabilities == "text" else slice(None))
    scores = _masked(torch.matmul(qi, k.transpose(-1, -2)).mul_(scale), m)
    if probabilities == "text":
        if valid is not None:
            scores = scores.masked_fill_(~valid[rows][:, None, None, :].to(scores.device), float("-inf"))
        return torch.nan_to_num_(scores.softmax(dim=-1), nan=0.0)
    out = torch.nan_to_num_(scores.softmax(dim=-1), nan=0.0)[..., span.start:span.stop:span.step]
    if valid is not None:
        out = out.masked_fill(~valid[rows][:, None, None, :].to(out.device), 0.0)
    return out


class _Watch(TorchFunctionMode):
    """Calls ``tap.on_sdpa`` at every scaled-dot-product attention while a traced module runs."""

    def __init__(self, tap: AttentionTap):
        super().__init__()
        self.tap = tap

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _SDPA:
            self.tap.on_sdpa(args, kwargs)
        return func(*args, **kwargs)


class AttentionTap:
    """The hooks of one traced attention module.

    ``locate(tap, q_len, k_len)`` gives the :class:`Slices` of one call (or None to skip it); the tap
    keeps what its pre-hook read off the module's inputs (``hidden_len``, ``text_len``) for it. Where
    the rows of a batch place their text and image differently (each sample packed as [its caption,
    image]), ``locate`` gives one ``Slices`` per batch row, all with key slices of one length and
    ``valid`` marking the keys that are not text in a row with a shorter caption.
    Only the first attention call of a module forward is read: later ones (IP-Adapter's image
    attention, say) attend to other keys. ``skip(module)``, if given, is the number of calls to let pass
    before it (a cross-attention that attends to image-context keys first, then to the text).
    """

    def __init__(
        self, layer: LayerInfo, module: nn.Module, sink: CaptureSink, capture: Any, locate: Any,
        skip: Callable[[nn.Module], int] | None = None, per_row: bool = False,
    ):
        """per_row: the module calls attention once per batch row, in row order (Mochi leaves out each
        row's masked text tokens): the calls are gathered and delivered together, each row's text
        probabilities padded with zeros to the module's text length (a row's keys are its first text
        tokens)."""
        self.layer, self.module, self.sink, self.capture, self.locate = layer, module, sink, capture, locate
        self.skip = skip
        self.pending = 0
        self.per_row = per_row
        self.row_calls: list[tuple[torch.Tensor, torch.Tensor, Any, Any, Slices]] = []
        self.mode = _Watch(self)
        self.entered = False
        self.seen = True
        self.rows: dict[str, slice] = {}
        self.hidden_len = 0
        self.text_len: int | None = None
        self.probs_wanted = self.queries_wanted = False

    def pre(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.seen = True
        call = self.capture.current
        if call is None:
            return
        rows = self.sink.branch_rows(call.batch)
        n_image = call.latent_hw[0] * call.latent_hw[1]
        self.probs_wanted = bool(rows) and self.sink.wants(self.layer, n_image)
        self.queries_wanted = bool(rows) and self.sink.wants_queries(self.layer, n_image)
        if not (self.probs_wanted or self.queries_wanted):
            return
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        self.hidden_len = int(hidden.shape[1]) if isinstance(hidden, torch.Tensor) and hidden.dim() >= 3 else 0
        self.text_len = int(context.shape[1]) if isinstance(context, torch.Tensor) and context.dim() >= 3 else None
        self.rows = rows
        self.pending = self.skip(module) if self.skip is not None else 0
        self.row_calls = []
        self.seen = False
        self.mode.__enter__()
        self.entered = True

    def on_sdpa(self, args: tuple, kwargs: dict) -> None:
        if self.seen and not (self.per_row and self.row_calls):
            return
        if self.pending > 0:
            self.pending -= 1
            return
        self.seen = True
        q = kwargs.get("query", args[0] if args else None)
        k = kwargs.get("key", args[1] if len(args) > 1 else None)
        mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
        if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or q.dim() != 4:
            return
        where = self.locate(self, int(q.shape[2]), int(k.shape[2]))
        if where is None:
            return
        q, k = q.detach(), k.detach()
        if self.per_row:
            if not self.probs_wanted:
                return
            if not isinstance(where, Slices):
                raise ValueError(f"{self.layer.name}: a per-row attention call takes one Slices")
            self.row_calls.append((q, k, mask, kwargs.get("scale"), where))
            if len(self.row_calls) >= self.capture.current.batch:
                calls, self.row_calls = self.row_calls, []
                self._deliver_rows(calls)
            return
        if self.queries_wanted and isinstance(where, Slices):
            scale = kwargs.get("scale")
            scale = float(q.shape[-1] ** -0.5) if scale is None else float(scale)
            for branch, rows in self.rows.items():
                self.sink.on_image_queries(self.layer, ImageQueries(self.module, q[rows][:, :, where.queries], scale, branch))
        if not self.probs_wanted:
            return
        parts = [where] if isinstance(where, Slices) else list(where)
        q_len = int(q.shape[2])
        total = _length(parts[0].queries, q_len)
        frames = max(1, self.capture.current.frames)
        n_text = _length(parts[0].keys, int(k.shape[2]))
        with torch.no_grad():
            for branch, rows in self.rows.items():
                n_rows = _length(rows, int(q.shape[0]))
                size = self.sink.query_chunk(total, total // frames, n_rows * int(q.shape[1]) * n_text * 4, q.device)
                # chunks of image queries bound the memory of the (queries x text keys) block for videos
                for start, stop, chunk in query_chunks(total, size):
                    these = parts if chunk is None else [p.part(start, stop, q_len) for p in parts]
                    if isinstance(where, Slices):
                        probs = text_probabilities(
                            q, k, these[0], scale=kwargs.get("scale"), mask=mask, rows=rows,
                            probabilities=self.capture.probabilities,
                        )
                    else:  # one Slices per batch row: rows packed with their own text length (Lumina 2)
                        probs = torch.cat([
                            text_probabilities(
                                q, k, these[r], scale=kwargs.get("scale"), mask=mask, rows=slice(r, r + 1),
                                probabilities=self.capture.probabilities,
                            )
                            for r in range(*rows.indices(q.shape[0]))
                        ])
                    self.sink.on_attention(self.layer, probs, branch, chunk)
            # the whole call's q and k, for consumers of more than the image-text block (relation maps);
            # only a call laid out as one sequence for every row qualifies
            joint = getattr(self.sink, "on_joint_attention", None)
            if joint is not None and isinstance(where, Slices) and q.shape[2] == k.shape[2]:
                joint(self.layer, JointCall(q, k, where, mask, kwargs.get("scale"), dict(self.rows)))

    def _deliver_rows(self, calls: list[tuple[torch.Tensor, torch.Tensor, Any, Any, Slices]]) -> None:
        """One delivery per branch (and query chunk) from the per-row calls of one module forward."""
        q0, k0, _, _, where0 = calls[0]
        q_len = int(q0.shape[2])
        total = _length(where0.queries, q_len)
        frames = max(1, self.capture.current.frames)
        width = max([self.text_len or 0] + [_length(c[4].keys, int(c[1].shape[2])) for c in calls])
        with torch.no_grad():
            for branch, rows in self.rows.items():
                idx = range(*rows.indices(len(calls)))
                size = self.sink.query_chunk(total, total // frames, len(idx) * int(q0.shape[1]) * width * 4, q0.device)
                for start, stop, chunk in query_chunks(total, size):
                    probs = []
                    for r in idx:
                        q, k, mask, scale, where = calls[r]
                        part = where if chunk is None else where.part(start, stop, int(q.shape[2]))
                        p = text_probabilities(q, k, part, scale=scale, mask=mask,
                                               probabilities=self.capture.probabilities)
                        probs.append(F.pad(p, (0, width - int(p.shape[-1]))))
                    self.sink.on_attention(self.layer, torch.cat(probs), branch, chunk)

    def post(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self.entered:
            self.entered = False
            self.mode.__exit__(None, None, None)
        self.row_calls = []
        if not self.seen:
            self.capture.missed.add(self.layer.name)
            self.seen = True

    def install(self, hooks: Any) -> None:
        hooks.add(self.module.register_forward_pre_hook(self.pre, with_kwargs=True))
        hooks.add(self.module.register_forward_hook(self.post, with_kwargs=True, always_call=True))
