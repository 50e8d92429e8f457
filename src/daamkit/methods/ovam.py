"""OVAM (Marcos-Manchón et al., "Open-Vocabulary Attention Maps with Token Optimization for Semantic
Segmentation in Diffusion Models", CVPR 2024): maps for words that need not be in the prompt.

An *attribution prompt* ("dog cat grass") is encoded by the pipeline's own ``encode_prompt`` (and
whatever the pipeline does before the denoiser, e.g. LTX-2's connectors). In every traced
cross-attention layer and step, the image queries the model attended with (the capture's
``"image_queries"`` stream: after the module's own q norm and rotary embedding) attend to the
attribution prompt's keys, computed with the layer's own ``to_k`` and key norm from the text the
denoiser makes of the attribution prompt (its caption projection, say: the family table's
``text_input``): softmax over the attribution prompt's tokens, then the head mean, upsampling and
streaming sums of DAAM (:class:`~daamkit.aggregate.Accumulator`, with the trace's
``AggregationConfig``; videos keep their time axis and are computed in query chunks). The model never
sees the attribution prompt, so the image is untouched.

Token optimisation (OVAM §3.3): :func:`optimize_token` learns the embedding of one attribution token
from one mask on one generated image, by gradient descent on the binary cross-entropy between the
token's OVAM map and the mask; the result (an :class:`OvamEmbedding`) is given back to
``OvamMethod(embeds=...)`` / ``trace(open_vocabulary=[...])`` for other images.

Families: those whose text attention is cross-attention, i.e. whose text keys are a fixed function of
the text encoders' output (the entries of :data:`daamkit.capture.families.FAMILIES` with a
``text_input``). Joint-attention transformers have no separate text keys to swap; their
open-vocabulary maps are ConceptAttention's (``method="concept"``).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from daamkit.aggregate import Accumulator, chunk_size, layer_grid, resize_and_crop_maps
from daamkit.capture import UnsupportedPipelineError
from daamkit.capture.base import ImageQueries, LayerInfo, query_chunks
from daamkit.capture.families import FAMILIES as FAMILY_TABLE
from daamkit.capture.families import Family, TextPart, family_of
from daamkit.errors import InputError, TraceError
from daamkit.methods.base import AttributionMethod, jsonable
from daamkit.tokens import TokenAlignment, Word, align, concat_alignments, split_words

if TYPE_CHECKING:
    from daamkit.heatmap import GlobalHeatMap
    from daamkit.trace import Trace

FAMILIES = tuple(f.name for f in FAMILY_TABLE if f.text_input is not None)

#: Where an attribution embedding's rows live: ``"encoder"``, what the pipeline hands the denoiser as
#: its text (one encoder's); ``"attention"``, the attention modules' text input, for a family that
#: joins several encoders inside the denoiser (HunyuanDiT's BERT and mT5).
SPACES = ("encoder", "attention")


@dataclass(frozen=True)
class OvamEmbedding:
    """An attribution prompt as rows of text states, one row per token, start/end tokens included, no
    padding: in ``space`` ``"encoder"`` what the pipeline hands the denoiser as its text (one text
    encoder's output), in ``"attention"`` the text the attention modules receive (a family that joins
    several encoders in the denoiser; a word then has rows of each encoder).

    ``alignment`` names the rows: its words are the attribution words, its tokens label every row.
    """

    embeds: torch.Tensor  # (tokens, dim)
    alignment: TokenAlignment
    space: str = "encoder"

    def __post_init__(self) -> None:
        if not isinstance(self.embeds, torch.Tensor) or self.embeds.ndim != 2:
            shape = tuple(self.embeds.shape) if isinstance(self.embeds, torch.Tensor) else type(self.embeds).__name__
            raise InputError(f"an attribution embedding must be a (tokens, dim) tensor, got {shape}")
        if self.embeds.shape[0] != len(self.alignment.tokens):
            raise InputError(f"the attribution embedding has {self.embeds.shape[0]} rows but its alignment "
                             f"{len(self.alignment.tokens)} tokens")
        if not any(w.positions for w in self.alignment.words):
            raise InputError("the attribution embedding names no word")
        if self.space not in SPACES:
            raise InputError(f"an attribution embedding's space must be one of {SPACES}, got {self.space!r}")

    @property
    def words(self) -> list[str]:
        return self.alignment.word_texts()

    def to_dict(self) -> dict[str, Any]:
        """Plain values for ``torch.save`` (``from_dict`` reads them back)."""
        return {"embeds": self.embeds.detach().cpu(), "alignment": self.alignment.to_dict(), "space": self.space}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> OvamEmbedding:
        return cls(d["embeds"], TokenAlignment.from_dict(d["alignment"]), d.get("space", "encoder"))


# ---- encoding the attribution prompt --------------------------------------------------------------
def _family(pipe: Any) -> Family:
    found = family_of(pipe)
    if found is None:
        raise UnsupportedPipelineError(f"{type(pipe).__name__} is not a pipeline daamkit traces: cannot encode "
                                       "attribution words")
    return found[0]


def _entry(name: str) -> Family:
    return next(f for f in FAMILY_TABLE if f.name == name)


def _text_parts(pipe: Any, family: Family) -> list[TextPart]:
    """The family's text encoders the pipeline has; a UNet pipeline with only its second encoder (the
    SDXL refiner) reads that one."""
    parts = [p for p in family.text
             if isinstance(getattr(pipe, p.encoder, None), nn.Module) and getattr(pipe, p.tokenizer, None) is not None]
    if len(parts) == len(family.text):
        return parts
    if len(family.text) == 1:
        for enc in ("text_encoder", "text_encoder_2"):
            tok = enc.replace("text_encoder", "tokenizer")
            if isinstance(getattr(pipe, enc, None), nn.Module) and getattr(pipe, tok, None) is not None:
                return [TextPart(enc, tok)]
    have = ", ".join(p.encoder for p in parts) or "none of them"
    raise InputError(f"{type(pipe).__name__} lacks text encoders its model reads ({', '.join(p.encoder for p in family.text)}; "
                     f"it has {have}): cannot encode attribution words")


def _used_length(tokenizer: Any, ids: list[int]) -> int:
    """How many leading ids are the text and its end token (padding follows)."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    first_eos = ids.index(eos) + 1 if eos is not None and eos in ids else len(ids)
    if pad is None or pad == eos:
        return first_eos
    return min(first_eos, ids.index(pad) if pad in ids else len(ids))


