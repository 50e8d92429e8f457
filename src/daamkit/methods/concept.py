"""Concept maps for joint-attention transformers, in the manner of ConceptAttention (Helbling et al.
2025): maps for words that need not be in the prompt, without changing the generated image.

A set of concept embeddings (one vector per concept, in the context encoder's output space) is run
as an extra *text-like stream* through the double-stream (Flux) / joint (SD3) blocks with the
blocks' own text-stream weights: AdaLN modulation by the block's ``temb``, ``add_{q,k,v}_proj``,
q/k norms, attention over [concept keys ; image keys], ``to_add_out``, ``ff_context``. The image
never attends to the concepts (we compute the concept stream on the side, after the block ran),
so the generation is untouched. Each block's map is the dot product of the image tokens' attention
outputs (read off the input of ``attn.to_out[0]``) with the concepts' attention outputs; maps are
averaged over blocks and steps and, by default, softmax-normalised over the concepts.
:class:`ConceptMethod` is the attribution method (``method="concept"``) built on that stream; the
video families (CogVideoX, Mochi, HunyuanVideo, HunyuanVideo 1.5) run it through the per-family
adapters of :mod:`daamkit.methods.concept_video`, their maps with the time axis of DAAM's.

The other joint-attention image families (Chroma, FLUX.2, Qwen-Image, CogView4, AuraFlow, Z-Image,
Lumina 2, HiDream) run the same stream through :class:`JointConceptCapture`, one
:class:`ConceptBlocks` entry each in :data:`CONCEPT_BLOCKS`: the image side (keys, values, outputs)
is read off each block's attention call as the model made it, the concept side is that family's
text-stream maths on the concept tokens. Each entry's ``approximation`` says what differs from
running the concepts as prompt tokens (text positions for rotary embeddings, AuraFlow's register
tokens, the caption refiners of Z-Image and Lumina 2, HiDream's Llama streams). Where a family has
both, only the blocks with a text stream of their own are used (the double / joint blocks, as
ConceptAttention does on Flux); Z-Image and Lumina 2 have single-stream layers only, and there the
concepts take the caption's place with the layers' shared weights. Families without a joint
text-image attention are refused with the list of those that have one.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from daamkit.capture.base import HookSet, LayerInfo
from daamkit.errors import InputError, TraceError
from daamkit.methods.base import AttributionMethod, jsonable
from daamkit.methods.concept_video import VIDEO_FAMILIES, BlockTap, VideoConceptCapture, encode_video_concepts

if TYPE_CHECKING:
    from daamkit.capture.families import Family
    from daamkit.heatmap import GlobalHeatMap
    from daamkit.trace import Trace


class _BlockTap(BlockTap):
    def __init__(self, owner: ConceptCapture, name: str, block: nn.Module, kind: str):
        super().__init__(owner, name, block)
        self.kind = kind


class ConceptCapture:
    """Runs the concept stream beside the joint-attention blocks of one transformer."""

    def __init__(
        self, transformer: nn.Module, family: str, embeds: torch.Tensor, sink: Any, hooks: HookSet | None = None
    ):
        if embeds.ndim != 2:
            raise ValueError(f"concept embeddings must be (concepts, dim), got {tuple(embeds.shape)}")
        self.transformer, self.family, self.embeds, self.sink = transformer, family, embeds, sink
        self.blocks = [
            (f"transformer_blocks.{i}", b, "joint" if family == "sd3" else "double")
            for i, b in enumerate(transformer.transformer_blocks)
        ]
        self.hooks = hooks if hooks is not None else HookSet()
        self.state: torch.Tensor | None = None  # the concept residual stream of the current call
        self.states: dict[str, torch.Tensor] = {}  # last output per block (for inspection and tests)
        self.text_len = 0

    def attach(self) -> None:
        try:
            self.hooks.add(self.transformer.register_forward_pre_hook(self._reset, with_kwargs=True))
            for name, block, kind in self.blocks:
                tap = _BlockTap(self, name, block, kind)
                attn = block.attn
                self.hooks.add(block.register_forward_pre_hook(tap.before, with_kwargs=True))
                self.hooks.add(attn.to_k.register_forward_hook(tap.save_k))
                self.hooks.add(attn.to_v.register_forward_hook(tap.save_v))
                self.hooks.add(attn.to_out[0].register_forward_pre_hook(tap.save_out))
                self.hooks.add(block.register_forward_hook(tap.after))
        except BaseException:
            self.hooks.remove()
            raise

    def detach(self) -> None:
        self.hooks.remove()

    def _reset(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.state = None
        ctx = kwargs.get("encoder_hidden_states")
        self.text_len = int(ctx.shape[1]) if isinstance(ctx, torch.Tensor) else 0

    def _step_block(self, tap: _BlockTap) -> None:
        rows = self.sink.branch_rows(tap.out.shape[0]).get("cond")
        if rows is None:
            return
        block, attn = tap.block, tap.block.attn
        temb = tap.kwargs["temb"][rows]
        b = temb.shape[0]
        if self.state is None:
            emb = self.embeds.to(device=temb.device, dtype=temb.dtype)
            self.state = self.transformer.context_embedder(emb)[None].expand(b, -1, -1).contiguous()
        c = self.state
        pre_only = bool(getattr(block, "context_pre_only", False))
        if pre_only:
            norm_c = block.norm1_context(c, temb)
        else:
            norm_c, c_gate_msa, c_shift_mlp, c_scale_mlp, c_gate_mlp = block.norm1_context(c, emb=temb)

        heads = int(attn.heads)
        qc = attn.add_q_proj(norm_c).unflatten(-1, (heads, -1))
        kc = attn.add_k_proj(norm_c).unflatten(-1, (heads, -1))
        vc = attn.add_v_proj(norm_c).unflatten(-1, (heads, -1))
        if getattr(attn, "norm_added_q", None) is not None:
            qc = attn.norm_added_q(qc)
        if getattr(attn, "norm_added_k", None) is not None:
            kc = attn.norm_added_k(kc)
        kx = tap.k[rows].unflatten(-1, (heads, -1))
        vx = tap.v[rows].unflatten(-1, (heads, -1))
        if getattr(attn, "norm_k", None) is not None:
            kx = attn.norm_k(kx)
        rope = tap.kwargs.get("image_rotary_emb")
        if rope is not None:  # Flux: the image part of the rotary table; text/concept ids are 0 (identity)
            from diffusers.models.embeddings import apply_rotary_emb

            cos, sin = rope
            n_txt = cos.shape[0] - kx.shape[1]
            kx = apply_rotary_emb(kx, (cos[n_txt:], sin[n_txt:]), sequence_dim=1)
        keys = torch.cat([kc, kx], dim=1).transpose(1, 2)
        values = torch.cat([vc, vx], dim=1).transpose(1, 2)
        scale = float(attn.scale) if self.family == "sd3" else None
        out_c = F.scaled_dot_product_attention(qc.transpose(1, 2), keys, values, scale=scale)
        out_c = out_c.transpose(1, 2).flatten(2).to(c.dtype)  # (B, K, C): the concepts' attention outputs

        out_x = tap.out[rows]  # (B, N, C): the image tokens' attention outputs of the real forward
        sim = torch.einsum("bnc,bkc->bkn", out_x.float(), out_c.float())
        self.sink.on_concepts(tap.name, sim)

        if not pre_only:
            ctx_out = attn.to_add_out(out_c)
            c = c + c_gate_msa.unsqueeze(1) * ctx_out
            norm2 = block.norm2_context(c) * (1 + c_scale_mlp[:, None]) + c_shift_mlp[:, None]
            c = c + c_gate_mlp.unsqueeze(1) * block.ff_context(norm2)
            if c.dtype == torch.float16:
                c = c.clip(-65504, 65504)
        self.state = c
        self.states[tap.name] = c


def encode_concepts(pipe: Any, family: str, concepts: list[str]) -> torch.Tensor:
    """One embedding per concept: the mean over the concept's own T5 tokens (CLIP if there is no T5),
    in the context encoder's output space (what ``context_embedder`` takes)."""
    device = getattr(pipe, "_execution_device", None) or pipe.device
    if family == "flux":
        tok = pipe.tokenizer_2
        embeds, _, _ = pipe.encode_prompt(prompt=concepts, prompt_2=concepts, device=device, max_sequence_length=32)
        offset = 0
    else:
        has_t5 = getattr(pipe, "text_encoder_3", None) is not None
        tok = pipe.tokenizer_3 if has_t5 else pipe.tokenizer
        embeds = pipe.encode_prompt(
            prompt=concepts, prompt_2=concepts, prompt_3=concepts, device=device,
            do_classifier_free_guidance=False, max_sequence_length=32,
        )[0]
        offset = 77 if has_t5 else 1
    rows = []
    for k, concept in enumerate(concepts):
        ids = tok(concept, add_special_tokens=False).input_ids
        n = max(1, min(len(ids), embeds.shape[1] - offset))
        rows.append(embeds[k, offset : offset + n].float().mean(0))
    return torch.stack(rows)


