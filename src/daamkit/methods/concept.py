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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from daamkit.capture.base import HookSet, LayerInfo
from daamkit.errors import TraceError
from daamkit.methods.base import AttributionMethod, jsonable
from daamkit.methods.concept_video import VIDEO_FAMILIES, VideoConceptCapture, encode_video_concepts

if TYPE_CHECKING:
    from daamkit.heatmap import GlobalHeatMap
    from daamkit.trace import Trace


class _BlockTap:
    def __init__(self, owner: ConceptCapture, name: str, block: nn.Module, kind: str):
        self.owner, self.name, self.block, self.kind = owner, name, block, kind
        self.kwargs: dict = {}
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.out: torch.Tensor | None = None

    def before(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self.kwargs = kwargs
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
            self.kwargs = {}
            self.k = self.v = self.out = None


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


class ConceptMethod(AttributionMethod):
    """ConceptAttention maps of words given to ``trace(concepts=[...])``, which need not be in the
    prompt. Captures its own side stream (:class:`ConceptCapture`) beside the joint blocks."""

    name = "concept"
    families = ("sd3", "flux", *VIDEO_FAMILIES)
    requirement = (
        "concept maps need a joint-attention transformer: the families sd3 and flux, and the video families "
        + ", ".join(VIDEO_FAMILIES)
    )
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
        self.capture: ConceptCapture | VideoConceptCapture | None = None
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
            encode = encode_video_concepts if family in VIDEO_FAMILIES else encode_concepts
            embeds = encode(trace.pipe, family, self.concepts)
        # the side stream's handles go into this method's HookSet, which the trace empties on exit
        # whatever detach() does
        if family in VIDEO_FAMILIES:
            self.capture = VideoConceptCapture(trace.capture.denoiser, family, embeds, self, self.hooks,
                                               budget=trace.config.chunk_mib * 2**20)
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

    def video_tokens(self) -> int:
        """Video tokens of the current denoiser call (frames x h x w)."""
        assert self._trace is not None
        call = self._trace.generation.call
        return call.frames * call.latent_hw[0] * call.latent_hw[1]

    def on_concepts(self, block: str, sim: torch.Tensor) -> None:
        """sim: (B, K, N) dot products of image attention outputs with concept attention outputs; a
        video's N is frame-major."""
        trace = self._trace
        assert trace is not None
        family = trace.capture.family
        if isinstance(self.capture, VideoConceptCapture):
            stream = self.capture.stream
            layer = LayerInfo(name=f"{block}.{stream.attn}", block=stream.block_kind, index=-1, heads=0)
        else:
            layer = LayerInfo(name=f"{block}.attn", block="joint" if family == "sd3" else "double", index=-1, heads=0)
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