def _key_ids(pipe: Any, part: TextPart, ids: list[int], n_keys: int) -> list[int]:
    """The ids of the denoiser's text rows, in row order, as the family's TextPart says."""
    if part.select is not None:
        return part.select(ids, n_keys)
    if isinstance(part.drop, str):
        drop = int(getattr(pipe, part.drop, 0) or 0)
    elif callable(part.drop):
        drop = int(part.drop(ids, n_keys))
    else:
        drop = int(part.drop)
    return ids[drop:]


def _encode_part(pipe: Any, family: Family, part: TextPart, index: int, text: str,
                 want: list[str]) -> tuple[torch.Tensor, TokenAlignment]:
    """One encoder's rows of the attribution prompt (start token, words, end token) and their names."""
    encoder, tokenizer = getattr(pipe, part.encoder), getattr(pipe, part.tokenizer)
    seen: list[torch.Tensor] = []

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = args[0] if args else kwargs.get("input_ids")
        if isinstance(ids, torch.Tensor) and not seen:
            seen.append(ids.detach().cpu())

    params = inspect.signature(pipe.encode_prompt).parameters
    kwargs: dict[str, Any] = {"prompt": text}
    for name, value in (("do_classifier_free_guidance", False), ("num_images_per_prompt", 1),
                        ("num_videos_per_prompt", 1), ("clean_caption", False),
                        # Sana's instruction would precede the words
                        ("complex_human_instruction", None)):
        if name in params:
            kwargs[name] = value
    if "device" in params:
        kwargs["device"] = getattr(pipe, "_execution_device", None) or getattr(pipe, "device", None)
    if "text_encoder_index" in params:  # HunyuanDiT encodes one encoder per call
        kwargs["text_encoder_index"] = index
    elif index:
        raise InputError(f"{type(pipe).__name__}.encode_prompt cannot be asked for {part.encoder} alone")
    handle = encoder.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            out = pipe.encode_prompt(**kwargs)
            if family.text_handoff is not None:
                embeds = family.text_handoff(pipe, out)
            else:
                embeds = out[0] if isinstance(out, tuple | list) else out
    finally:
        handle.remove()
    if not seen:
        raise InputError(f"{type(pipe).__name__}.encode_prompt did not run its {part.encoder}: cannot name the rows")
    ids = seen[0][0].tolist()
    keys = _key_ids(pipe, part, ids, int(embeds.shape[1])) if part.after is None else []
    n = _used_length(tokenizer, keys)
    alignment = align(tokenizer, keys[:n], None)
    got = [w.text for w in alignment.words if w.positions]
    if part.after is not None or [g.lower() for g in got if g.strip()] != [u.lower() for u in want] or embeds.shape[1] < n:
        raise InputError(
            f"{type(pipe).__name__} does not hand the denoiser the attribution words at the start of its text "
            f"tokens (read {got}, expected {want}): OVAM cannot name the rows of this pipeline's encoding"
        )
    return embeds[0, :n].detach(), TokenAlignment(alignment.tokens, alignment.words, n, text)


