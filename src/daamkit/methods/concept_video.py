"""ConceptAttention on the joint-attention VIDEO transformers: CogVideoX, Mochi, HunyuanVideo and
HunyuanVideo 1.5 (the side stream of :mod:`daamkit.methods.concept`, one small adapter per family).

As for SD3/Flux, the concepts run as an extra text-like stream through each joint block with the
block's own text-stream weights; they attend to the video tokens' keys and to each other, nothing
attends to them (the stream is computed on the side, after the block ran), so the video is
unchanged. A block's map is the dot product of each video token's attention output (the input of
``attn.to_out[0]``, frame-major) with each concept's attention output. The facts that differ per
family (where the video tokens sit in the attention's sequence, how the text enters the blocks, the
modulation and norms of the text stream) are the :class:`VideoStream` adapters below; the adapters
are checked against the model's own text stream in the tests (prompt tokens fed as concepts must
reproduce it). Approximations, per family:

- ``cogvideox``: none. The text and the video share every weight (one sequence [text; video]); the
  text stream has its own AdaLN modulation (``norm1``/``norm2``'s ``enc_*`` outputs) and no
  positional embedding (the sin-cos table is zero on text positions, RoPE is on video only).
- ``mochi``: none. Asymmetric dual stream (``add_*_proj``, ``norm_added_*``, ``to_add_out``,
  ``ff_context``, tanh-gated RMS norms); the last block is ``context_pre_only`` (it reads the text but
  gives none back): its map is made, the stream ends there.
- ``hunyuanvideo``: the concept tokens go through the token refiner (``context_embedder``) as one
  sequence of their own, so the refiner's pooled conditioning is the concepts' mean rather than the
  prompt's. Maps come from the dual-stream blocks only: the single-stream blocks come after all of
  them (as for Flux), and ``TokenReplace`` (image-to-video) blocks differ only in the video stream's
  modulation.
- ``hunyuanvideo15``: as HunyuanVideo's refiner, plus the model's condition-type embedding of Qwen
  tokens; the concepts attend to the video and to themselves, not to the image (I2V) or ByT5 glyph
  tokens the prompt's own text attends to.

LTX-2 is not served: its video stream reads the text by cross-attention, with a text context that no
block updates, so there is no joint text stream to run concepts through.

Large calls stay within the trace's ``chunk_mib``: the concepts' attention runs a few heads at a time
(the normalised, rotated video keys of those heads only) and the maps a few video tokens at a time.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from daamkit.capture.base import HookSet

VIDEO_FAMILIES = ("cogvideox", "mochi", "hunyuanvideo", "hunyuanvideo15")


def _input(args: tuple, kwargs: dict, name: str, position: int) -> Any:
    return kwargs[name] if name in kwargs else args[position] if len(args) > position else None


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    return x.unflatten(-1, (heads, -1))  # (B, S, C) -> (B, S, H, D)


class VideoStream:
    """The text stream of one family's joint blocks, run on concept tokens. Tensors are (B, S, C), or
    (B, S, H, D) per head; ``mods`` is whatever ``pre`` hands to ``post`` (gates, scales)."""

    name = ""
    block_kind = "joint"  # LayerInfo.block of the maps' layers (layer selectors)
    attn = "attn"  # the block's joint attention module
    rope = ("image_rotary_emb", 4)  # the block input holding the video's rotary table (name, position)
    timestep_position = 1  # of the denoiser's forward (only the streams whose ``begin`` needs it read it)

    def blocks(self, transformer: nn.Module) -> list[tuple[str, nn.Module]]:
        return [(f"transformer_blocks.{i}", b) for i, b in enumerate(transformer.transformer_blocks)]

    def video(self, tokens: int, text_len: int) -> slice:
        """Where the video tokens lie in the attention's to_k / to_v / to_out[0] sequences."""
        return slice(0, tokens)

    def begin(self, transformer: nn.Module, embeds: torch.Tensor, timestep: Any) -> torch.Tensor:
        """(B, K, C): the concepts' stream entering the first block, from (B, K, text dim) embeddings."""
        raise NotImplementedError

    def pre(self, block: nn.Module, c: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, Any]:
        raise NotImplementedError

    def qkv(self, attn: nn.Module, norm_c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        heads = int(attn.heads)
        q, k, v = (_heads(p(norm_c), heads) for p in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if getattr(attn, "norm_added_q", None) is not None:
            q = attn.norm_added_q(q)
        if getattr(attn, "norm_added_k", None) is not None:
            k = attn.norm_added_k(k)
        return q, k, v

    def video_keys(self, attn: nn.Module, k: torch.Tensor, heads: slice, rope: Any) -> torch.Tensor:
        """k: (B, N, h, D) raw video keys of ``heads``; returns them as the attention used them."""
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if rope is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            k = apply_rotary_emb(k, rope, sequence_dim=1)
        return k

    def post(self, block: nn.Module, attn: nn.Module, c: torch.Tensor, out_c: torch.Tensor, mods: Any) -> torch.Tensor | None:
        """The stream after the block (None: the block gives no text back, the stream ends)."""
        raise NotImplementedError


class CogVideoXStream(VideoStream):
    name = "cogvideox"
    attn = "attn1"
    rope = ("image_rotary_emb", 3)

    def video(self, tokens: int, text_len: int) -> slice:
        return slice(text_len, text_len + tokens)  # one sequence [text; video]

    def begin(self, transformer: nn.Module, embeds: torch.Tensor, timestep: Any) -> torch.Tensor:
        # the joint sin-cos table (2b) is zero on text positions: text_proj is all the text gets
        return transformer.patch_embed.text_proj(embeds)

    def pre(self, block: nn.Module, c: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, Any]:
        _, norm_c, _, gate = block.norm1(c, c, temb)  # the enc_* modulation; the first output is unused
        return norm_c, (gate, temb)

    def qkv(self, attn: nn.Module, norm_c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        heads = int(attn.heads)
        q, k, v = (_heads(p(norm_c), heads) for p in (attn.to_q, attn.to_k, attn.to_v))  # shared weights
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        return q, k, v

    def video_keys(self, attn: nn.Module, k: torch.Tensor, heads: slice, rope: Any) -> torch.Tensor:
        if attn.norm_k is not None:
            k = attn.norm_k(k)  # LayerNorm over the head dim: the layout does not matter
        if rope is not None and not attn.is_cross_attention:
            from diffusers.models.embeddings import apply_rotary_emb

            k = apply_rotary_emb(k, rope, sequence_dim=1)
        return k

    def post(self, block: nn.Module, attn: nn.Module, c: torch.Tensor, out_c: torch.Tensor, mods: Any) -> torch.Tensor:
        gate, temb = mods
        c = c + gate * attn.to_out[1](attn.to_out[0](out_c))
        _, norm_c, _, gate_ff = block.norm2(c, c, temb)
        return c + gate_ff * block.ff(norm_c)


class MochiStream(VideoStream):
    name = "mochi"
    attn = "attn1"

    def begin(self, transformer: nn.Module, embeds: torch.Tensor, timestep: Any) -> torch.Tensor:
        return transformer.time_embed.caption_proj(embeds)

    def pre(self, block: nn.Module, c: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, Any]:
        if block.context_pre_only:
            return block.norm1_context(c, temb), None
        norm_c, gate_msa, scale_mlp, gate_mlp = block.norm1_context(c, temb)
        return norm_c, (gate_msa, scale_mlp, gate_mlp)

    def video_keys(self, attn: nn.Module, k: torch.Tensor, heads: slice, rope: Any) -> torch.Tensor:
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        if rope is not None:  # Mochi's own rotation: interleaved pairs, a table per head
            cos, sin = (r[:, heads] for r in rope)
            even, odd = k[..., 0::2].float(), k[..., 1::2].float()
            k = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2).to(k.dtype)
        return k

    def post(self, block: nn.Module, attn: nn.Module, c: torch.Tensor, out_c: torch.Tensor, mods: Any) -> torch.Tensor | None:
        if mods is None:
            return None
        gate_msa, scale_mlp, gate_mlp = mods
        c = c + block.norm2_context(attn.to_add_out(out_c), torch.tanh(gate_msa).unsqueeze(1))
        norm_c = block.norm3_context(c, (1 + scale_mlp.unsqueeze(1).to(torch.float32)))
        return c + block.norm4_context(block.ff_context(norm_c), torch.tanh(gate_mlp).unsqueeze(1))


class HunyuanVideoStream(VideoStream):
    name = "hunyuanvideo"
    block_kind = "double"
    rope = ("freqs_cis", 4)

    def begin(self, transformer: nn.Module, embeds: torch.Tensor, timestep: Any) -> torch.Tensor:
        # the concepts are one sequence of the token refiner, unmasked: its pooled input is their mean
        return transformer.context_embedder(embeds, timestep, None)

    def pre(self, block: nn.Module, c: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, Any]:
        norm_c, *mods = block.norm1_context(c, emb=temb)
        return norm_c, mods

    def post(self, block: nn.Module, attn: nn.Module, c: torch.Tensor, out_c: torch.Tensor, mods: Any) -> torch.Tensor:
        gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        c = c + attn.to_add_out(out_c) * gate_msa.unsqueeze(1)
        norm_c = block.norm2_context(c) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return c + gate_mlp.unsqueeze(1) * block.ff_context(norm_c)


class HunyuanVideo15Stream(HunyuanVideoStream):
    name = "hunyuanvideo15"

    def begin(self, transformer: nn.Module, embeds: torch.Tensor, timestep: Any) -> torch.Tensor:
        c = transformer.context_embedder(embeds, timestep, None)
        # condition type 0 marks the Qwen text (1: ByT5 glyphs, 2: the image)
        return c + transformer.cond_type_embed(torch.zeros_like(c[:, :, 0], dtype=torch.long))


STREAMS: dict[str, type[VideoStream]] = {
    s.name: s for s in (CogVideoXStream, MochiStream, HunyuanVideoStream, HunyuanVideo15Stream)
}


class BlockTap:
    """The hooks of one block's attention: its k and v projections and the input of its output
    projection, read once per block forward; ``owner._step_block(tap)`` runs the concept side after it.
    Shared by the image and video concept captures."""

    def __init__(self, owner: Any, name: str, block: nn.Module, attn: nn.Module | None = None):
        self.owner, self.name, self.block, self.attn = owner, name, block, attn
        self.args: tuple = ()
        self.kwargs: dict = {}
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.out: torch.Tensor | None = None

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.args, self.kwargs = args, kwargs
        self.k = self.v = self.out = None

    def save_k(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if self.k is None:
            self.k = out.detach()

    def save_v(self, module: nn.Module, args: tuple, out: torch.Tensor) -> None:
        if self.v is None:
            self.v = out.detach()

    def save_out(self, module: nn.Module, args: tuple) -> None:
        if self.out is None:
            self.out = args[0].detach()

    def after(self, module: nn.Module, args: tuple, output: Any) -> None:
        try:
            if self.k is not None and self.v is not None and self.out is not None:
                with torch.no_grad():
                    self.owner._step_block(self)
        finally:
            self.args, self.kwargs = (), {}
            self.k = self.v = self.out = None


class VideoConceptCapture:
    """Runs the concept stream beside the joint blocks of one video transformer.

    sink: ``branch_rows(batch)``, ``video_tokens()`` (the current call's frames x h x w) and
    ``on_concepts(block, sim)``; budget: bytes one chunk of the side computation may take."""

    def __init__(self, transformer: nn.Module, family: str, embeds: torch.Tensor, sink: Any,
                 hooks: HookSet | None = None, budget: float = 32 * 2**20):
        if embeds.ndim != 2:
            raise ValueError(f"concept embeddings must be (concepts, dim), got {tuple(embeds.shape)}")
        self.transformer, self.family, self.embeds, self.sink = transformer, family, embeds, sink
        self.stream = STREAMS[family]()
        self.budget = float(budget)
        self.hooks = hooks if hooks is not None else HookSet()
        self.state: torch.Tensor | None = None  # the concept residual stream of the current call
        self.states: dict[str, torch.Tensor] = {}  # last output per block (for inspection and tests)
        self.outputs: dict[str, torch.Tensor] = {}  # last attention output per block (B, K, C), likewise
        self.timestep: Any = None
        self.ended = False

    def attach(self) -> None:
        try:
            self.hooks.add(self.transformer.register_forward_pre_hook(self._reset, with_kwargs=True))
            for name, block in self.stream.blocks(self.transformer):
                attn = getattr(block, self.stream.attn)
                tap = BlockTap(self, name, block, attn)
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
        self.ended = False
        self.timestep = _input(args, kwargs, "timestep", self.stream.timestep_position)

    def _step_block(self, tap: BlockTap) -> None:
        if self.ended:
            return
        rows = self.sink.branch_rows(tap.out.shape[0]).get("cond")
        if rows is None:
            return
        stream, block, attn = self.stream, tap.block, tap.attn
        temb = _input(tap.args, tap.kwargs, "temb", 2)[rows]
        b = temb.shape[0]
        if self.state is None:
            emb = self.embeds.to(device=temb.device, dtype=temb.dtype)[None].expand(b, -1, -1)
            t = self.timestep
            if isinstance(t, torch.Tensor) and t.ndim and t.shape[0] == tap.out.shape[0]:
                t = t[rows]
            self.state = stream.begin(self.transformer, emb, t)
        c = self.state
        norm_c, mods = stream.pre(block, c, temb)
        qc, kc, vc = stream.qkv(attn, norm_c)

        n = self.sink.video_tokens()
        ctx = _input(tap.args, tap.kwargs, "encoder_hidden_states", 1)
        span = stream.video(n, int(ctx.shape[1]))
        heads = int(attn.heads)
        kx = _heads(tap.k[rows, span], heads)
        vx = _heads(tap.v[rows, span], heads)
        rope = _input(tap.args, tap.kwargs, *stream.rope)
        out_c = self._attend(attn, qc, kc, vc, kx, vx, rope).to(c.dtype)  # (B, K, C)

        out_x = tap.out[rows, span]  # (B, N, C): the video tokens' attention outputs of the real forward
        self.sink.on_concepts(tap.name, self._similarity(out_x, out_c))
        self.outputs[tap.name] = out_c

        c = stream.post(block, attn, c, out_c, mods)
        if c is None:
            self.ended = True
            return
        if c.dtype == torch.float16:
            c = c.clip(-65504, 65504)
        self.state = c
        self.states[tap.name] = c

    def _attend(self, attn: nn.Module, qc: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor,
                kx: torch.Tensor, vx: torch.Tensor, rope: Any) -> torch.Tensor:
        """The concepts' attention over [concepts; video], a few heads at a time."""
        b, k_n, heads, d = qc.shape
        n = kx.shape[1]
        per_head = b * (k_n + n) * (4 * k_n + 3 * d * kx.element_size())  # probabilities + keys, values
        step = max(1, min(heads, int(self.budget // max(per_head, 1))))
        outs = []
        for h0 in range(0, heads, step):
            hs = slice(h0, min(heads, h0 + step))
            keys = torch.cat([kc[:, :, hs], self.stream.video_keys(attn, kx[:, :, hs], hs, rope)], dim=1)
            values = torch.cat([vc[:, :, hs], vx[:, :, hs]], dim=1)
            o = F.scaled_dot_product_attention(qc[:, :, hs].transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2))
            outs.append(o.transpose(1, 2))
        return torch.cat(outs, dim=2).flatten(2)

    def _similarity(self, out_x: torch.Tensor, out_c: torch.Tensor) -> torch.Tensor:
        """(B, K, N) dot products, a few video tokens at a time (float32 copies of those only)."""
        b, n, ch = out_x.shape
        step = max(1, min(n, int(self.budget // max(b * ch * 4, 1))))
        oc = out_c.float()
        return torch.cat([torch.einsum("bnc,bkc->bkn", out_x[:, i : i + step].float(), oc) for i in range(0, n, step)], dim=2)


def encode_video_concepts(pipe: Any, family: str, concepts: list[str]) -> torch.Tensor:
    """One embedding per concept: the mean over the concept's own tokens in the text encoder's output
    as the denoiser gets it (the family's template and crop applied), one concept per prompt row."""
    from daamkit.capture.families import family_of
    from daamkit.tokens import align, align_in_template

    device = getattr(pipe, "_execution_device", None) or pipe.device
    seen: list[torch.Tensor] = []

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = args[0] if args else kwargs.get("input_ids")
        if isinstance(ids, torch.Tensor) and not seen:
            seen.append(ids.detach().cpu())

    handle = pipe.text_encoder.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        if family in ("cogvideox", "mochi"):
            embeds = pipe.encode_prompt(prompt=concepts, do_classifier_free_guidance=False, device=device)[0]
        elif family == "hunyuanvideo":
            embeds = pipe.encode_prompt(prompt=concepts, prompt_2=concepts, device=device)[0]
        else:
            embeds = pipe.encode_prompt(prompt=concepts, device=device, batch_size=len(concepts))[0]
    finally:
        handle.remove()
    found = family_of(pipe)
    if not seen or found is None:
        raise ValueError(f"the {family} pipeline's text encoder did not run on the concepts: cannot place their tokens")
    part = found[0].text[0]
    tokenizer = getattr(pipe, part.tokenizer)
    length = int(embeds.shape[1])
    rows = []
    for k, concept in enumerate(concepts):
        ids = seen[0][k].tolist()
        if isinstance(part.drop, str):
            drop = int(getattr(pipe, part.drop, 0) or 0)
        elif callable(part.drop):
            drop = int(part.drop(ids, length))
        else:
            drop = int(part.drop)
        if part.after is not None:
            alignment = align_in_template(tokenizer, ids, part.after, concept, drop=drop, length=length)
        else:
            alignment = align(tokenizer, ids[drop:], concept)
        positions = sorted({p for w in alignment.words for p in w.positions if p < length})
        if not positions:
            raise ValueError(f"concept {concept!r} has no tokens in the {family} text encoder's output")
        rows.append(embeds[k, positions].float().mean(0))
    return torch.stack(rows)