# ---- the other joint-attention families: one adapter each -----------------------------------------
class _AttentionWatch(TorchFunctionMode):
    """Keeps the first scaled-dot-product attention call made while ``armed`` (inside the block's
    attention module): its q, k, v as the model attends with them (normed, rotated) and its output,
    so that no family's image-side norms or rotary embeddings are repeated here. It is entered for the
    whole block so that it nests outside the family capture's own mode on the attention module."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.call: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float | None] | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func is F.scaled_dot_product_attention and self.armed and self.call is None:
            q = kwargs.get("query", args[0] if args else None)
            k = kwargs.get("key", args[1] if len(args) > 1 else None)
            v = kwargs.get("value", args[2] if len(args) > 2 else None)
            if all(isinstance(t, torch.Tensor) and t.dim() == 4 for t in (q, k, v, out)):
                self.call = (q.detach(), k.detach(), v.detach(), out.detach(), kwargs.get("scale"))
        return out


@dataclass(frozen=True)
class ConceptBlocks:
    """How one family's joint blocks run their text stream: the facts the concept side stream needs.

    blocks: the transformer's attribute holding the joint (text-stream) blocks; attn: the path of the
    block's attention module; text_first: the order of [text, image] in the attention call.
    embed(denoiser, embeds): the denoiser's own input layers of the text, (K, enc dim) -> (K, dim).
    qkv(block, c, kw, rows): the concepts' (B, K, heads, head dim) q, k, v as the block attends with
    its text tokens', and whatever ``post`` needs; ``kw`` holds the block's arguments by name,
    ``_text_start`` (the call's first text position) and ``_denoiser_call`` (the denoiser call's
    (args, kwargs)); ``rows`` are the conditional batch rows. post(block, c, out, extra): the text
    stream after the attention, ``out`` being the concepts' attention outputs (B, K, heads * head dim).
    kind: the block kind layer selectors use. approximation: what differs from running the concepts
    as the prompt's own tokens. image(denoiser, kw, n_image, length): the non-text tokens of the
    attention call where the attention module's ``encoder_hidden_states`` does not tell the text
    length (one sequence), or one such span per batch row. refine(denoiser, c, kw, rows): text-only
    layers the denoiser runs on its text before the joint blocks (a context refiner), applied to the
    concepts' first state.
    """

    blocks: str
    attn: str
    text_first: bool
    embed: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    qkv: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]]
    post: Callable[[nn.Module, torch.Tensor, torch.Tensor, Any], torch.Tensor]
    kind: str = "joint"
    approximation: str = ""
    image: Callable[[nn.Module, dict, int, int], slice | list[slice]] | None = None
    refine: Callable[[nn.Module, torch.Tensor, dict, slice], torch.Tensor] | None = None


def _rows(t: torch.Tensor, rows: slice) -> torch.Tensor:
    """A per-sample modulation tensor's conditional rows (one row broadcasts to every sample)."""
    return t if t.shape[0] == 1 else t[rows]