def encode_attribution(pipe: Any, words: Sequence[str]) -> OvamEmbedding:
    """The attribution prompt ``" ".join(words)`` through the pipeline's own ``encode_prompt``, cut to
    its start token, words and end token.

    The ids are read off the text encoder as it runs, so the pipeline's own caption cleaning and
    templates count; a template before the prompt or left padding the pipeline keeps (the words not
    at the start of the denoiser's text) is refused, as the rows could not be named. A family whose
    denoiser joins several encoders (HunyuanDiT) gets the rows of each, joined as the denoiser joins
    them (space ``"attention"``); a word then pools its rows in all of them, as in DAAM's maps.
    """
    family = _family(pipe)
    parts = _text_parts(pipe, family)
    text = " ".join(words)
    want = [u for w in words for u in split_words(w)]
    encoded = [_encode_part(pipe, family, part, k, text, want) for k, part in enumerate(parts)]
    if len(encoded) == 1:
        return OvamEmbedding(*encoded[0])
    assert family.text_input is not None
    denoiser = getattr(pipe, family.attr)
    with torch.no_grad():
        rows = family.text_input(denoiser, [e[None] for e, _ in encoded])[0]
    alignment = concat_alignments([a for _, a in encoded])
    return OvamEmbedding(rows.detach(), TokenAlignment(alignment.tokens, alignment.words, len(alignment.tokens), text),
                         "attention")


def encode_positions(pipe: Any, word: str, positions: int) -> OvamEmbedding:
    """``word`` as one attribution word with ``positions`` rows: the pipeline's encoding of the word
    written ``positions`` times, all copies naming the one word (its map is their summed probability).

    Why: a text encoder with few or no layers (the shapes world's has none) hands the denoiser
    embeddings dominated by their position, and the image queries of an object then match the keys of
    the position its noun had in the prompt. A word encoded once sits at position 1, where prompts rarely
    put nouns; its copies at positions 1..``positions`` meet an object named anywhere in that range.
    """
    units = split_words(word)
    if len(units) != 1:
        raise InputError(f"a word encoded at several positions must be one word, got {word!r}")
    if not isinstance(positions, int) or positions < 1:
        raise InputError(f"positions must be a whole number of at least 1, got {positions!r}")
    base = encode_attribution(pipe, [word] * positions)
    rows = tuple(sorted(p for w in base.alignment.words for p in w.positions))
    if len(rows) != positions:
        raise InputError(f"{word!r} is not one token of this pipeline's tokenizer: it cannot be encoded at "
                         f"{positions} positions")
    words = (Word(units[0], 0, 0, rows, False, False),)
    return OvamEmbedding(base.embeds, TokenAlignment(base.alignment.tokens, words, len(base.alignment.tokens), word),
                         base.space)


def combine(parts: Sequence[OvamEmbedding]) -> OvamEmbedding:
    """One attribution prompt from several: the word rows of the later parts go before the first
    part's end tokens, so every word competes in one softmax, as in a prompt written out."""
    base = parts[0]
    if len(parts) == 1:
        return base
    end = max(p for w in base.alignment.words for p in w.positions) + 1
    rows = [base.embeds[:end]]
    tokens = list(base.alignment.tokens[:end])
    words = list(base.alignment.words)
    for part in parts[1:]:
        if part.embeds.shape[1] != base.embeds.shape[1] or part.space != base.space:
            raise InputError(f"attribution embeddings of width {part.embeds.shape[1]} ({part.space}) and "
                             f"{base.embeds.shape[1]} ({base.space}) cannot be combined: they come from different "
                             "text encoders")
        keep = sorted({p for w in part.alignment.words for p in w.positions})
        where = {p: len(tokens) + k for k, p in enumerate(keep)}
        rows.append(part.embeds[keep].to(base.embeds))
        tokens.extend(part.alignment.tokens[p] for p in keep)
        for w in part.alignment.words:
            if w.positions:
                words.append(Word(w.text, len(words), 0, tuple(where[p] for p in w.positions), False, w.is_punctuation))
    rows.append(base.embeds[end:])
    tokens.extend(base.alignment.tokens[end:])
    seen: dict[str, int] = {}
    numbered = []
    for k, w in enumerate(words):
        numbered.append(Word(w.text, k, seen.get(w.text, 0), w.positions, w.truncated, w.is_punctuation))
        seen[w.text] = seen.get(w.text, 0) + 1
    prompt = " ".join(w.text for w in numbered)
    return OvamEmbedding(torch.cat(rows), TokenAlignment(tuple(tokens), tuple(numbered), len(tokens), prompt), base.space)


# ---- keys and probabilities -----------------------------------------------------------------------
def attribution_context(denoiser: nn.Module, family: str, embeds: torch.Tensor, space: str = "encoder") -> torch.Tensor:
    """The attribution prompt as the attention modules receive text: through the denoiser's own
    caption projection (and norm) where it has one (the family's ``text_input``). (1, tokens, dim)."""
    if space == "attention":
        return embeds[None]
    text_input = _entry(family).text_input
    if text_input is None:
        raise UnsupportedPipelineError(OvamMethod.requirement)
    return text_input(denoiser, [embeds[None]])


def _norm_width(norm: nn.Module) -> int | None:
    for attr in ("normalized_shape", "dim"):
        shape = getattr(norm, attr, None)
        if isinstance(shape, tuple | torch.Size) and len(shape):
            return int(shape[-1])
    weight = getattr(norm, "weight", None)
    return int(weight.shape[-1]) if isinstance(weight, torch.Tensor) else None


def _split_heads(x: torch.Tensor, heads: int, norm: nn.Module | None) -> torch.Tensor:
    """(b, n, heads*d) -> (b, heads, n, d), with the module's q/k norm where its processor applies it:
    over all heads at once (``rms_norm_across_heads``: Sana, Wan, LTX) or per head (the usual)."""
    if norm is not None and heads > 1 and _norm_width(norm) == x.shape[-1]:
        x, norm = norm(x), None
    x = x.unflatten(-1, (heads, -1)).transpose(1, 2)
    return norm(x) if norm is not None else x


def attribution_keys(attn: nn.Module, context: torch.Tensor) -> torch.Tensor:
    """The attribution prompt's keys in one cross-attention layer: ``to_k`` (after the module's
    cross norm), head split and key norm. (1, heads, tokens, d). No family rotates the text keys of
    its cross-attention (HunyuanDiT rotates the image queries only; the sdpa tap gives them rotated)."""
    if getattr(attn, "norm_cross", None):
        context = attn.norm_encoder_hidden_states(context)
    # forward(), not the module call: the capture's hook on to_k keeps the first keys of each
    # attention call, and these are computed inside the layer's call
    k = attn.to_k.forward(context.to(attn.to_k.weight.dtype))
    return _split_heads(k, int(attn.heads), getattr(attn, "norm_k", None))


def attribution_probs(
    q: torch.Tensor, keys: torch.Tensor, scale: float, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """softmax over the attribution tokens of the image queries ``q`` ((b, heads, N, d), as the model
    attended with them) on ``keys`` ((1 | b, heads, tokens, d)), in fp32: (b, heads, N, tokens).
    ``mask`` ((b, tokens) bool): the tokens each image's softmax runs over, when the images have
    attribution prompts of their own (padded keys)."""
    scores = torch.matmul(q.float(), keys.float().transpose(-1, -2)) * float(scale)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :].to(scores.device), float("-inf"))
    return scores.softmax(dim=-1)


@dataclass(frozen=True)
class _Kept:
    """One layer's conditional image queries at one step, for :func:`optimize_token`."""

    module: nn.Module
    q: torch.Tensor  # (b, heads, N, d)
    scale: float


def _denoisers(capture: Any) -> list[nn.Module]:
    return list(getattr(capture, "denoisers", None) or [capture.denoiser])


def _owners(capture: Any) -> dict[int, nn.Module]:
    """The denoiser of each traced attention module (by id): Wan 2.2's experts have their own text projection."""
    taps = getattr(capture, "taps", None)
    if taps is not None:
        return {id(m): d for d, _, m in taps}
    return {id(m): capture.denoiser for _, m in capture.modules}