def _heads(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    return x.unflatten(-1, (-1, head_dim))


def _added_qkv(attn: nn.Module, x: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The text stream's own projections (``add_{q,k,v}_proj``) and q/k norms."""
    q, k, v = (_heads(p(x), head_dim) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
    if getattr(attn, "norm_added_q", None) is not None:
        q = attn.norm_added_q(q)
    if getattr(attn, "norm_added_k", None) is not None:
        k = attn.norm_added_k(k)
    return q, k, v


def _gated_ff(block: nn.Module, c: torch.Tensor, out: torch.Tensor, gate_msa, shift_mlp, scale_mlp, gate_mlp,
              norm: str = "norm2_context", ff: str = "ff_context") -> torch.Tensor:
    """Flux's text stream after the attention: gated residual, modulated norm, gated feed-forward."""
    c = c + gate_msa * out
    x = getattr(block, norm)(c) * (1 + scale_mlp) + shift_mlp
    c = c + gate_mlp * getattr(block, ff)(x)
    return c.clip(-65504, 65504) if c.dtype == torch.float16 else c


# chroma: Flux's double blocks; the text stream's modulation is its own slice of the block's temb
def _chroma_qkv(block: nn.Module, c: torch.Tensor, kw: dict, rows: slice):
    temb = _rows(kw["temb"], rows)[:, 6:]  # [:, :6] modulates the image
    x, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(c, emb=temb)
    mods = (gate_msa[:, None], shift_mlp[:, None], scale_mlp[:, None], gate_mlp[:, None])
    return (*_added_qkv(block.attn, x, block.attn.head_dim), mods)


def _chroma_post(block: nn.Module, c: torch.Tensor, out: torch.Tensor, mods: Any) -> torch.Tensor:
    return _gated_ff(block, c, block.attn.to_add_out(out), *mods)


# flux2: shared modulation vectors per stream, handed to every double block
def _flux2_qkv(block: nn.Module, c: torch.Tensor, kw: dict, rows: slice):
    from diffusers.models.transformers.transformer_flux2 import Flux2Modulation

    mod = _rows(kw["temb_mod_txt"], rows)
    (shift_msa, scale_msa, gate_msa), (shift_mlp, scale_mlp, gate_mlp) = Flux2Modulation.split(mod, 2)
    x = block.norm1_context(c) * (1 + scale_msa) + shift_msa
    return (*_added_qkv(block.attn, x, block.attn.head_dim), (gate_msa, shift_mlp, scale_mlp, gate_mlp))


# qwenimage: its own text modulation and MLP; text queries and keys are rotated by their positions
def _qwenimage_qkv(block: nn.Module, c: torch.Tensor, kw: dict, rows: slice):
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

    temb = kw["temb"]
    if block.zero_cond_t:  # the second half modulates an edit's reference-image tokens
        temb = torch.chunk(temb, 2, dim=0)[0]
    mod1, mod2 = block.txt_mod(_rows(temb, rows)).chunk(2, dim=-1)
    x, gate1 = block._modulate(block.txt_norm1(c), mod1)
    attn = block.attn
    q, k, v = _added_qkv(attn, x, attn.inner_dim // attn.heads)
    rope = kw.get("image_rotary_emb")
    if rope is not None:  # every concept at the first text position (see the table's note)
        first = rope[1][:1].expand(c.shape[1], -1)
        q = apply_rotary_emb_qwen(q, first, use_real=False)
        k = apply_rotary_emb_qwen(k, first, use_real=False)
    return q, k, v, (gate1, mod2)


def _qwenimage_post(block: nn.Module, c: torch.Tensor, out: torch.Tensor, extra: Any) -> torch.Tensor:
    gate1, mod2 = extra
    c = c + gate1 * block.attn.to_add_out(out)
    x, gate2 = block._modulate(block.txt_norm2(c), mod2)
    c = c + gate2 * block.txt_mlp(x)
    return c.clip(-65504, 65504) if c.dtype == torch.float16 else c


# cogview4: one set of attention and feed-forward weights for text and image, separate modulation
def _cogview4_qkv(block: nn.Module, c: torch.Tensor, kw: dict, rows: slice):
    temb = kw["temb"]
    mods = block.norm1.linear(_rows(temb, rows)).chunk(12, dim=1)
    c_shift_msa, c_scale_msa = mods[1][:, None], mods[3][:, None]
    x = block.norm1.norm_context(c).to(c.dtype) * (1 + c_scale_msa) + c_shift_msa
    attn = block.attn1
    q, k, v = (p(x).unflatten(2, (attn.heads, -1)) for p in (attn.to_q, attn.to_k, attn.to_v))
    if attn.norm_q is not None:
        q = attn.norm_q(q).to(c.dtype)
    if attn.norm_k is not None:
        k = attn.norm_k(k).to(c.dtype)
    return q, k, v, tuple(mods[i][:, None] for i in (5, 7, 9, 11))


def _cogview4_post(block: nn.Module, c: torch.Tensor, out: torch.Tensor, mods: Any) -> torch.Tensor:
    out = block.attn1.to_out[1](block.attn1.to_out[0](out))
    return _gated_ff(block, c, out, *mods, ff="ff")


# auraflow: SD3's MMDiT joint blocks with fp32 layer norms; the norm after the attention takes the sum
def _auraflow_qkv(block: nn.Module, c: torch.Tensor, kw: dict, rows: slice):
    temb = kw["temb"]
    x, gate_msa, shift_mlp, scale_mlp, gate_mlp = block.norm1_context(c, emb=_rows(temb, rows))
    attn = block.attn
    return (*_added_qkv(attn, x, attn.inner_dim // attn.heads), (gate_msa, shift_mlp, scale_mlp, gate_mlp))


def _auraflow_post(block: nn.Module, c: torch.Tensor, out: torch.Tensor, mods: Any) -> torch.Tensor:
    gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
    x = block.norm2_context(c + gate_msa.unsqueeze(1) * block.attn.to_add_out(out))
    x = x * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
    return c + gate_mlp.unsqueeze(1) * block.ff_context(x)


# zimage: one stream [image, caption] through shared weights and one modulation; the caption is first
# refined alone (context_refiner) and rotated by its positions
def _zimage_start(n_image: int) -> int:
    """Where the caption starts: after the image tokens padded to a multiple of 32."""
    return -(-n_image // 32) * 32


def _zimage_image(denoiser: nn.Module, kw: dict, n_image: int, length: int) -> slice:
    return slice(0, _zimage_start(n_image))


def _zimage_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """ZSingleStreamAttnProcessor's rotation: (B, L, heads, d) by complex (B, L, d / 2)."""
    z = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(z * freqs.unsqueeze(2)).flatten(3).type_as(x)


def _zimage_refine(denoiser: nn.Module, c: torch.Tensor, kw: dict, rows: slice) -> torch.Tensor:
    start = kw["_text_start"]
    freqs = _rows(kw["freqs_cis"], rows)[:, start : start + 1].expand(-1, c.shape[1], -1)
    for layer in denoiser.context_refiner:
        c = layer(c, None, freqs)
    return c


def _zimage_qkv(block: nn.Module, c: torch.Tensor, kw: dict, rows: slice):
    mod = block.adaLN_modulation(_rows(kw["adaln_input"], rows))
    scale_msa, gate_msa, scale_mlp, gate_mlp = mod.unsqueeze(1).chunk(4, dim=2)
    attn = block.attention
    x = block.attention_norm1(c) * (1.0 + scale_msa)
    q, k, v = (p(x).unflatten(-1, (attn.heads, -1)) for p in (attn.to_q, attn.to_k, attn.to_v))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    start = kw["_text_start"]
    freqs = _rows(kw["freqs_cis"], rows)[:, start : start + 1].expand(-1, c.shape[1], -1)
    q, k = _zimage_rope(q, freqs), _zimage_rope(k, freqs)
    return q, k, v, (gate_msa.tanh(), 1.0 + scale_mlp, gate_mlp.tanh())


def _zimage_post(block: nn.Module, c: torch.Tensor, out: torch.Tensor, extra: Any) -> torch.Tensor:
    gate_msa, scale_mlp, gate_mlp = extra
    c = c + gate_msa * block.attention_norm2(block.attention.to_out[0](out))
    return c + gate_mlp * block.ffn_norm2(block.feed_forward(block.ffn_norm1(c) * scale_mlp))


# lumina2: one stream per row [caption (its own length), image, padding] through shared weights; the
# caption is first refined alone (context_refiner)
def _lumina2_image(denoiser: nn.Module, kw: dict, n_image: int, length: int) -> list[slice]:
    args, kwargs = kw["_denoiser_call"]
    mask = kwargs.get("encoder_attention_mask", args[3] if len(args) > 3 else None)
    if not isinstance(mask, torch.Tensor):
        raise ValueError("Lumina2Transformer2DModel called without encoder_attention_mask: cannot find the image")
    return [slice(c, c + n_image) for c in mask.sum(1).tolist()]


def _lumina2_rope(kw: dict, rows: slice, k: int) -> torch.Tensor:
    """The rotation of a caption's first position (0, 0, 0): none; taken from the table all the same."""
    return _rows(kw["image_rotary_emb"], rows)[:, :1].expand(-1, k, -1)


def _lumina2_refine(denoiser: nn.Module, c: torch.Tensor, kw: dict, rows: slice) -> torch.Tensor:
    freqs = _lumina2_rope(kw, rows, c.shape[1])
    for layer in denoiser.context_refiner:
        c = layer(c, None, freqs)
    return c


def _lumina2_qkv(block: nn.Module, c: torch.Tensor, kw: dict, rows: slice):
    from diffusers.models.embeddings import apply_rotary_emb

    x, gate_msa, scale_mlp, gate_mlp = block.norm1(c, _rows(kw["temb"], rows))
    attn = block.attn
    head_dim = attn.to_q.out_features // attn.heads
    q, k, v = (_heads(p(x), head_dim) for p in (attn.to_q, attn.to_k, attn.to_v))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    freqs = _lumina2_rope(kw, rows, c.shape[1])
    q, k = (apply_rotary_emb(t, freqs, use_real=False).to(t.dtype) for t in (q, k))
    return q, k, v, (gate_msa[:, None].tanh(), 1 + scale_mlp[:, None], gate_mlp[:, None].tanh())


def _lumina2_post(block: nn.Module, c: torch.Tensor, out: torch.Tensor, extra: Any) -> torch.Tensor:
    gate_msa, scale_mlp, gate_mlp = extra
    c = c + gate_msa * block.norm2(block.attn.to_out[1](block.attn.to_out[0](out)))
    return c + gate_mlp * block.ffn_norm2(block.feed_forward(block.ffn_norm1(c) * scale_mlp))


# hidream: the double blocks' text is [T5, Llama (last layer), Llama (the block's own layer)], image
# first; the first two persist from block to block, the block's Llama layer is dropped after it
def _hidream_image(denoiser: nn.Module, kw: dict, n_image: int, length: int) -> slice:
    return slice(0, int(kw["hidden_states"].shape[1]))  # the image tokens, padded ones included (zero keys)


def _hidream_qkv(block: nn.Module, c: torch.Tensor, kw: dict, rows: slice):
    inner = block.block
    mods = inner.adaLN_modulation(_rows(kw["temb"], rows))[:, None].chunk(12, dim=-1)
    shift_msa, scale_msa = mods[6], mods[7]
    x = inner.norm1_t(c).to(c.dtype) * (1 + scale_msa) + shift_msa
    attn = inner.attn1
    q = attn.q_rms_norm_t(attn.to_q_t(x)).to(c.dtype)
    k = attn.k_rms_norm_t(attn.to_k_t(x)).to(c.dtype)
    v = attn.to_v_t(x)
    return (*(t.unflatten(-1, (attn.heads, -1)) for t in (q, k, v)), mods[8:])


def _hidream_post(block: nn.Module, c: torch.Tensor, out: torch.Tensor, mods: Any) -> torch.Tensor:
    inner = block.block
    gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
    c = c + gate_msa * inner.attn1.to_out_t(out)
    x = inner.norm3_t(c).to(c.dtype) * (1 + scale_mlp) + shift_mlp
    return c + gate_mlp * inner.ff_t(x)


#: The families whose concept stream runs through :class:`JointConceptCapture` (image families).
CONCEPT_BLOCKS: dict[str, ConceptBlocks] = {
    "chroma": ConceptBlocks(
        "transformer_blocks", "attn", True, lambda d, e: d.context_embedder(e), _chroma_qkv, _chroma_post,
        kind="double",
        approximation="none: the prompt's text positions are all 0 (no rotation), as the concepts'",
    ),
    "flux2": ConceptBlocks(
        "transformer_blocks", "attn", True, lambda d, e: d.context_embedder(e), _flux2_qkv, _chroma_post,
        kind="double",
        approximation="text tokens are rotated by their index; every concept takes index 0 (no rotation)",
    ),
    "qwenimage": ConceptBlocks(
        "transformer_blocks", "attn", True, lambda d, e: d.txt_in(d.txt_norm(e)), _qwenimage_qkv, _qwenimage_post,
        approximation="text tokens are rotated by their position; every concept takes the first text position",
    ),
    "cogview4": ConceptBlocks(
        "transformer_blocks", "attn1", True, lambda d, e: d.patch_embed.text_proj(e), _cogview4_qkv,
        _cogview4_post, approximation="none: text tokens are not rotated",
    ),
    "auraflow": ConceptBlocks(
        "joint_transformer_blocks", "attn", True, lambda d, e: d.context_embedder(e), _auraflow_qkv,
        _auraflow_post,
        approximation="the concepts do not attend to the register tokens (they attend to themselves and the image)",
    ),
    "zimage": ConceptBlocks(
        "layers", "attention", False, lambda d, e: d.cap_embedder(e), _zimage_qkv, _zimage_post, kind="single",
        image=_zimage_image, refine=_zimage_refine,
        approximation=(
            "one stream: the concepts take the caption's place with the layers' shared weights; every concept at "
            "the caption's first position, refined together (context_refiner) rather than each in its caption; "
            "they attend to the image and its pad tokens"
        ),
    ),
    "lumina2": ConceptBlocks(
        "layers", "attn", True, lambda d, e: d.time_caption_embed.caption_embedder(e), _lumina2_qkv, _lumina2_post,
        image=_lumina2_image, refine=_lumina2_refine,
        approximation=(
            "one stream: the concepts take the caption's place with the layers' shared weights, at the caption's "
            "first position (no rotation), refined together (context_refiner) rather than each in its caption"
        ),
    ),
    "hidream": ConceptBlocks(
        "double_stream_blocks", "block.attn1", False, lambda d, e: d.caption_projection[-1](e), _hidream_qkv,
        _hidream_post, kind="double", image=_hidream_image,
        approximation=(
            "the concepts are T5 tokens of the text stream (their Llama rows are not used); text positions are "
            "all 0 (no rotation), as the concepts'"
        ),
    ),
}


class _JointTap:
    """One joint block: its arguments by name, and its attention module's attention call."""

    def __init__(self, owner: JointConceptCapture, name: str, block: nn.Module, attn: nn.Module):
        self.owner, self.name, self.block, self.attn = owner, name, block, attn
        self.params = inspect.signature(block.forward)
        self.kwargs: dict = {}
        self.text_len = 0
        self.watch: _AttentionWatch | None = None

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.kwargs = dict(self.params.bind_partial(*args, **kwargs).arguments)
        self.text_len = 0
        self.watch = _AttentionWatch()
        self.watch.__enter__()

    def attn_before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ctx = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        self.text_len = int(ctx.shape[1]) if isinstance(ctx, torch.Tensor) else 0
        if self.watch is not None:
            self.watch.armed = True

    def attn_after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self.watch is not None:
            self.watch.armed = False

    def after(self, module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        watch, self.watch = self.watch, None
        try:
            if watch is not None:
                watch.__exit__(None, None, None)
            if output is not None and watch is not None and watch.call is not None:
                with torch.no_grad():
                    self.owner._step_block(self, *watch.call)
        finally:
            self.kwargs = {}


class JointConceptCapture:
    """Runs the concept stream beside the joint blocks of a family in :data:`CONCEPT_BLOCKS`.

    The image side is read where the model attends: the keys, values and outputs of each block's
    attention call (so the image's own norms, rotary embeddings and reference-image tokens are the
    model's); the concept side is the family's text-stream maths (``ConceptBlocks.qkv``/``post``)
    on the concept tokens, which attend to [concepts ; every non-text token of the call]."""

    def __init__(self, transformer: nn.Module, family: str, embeds: torch.Tensor, sink: Any, hooks: HookSet):
        if embeds.ndim != 2:
            raise ValueError(f"concept embeddings must be (concepts, dim), got {tuple(embeds.shape)}")
        self.transformer, self.family, self.embeds, self.sink, self.hooks = transformer, family, embeds, sink, hooks
        self.spec = CONCEPT_BLOCKS[family]
        self.blocks = [
            (f"{self.spec.blocks}.{i}", b) for i, b in enumerate(getattr(transformer, self.spec.blocks))
        ]
        self.state: torch.Tensor | None = None  # the concept residual stream of the current call
        self.states: dict[str, torch.Tensor] = {}  # last output per block (for inspection and tests)
        self.inputs: dict[str, torch.Tensor] = {}  # last input per block (for tests)
        self.call: tuple[tuple, dict] = ((), {})  # the denoiser call's arguments

    def attach(self) -> None:
        try:
            self.hooks.add(self.transformer.register_forward_pre_hook(self._reset, with_kwargs=True))
            for name, block in self.blocks:
                attn = block.get_submodule(self.spec.attn)
                tap = _JointTap(self, name, block, attn)
                self.hooks.add(block.register_forward_pre_hook(tap.before, with_kwargs=True))
                self.hooks.add(attn.register_forward_pre_hook(tap.attn_before, with_kwargs=True))
                self.hooks.add(attn.register_forward_hook(tap.attn_after, with_kwargs=True, always_call=True))
                self.hooks.add(block.register_forward_hook(tap.after, with_kwargs=True, always_call=True))
        except BaseException:
            self.hooks.remove()
            raise

    def detach(self) -> None:
        self.hooks.remove()

    def _reset(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.state = None
        self.call = (args, kwargs)

    def _step_block(self, tap: _JointTap, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                    scale: float | None) -> None:
        batch, length = int(q.shape[0]), int(q.shape[2])
        rows = self.sink.branch_rows(batch).get("cond")
        if rows is None:
            return
        h, w = self.sink.latent_hw()
        n = h * w
        kw = dict(tap.kwargs, _denoiser_call=self.call)
        if self.spec.image is not None:
            image = self.spec.image(self.transformer, kw, n, length)
        elif tap.text_len:
            t = tap.text_len
            image = slice(t, length) if self.spec.text_first else slice(0, length - t)
        else:
            return
        # where the call's text starts: single-stream families rotate concepts as its first token
        kw["_text_start"] = image.stop if isinstance(image, slice) and image.start == 0 else 0
        if isinstance(image, slice):
            kx, vx, out_x = (x[rows][:, :, image] for x in (k, v, out))
        else:  # one span per batch row (rows packed with their own text length)
            kx, vx, out_x = (torch.stack([x[r, :, image[r]] for r in range(batch)])[rows] for x in (k, v, out))
        out_x = out_x[:, :, :n]  # the generated image's outputs (reference images follow)
        if self.state is None:
            b = int(out_x.shape[0])
            emb = self.embeds.to(device=q.device, dtype=q.dtype)
            self.state = self.spec.embed(self.transformer, emb)[None].expand(b, -1, -1).contiguous()
            if self.spec.refine is not None:
                self.state = self.spec.refine(self.transformer, self.state, kw, rows)
        c = self.state
        self.inputs[tap.name] = c
        qc, kc, vc, extra = self.spec.qkv(tap.block, c, kw, rows)
        qc, kc, vc = (x.transpose(1, 2) for x in (qc, kc, vc))
        heads = int(qc.shape[1])  # grouped-query attention: fewer key/value heads, each serving a group
        kc, vc, kx, vx = (x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)
                          for x in (kc, vc, kx, vx))
        out_c = F.scaled_dot_product_attention(
            qc, torch.cat([kc, kx.to(kc.dtype)], dim=2), torch.cat([vc, vx.to(vc.dtype)], dim=2), scale=scale
        )
        sim = torch.einsum("bhnd,bhkd->bkn", out_x.float(), out_c.float())
        self.sink.on_concepts(tap.name, sim, self.spec.kind, self.spec.attn)
        self.state = self.spec.post(tap.block, c, out_c.transpose(1, 2).flatten(2).to(c.dtype), extra)
        self.states[tap.name] = self.state


def encode_in_context(pipe: Any, family: Family, concepts: list[str]) -> torch.Tensor:
    """One embedding per concept for the families of :data:`CONCEPT_BLOCKS`: each concept is encoded
    alone by the pipeline's own ``encode_prompt`` (its chat template or prefix included), and its
    embedding is the mean over the rows of the concept's own tokens, found in the text encoder's ids
    as daamkit finds a prompt's words (the family's :class:`~daamkit.capture.families.TextPart`)."""
    from daamkit.tokens import align, align_in_template

    part = family.text[0]
    encoder, tokenizer = getattr(pipe, part.encoder, None), getattr(pipe, part.tokenizer, None)
    if not isinstance(encoder, nn.Module) or tokenizer is None:
        raise InputError(f"{type(pipe).__name__} has no {part.encoder}/{part.tokenizer}: cannot encode concepts")
    params = inspect.signature(pipe.encode_prompt).parameters
    kwargs: dict[str, Any] = {"device": getattr(pipe, "_execution_device", None) or pipe.device}
    for name, value in (("do_classifier_free_guidance", False), ("num_images_per_prompt", 1)):
        if name in params:
            kwargs[name] = value
    kwargs = {k: v for k, v in kwargs.items() if k in params}
    rows = []
    for concept in concepts:
        seen: list[torch.Tensor] = []

        def grab(module: nn.Module, args: tuple, kw: dict, seen: list = seen) -> None:
            ids = args[0] if args else kw.get("input_ids")
            if isinstance(ids, torch.Tensor) and not seen:
                seen.append(ids.detach().cpu())

        handle = encoder.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                out = pipe.encode_prompt(prompt=concept, **kwargs)
        finally:
            handle.remove()
        embeds = out[0] if isinstance(out, tuple) else out
        if isinstance(embeds, list) and embeds and isinstance(embeds[0], torch.Tensor):
            embeds = embeds[0][None]  # Z-Image: one (valid tokens, dim) tensor per prompt
        if not seen or not isinstance(embeds, torch.Tensor) or embeds.dim() != 3:
            raise InputError(f"{type(pipe).__name__}.encode_prompt did not run {part.encoder}: cannot encode concepts")
        ids, n_keys = seen[0][0].tolist(), int(embeds.shape[1])
        drop = part.drop
        if isinstance(drop, str):
            drop = int(getattr(pipe, drop, 0) or 0)
        elif callable(drop):
            drop = int(drop(ids, n_keys))
        if part.after is not None:
            alignment = align_in_template(tokenizer, ids, part.after, concept, drop=drop, length=n_keys)
        else:
            keys = part.select(ids, n_keys) if part.select is not None else ids[drop:]
            alignment = align(tokenizer, keys[:n_keys], concept)
        positions = sorted({p for w in alignment.words for p in w.positions if not w.is_punctuation})
        if not positions:
            raise InputError(f"concept {concept!r}: none of its tokens reach the denoiser's text keys")
        rows.append(embeds[0, positions].float().mean(0))
    return torch.stack(rows)


class ConceptMethod(AttributionMethod):
    """ConceptAttention maps of words given to ``trace(concepts=[...])``, which need not be in the
    prompt. Captures its own side stream (:class:`ConceptCapture`) beside the joint blocks."""

    name = "concept"
    families = ("sd3", "flux", *CONCEPT_BLOCKS, *VIDEO_FAMILIES)
    requirement = "concept maps need a joint-attention transformer (" + ", ".join(families) + ")"
    not_enabled = "no concepts were traced: pass concepts=[...] to trace() for method='concept'"

    def __init__(self, concepts: Sequence[str], embeds: torch.Tensor | None = None, softmax: bool = True):
        super().__init__()
        self.concepts = [str(c).strip() for c in concepts]
        if embeds is not None and len(self.concepts) != embeds.shape[0]:
            raise ValueError(f"concept_embeds has {embeds.shape[0]} rows but {len(self.concepts)} concepts were named")
        if not self.concepts or any(not c for c in self.concepts) or len(set(self.concepts)) != len(self.concepts):
            raise ValueError(f"concepts must be distinct, non-empty words, got {list(concepts)}")
        self.embeds = embeds
        self.softmax = softmax
        self.capture: ConceptCapture | JointConceptCapture | VideoConceptCapture | None = None
        self._trace: Trace | None = None
        self.sum: torch.Tensor | None = None  # (B, K, h, w) sum over blocks and steps of concept maps
        self.calls = 0

    @classmethod
    def from_options(
        cls, concepts: Sequence[str] | None, embeds: torch.Tensor | None, softmax: bool
    ) -> ConceptMethod | None:
        """The method for ``trace()``'s concept options, or None when no concepts were named."""
        if not concepts:
            if embeds is not None and embeds.shape[0] != 0:
                raise ValueError(f"concept_embeds has {embeds.shape[0]} rows but 0 concepts were named")
            return None
        return cls(concepts, embeds, softmax)

    @classmethod
    def for_images(cls, words: Sequence[Sequence[str]]) -> ConceptMethod:
        """Concepts are one set per pipeline call: the images' words, each once, in order of first
        appearance (every image's maps compete over all of them)."""
        return cls(list(dict.fromkeys(w for ws in words for w in ws)))

    def attach(self, trace: Trace) -> None:
        self._trace = trace
        family = trace.capture.family
        embeds = self.embeds
        if embeds is None:  # the trace attaches methods before its text-encoder hooks: its prompt capture stays clean
            if family in CONCEPT_BLOCKS:
                embeds = encode_in_context(trace.pipe, trace.capture.spec, self.concepts)
            elif family in VIDEO_FAMILIES:
                embeds = encode_video_concepts(trace.pipe, family, self.concepts)
            else:
                embeds = encode_concepts(trace.pipe, family, self.concepts)
        # the side stream's handles go into this method's HookSet, which the trace empties on exit
        # whatever detach() does
        if family in VIDEO_FAMILIES:
            self.capture = VideoConceptCapture(trace.capture.denoiser, family, embeds, self, self.hooks,
                                               budget=trace.config.chunk_mib * 2**20)
        elif family in CONCEPT_BLOCKS:
            self.capture = JointConceptCapture(trace.capture.denoiser, family, embeds, self, self.hooks)
        else:
            self.capture = ConceptCapture(trace.capture.denoiser, family, embeds, self, self.hooks)
        self.capture.attach()

    def start_generation(self, trace: Trace) -> None:
        self.sum = None
        self.calls = 0

    # ---- sink of the side stream -------------------------------------------------------------
    def branch_rows(self, batch: int) -> dict[str, slice]:
        assert self._trace is not None
        return self._trace.branch_rows(batch)

    def latent_hw(self) -> tuple[int, int]:
        """The token grid of the denoiser call that runs."""
        assert self._trace is not None
        return self._trace.generation.call.latent_hw

    def video_tokens(self) -> int:
        """Video tokens of the current denoiser call (frames x h x w)."""
        assert self._trace is not None
        call = self._trace.generation.call
        return call.frames * call.latent_hw[0] * call.latent_hw[1]

    def on_concepts(self, block: str, sim: torch.Tensor, kind: str | None = None, attn: str = "attn") -> None:
        """sim: (B, K, N) dot products of image attention outputs with concept attention outputs; a
        video's N is frame-major. kind: the block kind layer selectors use (the video stream's, or
        SD3's "joint" / Flux's "double" when not given); attn: the block's attention module, which
        names the layer."""
        trace = self._trace
        assert trace is not None
        if isinstance(self.capture, VideoConceptCapture):
            stream = self.capture.stream
            kind, attn = stream.block_kind, stream.attn
        elif kind is None:
            kind = "joint" if trace.capture.family == "sd3" else "double"
        layer = LayerInfo(name=f"{block}.{attn}", block=kind, index=-1, heads=0)
        if not trace.config.selects_layer(layer, 1):
            return
        call = trace.generation.call
        h, w = call.latent_hw
        frames = () if call.frames == 1 else (call.frames,)  # (B, K, F, h, w) for a video, as DAAM's sums
        maps = sim.reshape(sim.shape[0], sim.shape[1], *frames, h, w)
        self.sum = maps.clone() if self.sum is None else self.sum.add_(maps)
        self.calls += 1

    # ---- results -----------------------------------------------------------------------------
    def heat_maps(self, trace: Trace, i: int, **options: Any) -> GlobalHeatMap:
        """``options`` (prompt, branch, steps, layers, heads) do not apply: the concept sums are taken
        over every selected block and step of the conditional branch while the pipeline runs."""
        from daamkit.heatmap import GlobalHeatMap
        from daamkit.tokens import TokenAlignment, Word, split_words

        gen = trace.generation
        if self.sum is None:
            raise TraceError("no concept maps were recorded (no selected joint block ran inside the trace)")
        if not 0 <= i < gen.num_images:
            raise IndexError(f"image index {i} out of range: the traced call made {gen.num_images} image(s)")
        maps = self.sum[i] / self.calls
        if self.softmax:
            maps = maps.softmax(dim=0)
        words: list[Word] = []
        seen: dict[str, int] = {}
        for k, concept in enumerate(self.concepts):
            for part in split_words(concept):
                words.append(Word(part, len(words), seen.get(part, 0), (k,), False, False))
                seen[part] = seen.get(part, 0) + 1
        alignment = TokenAlignment(tuple(self.concepts), tuple(words), len(self.concepts), " ".join(self.concepts))
        h, w = gen.call.latent_hw
        scale = trace.capture.cell_pixels(trace.pipe)
        meta = {"family": trace.capture.family, "method": "concept", "concepts": list(self.concepts),
                "softmax": self.softmax, "image_index": i, "num_steps": gen.step + 1,
                "config": jsonable(asdict(trace.config))}
        time = trace.capture.time_axis(trace.pipe, gen.call.frames)
        if time is not None and gen.decoded is not None:
            time = time.decoded(*gen.decoded)
        if time is not None:
            meta["time"] = time.to_json()
        return GlobalHeatMap(maps.float().cpu(), alignment, image_size=(h * scale, w * scale), meta=meta)