class OvamMethod(AttributionMethod):
    """OVAM maps of attribution words (``words``, encoded by the pipeline's text encoder) and/or
    attribution embeddings (``embeds``, e.g. tokens from :func:`optimize_token`), which need not be in
    the prompt. All of them form one attribution prompt: one softmax over its tokens.

    keep_queries: also keep each selected layer's conditional image queries at every selected step
        (``trace(steps=..., layers=...)`` bound the memory), which :func:`optimize_token` learns from
        (images only).
    per_image: instead of ``words``/``embeds``, one list of words per image of the pipeline call (e.g.
        the objects each prompt names): image ``i`` gets the attribution prompt ``per_image[i]``, its
        own softmax, and maps of those words only. A word may repeat within an image's list; its
        occurrences are then told apart as in a prompt (``maps.word(w, occurrence=k)``).
    """

    name = "ovam"
    captures = frozenset({"image_queries"})
    families = FAMILIES
    requirement = (
        "open-vocabulary (OVAM) maps need a denoiser whose text attention is cross-attention (Stable Diffusion "
        "UNets and AnimateDiff, PixArt, Sana, HunyuanDiT, Wan, LTX-Video, LTX-2, Sana-Video); for joint-attention "
        "models (SD3, Flux, ...), trace with concepts=[...] and read method='concept'"
    )
    not_enabled = "no open-vocabulary words were traced: pass open_vocabulary=[...] to trace() for method='ovam'"

    def __init__(
        self,
        words: Sequence[str] | None = None,
        embeds: OvamEmbedding | Sequence[OvamEmbedding] | None = None,
        *,
        keep_queries: bool = False,
        per_image: Sequence[Sequence[str]] | None = None,
    ) -> None:
        super().__init__()
        self.per_image: list[list[str]] | None = None
        if per_image is not None:
            if words is not None or embeds is not None:
                raise InputError("give open-vocabulary words either for all images (words/embeds) or per image, "
                                 "not both")
            if isinstance(per_image, str) or any(isinstance(ws, str) for ws in per_image):
                raise InputError("per_image must hold one list of words per image, e.g. [['cat'], ['dog', 'grass']]")
            self.per_image = [[str(w).strip() for w in ws] for ws in per_image]
            if not self.per_image or any(not ws or any(not w or not split_words(w) for w in ws) for ws in self.per_image):
                raise InputError(f"per_image needs a non-empty list of non-empty words for every image, got {per_image}")
            words = []
        if isinstance(words, str):
            words = [words]
        self.words = [str(w).strip() for w in words] if words is not None else []
        if isinstance(embeds, OvamEmbedding):
            embeds = [embeds]
        self.embeds = list(embeds) if embeds is not None else []
        if any(not isinstance(e, OvamEmbedding) for e in self.embeds):
            raise InputError("embeds must be OvamEmbedding objects (from encode_attribution or optimize_token)")
        if words is not None and any(not w or not split_words(w) for w in self.words):
            raise InputError(f"open-vocabulary words must be non-empty words, got {list(words)}")
        if not self.words and not self.embeds and self.per_image is None:
            raise InputError("open_vocabulary is empty: give the words (or learned tokens) to map")
        if len(set(self.words)) != len(self.words):
            raise InputError(f"open-vocabulary words must be distinct, got {self.words}")
        self.keep_queries = bool(keep_queries)
        self.attribution: OvamEmbedding | None = None
        self.attributions: list[OvamEmbedding] = []  # one per image, with per_image
        self._mask: torch.Tensor | None = None  # (images, tokens) of the padded per-image prompts
        self.accumulator: Accumulator | None = None
        self.queries: dict[tuple[int, str], _Kept] = {}  # (step, layer) -> the conditional image queries
        self._owner: dict[int, nn.Module] = {}  # attention module id -> its denoiser
        self._keys: dict[int, torch.Tensor] = {}  # attention module id -> attribution keys
        self._contexts: dict[int, torch.Tensor] = {}  # denoiser id -> attribution context
        self._trace: Trace | None = None

    @classmethod
    def from_options(cls, items: Sequence[str | OvamEmbedding] | OvamEmbedding | str | None) -> OvamMethod | None:
        """The method for ``trace(open_vocabulary=...)``: words and learned embeddings in any mix."""
        if items is None:
            return None
        if isinstance(items, str | OvamEmbedding):
            items = [items]
        words = [w for w in items if not isinstance(w, OvamEmbedding)]
        embeds = [e for e in items if isinstance(e, OvamEmbedding)]
        return cls(words if words or not embeds else None, embeds)

    @classmethod
    def for_images(cls, words: Sequence[Sequence[str]]) -> OvamMethod:
        """Each image's own words as its attribution prompt (``per_image``)."""
        return cls(per_image=words)

    # ---- lifecycle ---------------------------------------------------------------------------
    def attach(self, trace: Trace) -> None:
        self._trace = trace
        capture = trace.capture
        varies = _entry(capture.family).text_varies
        for denoiser in _denoisers(capture):
            why = varies(denoiser) if varies is not None else None
            if why:
                raise UnsupportedPipelineError(
                    f"open-vocabulary (OVAM) maps need text keys that are a fixed function of the text, but this "
                    f"{type(denoiser).__name__}'s are not: {why}; use the cross-attention maps (method='daam')"
                )
        if self.per_image is not None:
            encoded: dict[tuple[str, ...], OvamEmbedding] = {}
            for ws in self.per_image:
                if tuple(ws) not in encoded:
                    encoded[tuple(ws)] = encode_attribution(trace.pipe, ws)
            self.attributions = [encoded[tuple(ws)] for ws in self.per_image]
        else:
            parts = ([encode_attribution(trace.pipe, self.words)] if self.words else []) + self.embeds
            self.attribution = combine(parts)
        self._owner = _owners(capture)

    def start_generation(self, trace: Trace) -> None:
        gen = trace.generation
        if self.per_image is not None and len(self.per_image) != gen.num_images:
            raise InputError(f"OVAM was given words for {len(self.per_image)} image(s) (per_image), but the "
                             f"pipeline call makes {gen.num_images}")
        self.accumulator = Accumulator(trace.config, gen.call.latent_hw, gen.num_images, frames=gen.call.frames)
        self.queries = {}
        self._keys = {}
        self._contexts = {}
        self._mask = None

    def wants(self, trace: Trace, layer: LayerInfo, image_tokens: int) -> bool:
        return self.accumulator is None or self.accumulator.wants(layer, image_tokens)

    def _module_keys(self, attn: nn.Module) -> torch.Tensor:
        keys = self._keys.get(id(attn))
        if keys is None:
            assert self._trace is not None
            denoiser = self._owner.get(id(attn), self._trace.capture.denoiser)
            device = attn.to_k.weight.device
            context = self._contexts.get(id(denoiser))
            if context is None:
                with torch.no_grad():
                    context = self._contexts[id(denoiser)] = self._attribution_context(denoiser, device)
            with torch.no_grad():
                keys = self._keys[id(attn)] = attribution_keys(attn, context.to(device))
        return keys

    def _attribution_context(self, denoiser: nn.Module, device: torch.device) -> torch.Tensor:
        """(1, tokens, dim); with per-image prompts (images, longest, dim), zero-padded, and
        ``self._mask`` saying which rows are real."""
        assert self._trace is not None
        family = self._trace.capture.family
        if self.per_image is None:
            assert self.attribution is not None
            a = self.attribution
            return attribution_context(denoiser, family, a.embeds.to(device=device), a.space)
        contexts = [attribution_context(denoiser, family, a.embeds.to(device=device), a.space)[0] for a in self.attributions]
        longest = max(c.shape[0] for c in contexts)
        self._mask = torch.zeros(len(contexts), longest, dtype=torch.bool)
        for k, c in enumerate(contexts):
            self._mask[k, : c.shape[0]] = True
        return torch.stack([F.pad(c, (0, 0, 0, longest - c.shape[0])) for c in contexts])

    def on_image_queries(self, trace: Trace, layer: LayerInfo, queries: ImageQueries) -> None:
        if queries.branch != "cond" or self.accumulator is None:
            return
        q = queries.q
        keys = self._module_keys(queries.module)
        b, heads, total, _ = q.shape
        frames = max(1, trace.generation.call.frames)
        step = trace.generation.step
        # a video's (queries x attribution tokens) block is small per query but its queries are many
        size = chunk_size(total, total // frames, b * heads * int(keys.shape[-2]) * 4, trace.config.chunk_mib,
                          q.device)
        with torch.no_grad():
            for start, stop, chunk in query_chunks(total, size):
                probs = attribution_probs(q[:, :, start:stop], keys, queries.scale, self._mask)
                self.accumulator.add(layer, step, probs, "cond", chunk)
        if self.keep_queries and frames == 1 and layer.name in self.accumulator.layers:  # selected: add() kept it
            self.queries[(step, layer.name)] = _Kept(queries.module, q.detach().clone(), queries.scale)

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
        """``prompt`` does not apply (the words are the attribution prompt's); the maps are those of the
        conditional branch's queries. A video's maps have its time axis, as DAAM's."""
        from daamkit.heatmap import GlobalHeatMap

        gen = trace.generation
        if branch != "cond":
            raise InputError("OVAM maps are read from the conditional branch's queries only: use branch='cond'")
        if not 0 <= i < gen.num_images:
            raise IndexError(f"image index {i} out of range: the traced call made {gen.num_images} image(s)")
        attribution = self.attributions[i] if self.per_image is not None else self.attribution
        assert self.accumulator is not None and attribution is not None
        if "cond" not in self.accumulator.branches:
            raise TraceError("no OVAM maps were recorded (no selected cross-attention layer ran inside the trace)")
        # per-image prompts were padded to the longest: image i's own tokens come first
        maps = self.accumulator.result("cond", steps=steps, layers=layers, heads=heads)[i][: attribution.embeds.shape[0]]
        scale = trace.capture.cell_pixels(trace.pipe)
        h, w = gen.call.latent_hw
        image_size = (h * scale, w * scale)
        meta = {
            "family": trace.capture.family,
            "pipeline": type(trace.pipe).__name__,
            "method": "ovam",
            "attribution_prompt": attribution.alignment.prompt,
            "words": attribution.words,
            "branch": "cond",
            "image_index": i,
            "num_steps": gen.step + 1,
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
        if gen.output_resize is not None:
            generated, image_size = gen.output_resize
            maps = resize_and_crop_maps(maps, generated, image_size)
            meta["generated_size"] = list(generated)
        return GlobalHeatMap(maps.cpu(), attribution.alignment, image_size=image_size, meta=meta)


# ---- token optimisation ---------------------------------------------------------------------------
def _ovam_method(tc: Trace) -> OvamMethod:
    method = tc.method("ovam")
    if not isinstance(method, OvamMethod):
        raise TraceError("the trace's 'ovam' method is not daamkit's OvamMethod")
    if tc.generation.call.frames > 1:
        raise InputError("OVAM token optimisation learns from one image: the traced call made a video")
    if not method.queries:
        raise TraceError(
            "no image queries were kept: trace with methods=[OvamMethod([...], keep_queries=True)] to optimise a token"
        )
    return method


def ovam_map(tc: Trace, embeds: torch.Tensor, image: int = 0, space: str = "encoder") -> torch.Tensor:
    """The OVAM maps (tokens, gh, gw) of the attribution rows ``embeds`` (in ``space``, see
    :class:`OvamEmbedding`) on image ``image`` of the latest generation, from the queries the trace
    kept, differentiable in ``embeds``: the mean over the kept (step, layer) pairs of each pair's
    head-mean map on the grid (the method's maps over the steps)."""
    method = _ovam_method(tc)
    gen = tc.generation
    if not 0 <= image < gen.num_images:
        raise IndexError(f"image index {image} out of range: the traced call made {gen.num_images} image(s)")
    config = tc.config
    grid = tuple(config.grid) if config.grid is not None else tuple(gen.call.latent_hw)
    by_module: dict[int, list[_Kept]] = {}
    for kept in method.queries.values():
        by_module.setdefault(id(kept.module), []).append(kept)
    contexts: dict[int, torch.Tensor] = {}
    total: torch.Tensor | None = None
    for kept in by_module.values():  # the steps of a module in one product
        attn = kept[0].module
        denoiser = method._owner.get(id(attn), tc.capture.denoiser)
        if id(denoiser) not in contexts:
            contexts[id(denoiser)] = attribution_context(denoiser, tc.capture.family, embeds, space)
        keys = attribution_keys(attn, contexts[id(denoiser)].to(attn.to_k.weight.device))
        q = torch.cat([k.q[image : image + 1] for k in kept])
        probs = attribution_probs(q, keys, kept[0].scale)  # (steps, heads, N, tokens)
        if config.heads is not None:
            probs = probs[:, list(config.heads)]
        p = probs.mean(1)  # (steps, N, tokens)
        h, w, _ = layer_grid(gen.call.latent_hw, p.shape[1])
        m = p.transpose(1, 2).reshape(p.shape[0], -1, h, w)
        if (h, w) != grid:
            m = F.interpolate(m, size=grid, mode="bicubic", align_corners=False).clamp(min=0)
        total = m.sum(0) if total is None else total + m.sum(0)
    assert total is not None
    return total / len(method.queries)


def _target(mask: Any, grid: tuple[int, int]) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(mask), dtype=torch.float32)
    if t.ndim != 2:
        raise InputError(f"the mask must be a 2-D (height, width) array, got shape {tuple(t.shape)}")
    if t.min() < 0 or t.max() > 1:
        raise InputError("the mask must hold values in [0, 1] (a boolean or 0/1 mask)")
    if not 0 < float(t.mean()) < 1:
        raise InputError("the mask is empty or covers the whole image: nothing to learn from")
    return F.interpolate(t[None, None], size=grid, mode="area")[0, 0]


def optimize_token(
    tc: Trace,
    mask: Any,
    *,
    init: str,
    image: int = 0,
    name: str | None = None,
    iterations: int = 100,
    lr: float = 1.0,
    positions: int = 1,
) -> OvamEmbedding:
    """Learn one attribution token from ``mask`` (a (H, W) bool/0-1 array over image ``image`` of the
    latest generation of ``tc``, traced with ``OvamMethod(..., keep_queries=True)``).

    The attribution prompt is ``init`` encoded by the pipeline (its start and end tokens stay as
    encoded); ``init``'s token rows are replaced by one learnable row, started at their mean, and
    Adam (``lr``, ``iterations`` steps) lowers the binary cross-entropy between that row's OVAM map
    (:func:`ovam_map`, on the aggregation grid; the mask is area-averaged onto it) and the mask.
    Returns the embedding, named ``name`` (default ``init``), for ``OvamMethod(embeds=...)``.

    ``lr`` is in units of the starting rows' root-mean-square entry, so it means the same for every
    encoder. The defaults move the token far from its word, as OVAM's own optimiser does: where the
    word's attention does not follow its object (a model never trained to ground its words), small
    steps leave the token's map where the word's was. Where the word already follows its object (a
    model trained with a grounding loss) a token learned from one image fits that image and maps
    other images worse than the word; compare the two on images other than the training one.

    positions: above 1, ``init`` (one word) is encoded at that many positions
    (:func:`encode_positions`) and one offset, shared by all its rows, is learned; the token's map is
    the summed probability of its rows. With an encoder whose embeddings carry their position, this
    keeps the token from learning the position its noun had in the training image's prompt.
    """
    method = _ovam_method(tc)
    if not init or not split_words(init):
        raise InputError("init must be a word to start the token from")
    if iterations < 1 or not lr > 0:
        raise InputError(f"iterations must be at least 1 and lr positive, got {iterations} and {lr}")
    if not isinstance(positions, int) or positions < 1:
        raise InputError(f"positions must be a whole number of at least 1, got {positions!r}")
    label = name if name is not None else init
    units = split_words(label)
    if not units:
        raise InputError(f"the token name {label!r} holds no word")
    gen = tc.generation
    grid = tuple(tc.config.grid) if tc.config.grid is not None else tuple(gen.call.latent_hw)
    target = _target(mask, grid)
    base = encode_attribution(tc.pipe, [init]) if positions == 1 else encode_positions(tc.pipe, init, positions)
    if base.space != "encoder":
        raise InputError(f"OVAM token optimisation learns one row of one text encoder; {type(tc.pipe).__name__}'s "
                         "denoiser reads several encoders")
    rows = sorted({p for w in base.alignment.words for p in w.positions})
    first, last = rows[0], rows[-1]
    if rows != list(range(first, last + 1)):
        raise InputError(f"the rows of {init!r} are not contiguous in its encoding: cannot learn a token from it")
    device = next(iter(method.queries.values())).q.device
    head = base.embeds[:first].float().to(device)
    tail = base.embeds[last + 1 :].float().to(device)
    start = base.embeds[rows].float().to(device)
    if positions == 1:
        start = start.mean(0, keepdim=True)  # a multi-token word becomes one token
    # Adam on an offset from the start is Adam on the rows themselves: with one row, the token
    offset = torch.zeros(start.shape[1], device=device, requires_grad=True)
    scale = float(start.norm(dim=1).mean()) / max(1.0, start.shape[1] ** 0.5)
    target = target.to(device)
    opt = torch.optim.Adam([offset], lr=lr * scale)
    n = start.shape[0]
    with torch.enable_grad():
        for _ in range(iterations):
            ctx = torch.cat([head, start + offset, tail])
            # the rows' summed probability: the share of the attribution prompt the word gets
            m = ovam_map(tc, ctx, image, base.space)[first : first + n].sum(0).clamp(1e-6, 1 - 1e-6)
            loss = F.binary_cross_entropy(m, target)
            opt.zero_grad()
            loss.backward()
            opt.step()
    embeds = torch.cat([head, (start + offset).detach(), tail]).to(base.embeds.dtype).cpu()
    tokens = base.alignment.tokens[:first] + (label,) * n + base.alignment.tokens[last + 1 :]
    where = tuple(range(first, first + n))
    words = tuple(Word(u, k, 0, where, False, False) for k, u in enumerate(units))
    return OvamEmbedding(embeds, TokenAlignment(tokens, words, len(tokens), label), base.space)
