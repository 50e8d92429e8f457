"""The table of model families: one declarative :class:`Family` entry per denoiser kind.

Adding a family is adding an entry here (plus its tiny offline pipeline and tests): which modules of
the denoiser are text-image attention (:class:`Site`), where the text keys and the generated image's
queries lie in their attention call, which text encoders' tokens the keys are (:class:`TextPart`), and
how the image tokens sit on the latent grid. ``daamkit families`` and the README table are generated
from this table and :data:`NOT_SUPPORTED`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from daamkit.capture.sdpa import Slices
from daamkit.frames import TimeAxis


@dataclass(frozen=True)
class Site:
    """One kind of text-image attention module in a denoiser.

    pattern: regular expression the module's path must match in full, e.g. ``r"transformer_blocks\\.\\d+\\.attn"``.
    block: the block kind layer selectors use ("joint", "double", "single", "cross", ...).
    layout: the sequence at the module's attention call: ``"cross"`` (queries are image tokens, keys
        are text), ``"text_image"`` (queries and keys are [text, image, extra...]) or ``"image_text"``
        ([image, extra..., text]). The generated image's tokens are the first ``h*w`` of the image
        part; tokens after them (a reference image, say) are neither image queries nor text keys.
    text_from: where the text length is read: ``"module"`` (the module's ``encoder_hidden_states``)
        or ``"denoiser"`` (the denoiser's, for modules that get one concatenated sequence).
    needs: attributes the module must have (not None) to be text-image attention.
    locate: overrides the layout: ``locate(tap, q_len, k_len) -> Slices | None``, or a sequence of
        ``Slices``, one per batch row, when each sample is packed with its own text length.
    skip: ``skip(module) -> int``, the attention calls of the module's forward that come before the
        text-image one and are let pass (a cross-attention that first attends to image-context keys).
    per_row: the module calls attention once per batch row (batch 1), in row order, each call with
        that row's own text length; its text keys are the first tokens of the module's text.
    packed_rows: ``locate`` gives one ``Slices`` per batch row: the rows place their text and image at
        different offsets, so no one [text, image] layout holds for the call (relation maps need one).
    """

    pattern: str
    block: str
    layout: str
    text_from: str = "module"
    needs: tuple[str, ...] = ()
    locate: Callable[..., Any] | None = None
    skip: Callable[[nn.Module], int] | None = None
    per_row: bool = False  # one attention call per batch row (see AttentionTap)
    packed_rows: bool = False


@dataclass(frozen=True)
class TextPart:
    """One text encoder's tokens in the keys.

    encoder / tokenizer: pipeline attributes. length: key positions this part takes when another part
    follows it (None: the tokenizer's ``model_max_length``). drop: leading ids the pipeline cuts from
    the encoder's output before the denoiser sees it (an int, the name of a pipeline attribute, or
    ``drop(ids, n_keys) -> int`` when the count is a call argument, e.g. a template's ``crop_start``).
    after: the text that precedes the prompt in a chat template or instruction prefix; the words are
    looked for after its last occurrence in the ids, never in the template. Several texts (a tuple)
    when the pipelines of one family use different templates: the one ending last in the ids counts.
    select: instead of ``drop``, for a pipeline that picks the key positions out of the encoder's
        sequence: ``select(ids, n_keys)`` gives the ids of the keys, in key order, from the ids the
        encoder received (Sana keeps ``<bos>`` and the last ``n_keys - 1`` positions).
    """

    encoder: str
    tokenizer: str
    length: int | None = None
    drop: int | str | Callable[[list[int], int], int] = 0
    after: str | tuple[str, ...] | None = None
    select: Callable[[list[int], int], list[int]] | None = None


def _encoder_hidden_states_len(args: tuple, kwargs: dict) -> int | None:
    ctx = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    if isinstance(ctx, torch.Tensor) and ctx.dim() >= 3:
        return int(ctx.shape[1])
    return None


def _config_patch(denoiser: nn.Module) -> int:
    return int(getattr(denoiser.config, "patch_size", 1) or 1)


def _hidden_grid(denoiser: nn.Module, args: tuple, kwargs: dict) -> tuple[int, int]:
    """Latents given as (B, C, H, W): the grid is H, W over the patch size."""
    x = kwargs.get("hidden_states", args[0] if args else None)
    p = _config_patch(denoiser)
    return int(x.shape[-2]) // p, int(x.shape[-1]) // p


def _ids_grid(key: str) -> Callable[[nn.Module, tuple, dict], tuple[int, int]]:
    """Packed latents with position ids (Flux): the generated image's ids have first coordinate 0
    (a reference image's have another), rows and columns in coordinates 1 and 2."""

    def grid(denoiser: nn.Module, args: tuple, kwargs: dict) -> tuple[int, int]:
        ids = kwargs.get(key)
        if ids is None:
            raise ValueError(f"{type(denoiser).__name__} called without {key}: cannot place image tokens on a grid")
        if ids.ndim == 3:
            ids = ids[0]
        own = ids[ids[:, 0] == ids[0, 0]]
        rows, cols = own[:, 1], own[:, 2]
        return int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1

    return grid


# ---- flux2: the generated image among reference images -------------------------------------------
def _time_zero_grid(denoiser: nn.Module, args: tuple, kwargs: dict) -> tuple[int, int]:
    """FLUX.2's ``img_ids`` (B, N, 4) are (time, row, column, layer): the generated image's tokens have
    time 0, reference images' 10, 20, ... (the KV pipeline puts those first)."""
    ids = kwargs.get("img_ids", args[3] if len(args) > 3 else None)
    if ids is None:
        raise ValueError(f"{type(denoiser).__name__} called without img_ids: cannot place image tokens on a grid")
    if ids.ndim == 3:
        ids = ids[0]
    own = ids[ids[:, 0] == 0]
    return int(own[:, 1].max()) + 1, int(own[:, 2].max()) + 1


# ---- videos ---------------------------------------------------------------------------------------
def video_patch(denoiser: nn.Module) -> tuple[int, int]:
    """(temporal, spatial) patch sizes from a video transformer's config: ``patch_size`` as an int
    or a (t, h, w) tuple, ``patch_size_t`` where the config has one (None or absent: 1)."""
    cfg = denoiser.config
    p = getattr(cfg, "patch_size", 1) or 1
    if isinstance(p, list | tuple):
        return int(p[0]), int(p[-1])
    return int(getattr(cfg, "patch_size_t", 1) or 1), int(p)


def _latent_grid(denoiser: nn.Module, args: tuple, kwargs: dict, frames_axis: int, layout: str) -> tuple[int, int, int]:
    x = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(x, torch.Tensor) or x.dim() != 5:
        raise ValueError(f"{type(denoiser).__name__} called without {layout} latents: cannot place video tokens")
    pt, p = video_patch(denoiser)
    return -(-int(x.shape[frames_axis]) // pt), int(x.shape[-2]) // p, int(x.shape[-1]) // p


def video_grid(denoiser: nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int]:
    """Latents given as (B, C, F, H, W): (frames, h, w) of the token grid over the patch sizes."""
    return _latent_grid(denoiser, args, kwargs, 2, "(B, C, F, H, W)")


def causal_vae_time(attr: str, default: int) -> Callable[[Any, nn.Module, int], TimeAxis]:
    """A causal video VAE whose temporal compression the pipeline states as ``attr``."""

    def time(pipe: Any, denoiser: nn.Module, frames: int) -> TimeAxis:
        r = int(getattr(pipe, attr, default) or default)
        return TimeAxis(frames=frames, patch=video_patch(denoiser)[0], compression=r, causal=True)

    return time


vae_time = causal_vae_time("vae_scale_factor_temporal", 1)


@dataclass(frozen=True)
class Family:
    """One denoiser kind and how daamkit reads its text-image attention."""

    name: str  # short id, recorded in every map's metadata
    title: str  # the models, for people
    denoisers: tuple[str, ...]  # diffusers class names
    sites: tuple[Site, ...] = ()
    text: tuple[TextPart, ...] = ()
    attr: str = "transformer"  # the pipeline attribute holding the denoiser
    capture: str = "sdpa"  # "sdpa" (queries and keys at the attention call) or "projections" (UNet taps)
    grid: Callable[[nn.Module, tuple, dict], tuple[int, int]] = _hidden_grid
    patch: Callable[[nn.Module], int] = _config_patch  # image tokens per latent cell side
    denoiser_text_len: Callable[[tuple, dict], int | None] = _encoder_hidden_states_len
    timestep_kwarg: str = "timestep"
    timestep_position: int | None = 2
    separate_negative: bool = False  # true CFG: the negative prompt runs as its own call, after the positive
    cond_first: bool = False  # batched CFG rows are [cond, negative] (diffusers' usual order is [negative, cond])
    timestep_rises: bool = False  # the denoiser's time goes from 0 (noise) up to 1 (image): t = 1 - sigma
    # video families: how token frames map onto the returned video's frames (None: an image family)
    time: Callable[[Any, nn.Module, int], TimeAxis] | None = None
    experts: tuple[str, ...] = ()  # further pipeline attributes holding denoisers that take turns (MoE)
    # denoiser calls that are guidance passes of another kind (perturbed layers, modalities cut apart),
    # given the call's (args, kwargs): not a step, nothing traced
    skip_call: Callable[[tuple, dict], bool] | None = None
    # cross-attention families: the attention modules' text from the denoiser's text inputs, one tensor
    # (b, tokens, dim) per TextPart as the pipeline hands them over; it gives the keys of words that are
    # not the prompt's (OVAM). None where the text has no keys of its own (joint attention)
    text_input: Callable[[nn.Module, Sequence[torch.Tensor]], torch.Tensor] | None = None
    # what the pipeline does between its encode_prompt and the denoiser: (pipe, encode_prompt's output)
    # -> the denoiser's text input, in key order (LTX-2's connectors); None: the output's first tensor
    text_handoff: Callable[[Any, Any], torch.Tensor] | None = None
    # why a denoiser's text keys are not a fixed function of its text input (None: they are)
    text_varies: Callable[[nn.Module], str | None] | None = None
    pipelines: tuple[str, ...] = ()  # pipelines tested with this family
    # the test file, or per denoiser class where a family's denoisers are tested apart: ((class, file), ...)
    tests: str | tuple[tuple[str, str], ...] = ""
    notes: str = ""

    def tests_of(self, denoiser: str) -> str:
        """The test file of one of this family's denoiser classes."""
        if isinstance(self.tests, str):
            return self.tests
        return dict(self.tests).get(denoiser, "")

    def text_parts(self, called: Sequence[str]) -> list[TextPart]:
        """The parts whose encoders ran (all of them when none was seen: ``prompt_embeds``)."""
        ran = [p for p in self.text if p.encoder in called]
        return ran or list(self.text[:1])



# ---- the text of cross-attention modules ----------------------------------------------------------
def _param_dtype(module: nn.Module) -> torch.dtype | None:
    p = next(module.parameters(), None)
    return p.dtype if p is not None else None


def _through(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    dtype = _param_dtype(module)
    return module(x if dtype is None else x.to(dtype))


def _projected(*names: str) -> Callable[[nn.Module, Sequence[torch.Tensor]], torch.Tensor]:
    """One encoder's text through the denoiser's modules ``names`` (dotted paths), those it has, in order."""

    def text(denoiser: nn.Module, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        (x,) = parts
        for name in names:
            try:
                module = denoiser.get_submodule(name)
            except AttributeError:
                continue
            x = _through(module, x)
        return x

    return text


def _unet_text(denoiser: nn.Module, parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """Kolors projects its ChatGLM states (``encoder_hid_proj``, "text_proj"); SD's UNets take the encoder's."""
    (x,) = parts
    proj = getattr(denoiser, "encoder_hid_proj", None)
    if proj is not None and getattr(denoiser.config, "encoder_hid_dim_type", None) == "text_proj":
        x = _through(proj, x)
    return x


def _hunyuandit_text(denoiser: nn.Module, parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """[BERT states | mT5 states through ``text_embedder``]: HunyuanDiT2DModel.forward's concatenation."""
    bert, mt5 = parts
    mt5 = _through(denoiser.text_embedder, mt5)
    return torch.cat([bert.to(mt5.dtype), mt5], dim=1)


def _ltx2_text(denoiser: nn.Module, parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """LTX-2.0 projects the connectors' output (``caption_projection``); later versions take it as it is."""
    (x,) = parts
    if getattr(denoiser.config, "use_prompt_embeddings", True) and getattr(denoiser, "caption_projection", None) is not None:
        x = _through(denoiser.caption_projection, x)
    return x


def _ltx2_handoff(pipe: Any, out: Any) -> torch.Tensor:
    """LTX2Pipeline hands the denoiser the text connectors' video output, not Gemma's states."""
    embeds, mask = out[0], out[1]
    side = getattr(getattr(pipe, "tokenizer", None), "padding_side", "left") or "left"
    return pipe.connectors(embeds, mask, padding_side=side)[0]


def _ltx2_varies(denoiser: nn.Module) -> str | None:
    if getattr(denoiser.config, "cross_attn_mod", False):
        return "its blocks modulate the text keys by the timestep (cross_attn_mod, LTX-2.3)"
    return None


# ---- qwenimage, zimage ------------------------------------------------------------------------------
def _qwenimage_grid(denoiser: nn.Module, args: tuple, kwargs: dict) -> tuple[int, int]:
    """``img_shapes``: per sample, (frames, rows, cols) of each image in the image tokens, the generated
    one first (an edit's reference images follow it)."""
    shapes = kwargs.get("img_shapes", args[4] if len(args) > 4 else None)
    if not shapes:
        raise ValueError("QwenImageTransformer2DModel called without img_shapes: cannot place image tokens on a grid")
    first = shapes[0][0] if isinstance(shapes[0], list) else shapes[0]
    return int(first[-2]), int(first[-1])


def _zimage_inputs(args: tuple, kwargs: dict) -> tuple[list[torch.Tensor], list[int]]:
    """The latents (C, F, H, W) and the caption lengths of each sample."""
    x = kwargs.get("x", args[0] if args else None)
    caps = kwargs.get("cap_feats", args[2] if len(args) > 2 else None)
    if not x or not isinstance(x[0], torch.Tensor) or not caps or not isinstance(caps[0], torch.Tensor):
        raise ValueError("ZImageTransformer2DModel in omni mode (nested lists of images and captions) is not traced")
    return list(x), [int(c.shape[0]) for c in caps]


def _zimage_grid(denoiser: nn.Module, args: tuple, kwargs: dict) -> tuple[int, int]:
    p = int(kwargs.get("patch_size", 2))
    h, w = _zimage_inputs(args, kwargs)[0][0].shape[-2:]
    return int(h) // p, int(w) // p


def _zimage_locate(tap: Any, q_len: int, k_len: int) -> Slices | None:
    """Each sample is [image, image pads, caption, caption pads], both parts padded with a learnt
    (unmasked) token to a multiple of 32 (``SEQ_MULTI_OF``), the rows then to the longest. The text keys
    run from the caption start over the longest caption; a shorter caption's pads there are not text."""
    capture = tap.capture
    h, w = capture.current.latent_hw
    start = -(-h * w // 32) * 32
    lengths = _zimage_inputs(*capture.inputs)[1]
    n = max(lengths)
    if q_len < h * w or k_len < start + n:
        return None
    valid = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    return Slices(slice(0, h * w), slice(start, start + n), valid)


# ---- cogview4, auraflow, lumina2, hidream -----------------------------------------------------------
def _after_registers(tap: Any, q_len: int, k_len: int) -> Slices | None:
    """AuraFlow: every block attends over [register tokens (learned, no words), text, image]; the
    single-stream modules get that sequence with no split, so the text length is the denoiser's."""
    capture = tap.capture
    text = capture.text_len
    if text is None:
        return None
    lead = int(capture.denoiser.register_tokens.shape[1])
    h, w = capture.current.latent_hw
    start = lead + text
    return Slices(slice(start, start + h * w), slice(lead, start)) if q_len >= start + h * w else None


def _caption_lengths(args: tuple, kwargs: dict) -> list[int]:
    mask = kwargs.get("encoder_attention_mask", args[3] if len(args) > 3 else None)
    if not isinstance(mask, torch.Tensor):
        raise ValueError("Lumina2Transformer2DModel called without encoder_attention_mask: cannot find the captions")
    return [int(n) for n in mask.sum(1).tolist()]


def _lumina2_locate(tap: Any, q_len: int, k_len: int) -> list[Slices] | None:
    """Lumina 2 packs each sample as [its caption's valid tokens (c_i), image, zeros up to the longest]:
    the image queries start at c_i, the text keys are the first c_i; key slices run over the longest
    caption, and past c_i (that row's image) they are not text."""
    capture = tap.capture
    h, w = capture.current.latent_hw
    lengths = _caption_lengths(*capture.inputs)
    n = max(lengths)
    if q_len < n + h * w or k_len < n + h * w:
        return None
    valid = torch.arange(n)[None, :] < torch.tensor(lengths)[:, None]
    return [Slices(slice(c, c + h * w), slice(0, n), valid) for c in lengths]


def _hidream_text_len(args: tuple, kwargs: dict) -> int | None:
    """[T5, Llama (last selected layer), Llama (the block's own layer)]: T5's length plus twice Llama's."""
    t5 = kwargs.get("encoder_hidden_states_t5", args[2] if len(args) > 2 else None)
    llama = kwargs.get("encoder_hidden_states_llama3", args[3] if len(args) > 3 else None)
    if not isinstance(t5, torch.Tensor) or llama is None:
        return None
    return int(t5.shape[1]) + 2 * int(llama[0].shape[-2])


_UNET_TEXT = (TextPart("text_encoder", "tokenizer"),)


def _sana_keys(ids: list[int], n_keys: int) -> list[int]:
    """SanaPipeline keeps <bos> and the last ``n_keys - 1`` positions of the encoder's sequence, which
    drops the complex human instruction before the prompt (a prompt encoded without one has just
    ``n_keys`` ids)."""
    return ids if len(ids) <= n_keys else ids[:1] + ids[len(ids) - n_keys + 1 :]

# ---- ltx (video) ----------------------------------------------------------------------------------
def _ltx_arg(args: tuple, kwargs: dict, name: str, position: int) -> Any:
    return kwargs[name] if name in kwargs else args[position] if len(args) > position else None


def _ltx_video_tokens(coords: torch.Tensor) -> tuple[int, int, int, int]:
    """(start, frames, h, w) of the generated video in LTX's ``video_coords`` (B, 3, N): (frame, row, column)
    per token, frame-major. LTXConditionPipeline puts the tokens of conditions at later frames first; their
    frame coordinate is that frame, never 0, so the video starts at the last token at (0, 0, 0)."""
    c = coords[0]
    origin = (c == 0).all(dim=0).nonzero()
    if not len(origin):
        raise ValueError("LTXVideoTransformer3DModel video_coords without the origin: cannot place video tokens")
    start = int(origin[-1])
    own = c[:, start:]
    h, w = len(own[1].unique()), len(own[2].unique())
    return start, own.shape[1] // (h * w), h, w


def _ltx_grid(denoiser: nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int]:
    """Packed (B, N, C) latents: the token grid comes as ``num_frames``/``height``/``width`` (in tokens),
    or, from LTXConditionPipeline, as ``video_coords``."""
    f, h, w = (_ltx_arg(args, kwargs, k, i) for k, i in (("num_frames", 4), ("height", 5), ("width", 6)))
    if f and h and w:
        return int(f), int(h), int(w)
    coords = _ltx_arg(args, kwargs, "video_coords", 8)
    if not isinstance(coords, torch.Tensor):
        raise ValueError("LTXVideoTransformer3DModel called without num_frames/height/width or video_coords")
    return _ltx_video_tokens(coords)[1:]


def _ltx_locate(tap: Any, q_len: int, k_len: int) -> Slices | None:
    """The generated video is the last frames*h*w queries (LTXConditionPipeline's condition tokens come
    first); the keys are the T5 tokens."""
    call = tap.capture.current
    n = call.frames * call.latent_hw[0] * call.latent_hw[1]
    if q_len < n:
        return None
    text = k_len if tap.text_len is None else min(tap.text_len, k_len)
    return Slices(slice(q_len - n, q_len), slice(0, text))


def _ltx_time(pipe: Any, denoiser: nn.Module, frames: int) -> TimeAxis:
    """LTX's VAE: temporal compression ``vae_temporal_compression_ratio`` (8), the first latent frame decoded to
    one frame (its decoder drops the leading frames of every temporal upsampling)."""
    r = int(getattr(pipe, "vae_temporal_compression_ratio", 8) or 8)
    return TimeAxis(frames=frames, patch=video_patch(denoiser)[0], compression=r, causal=True)

# ---- ltx2 (video) ---------------------------------------------------------------------------------
def _ltx2_keys(ids: list[int], n_keys: int) -> list[int]:
    """LTX2TextConnectors move the prompt's tokens (Gemma, left-padded) to the front in their order and put
    learnt registers where the padding was: the keys are the ids without their left padding, then as many
    pads (the registers, no words)."""
    pad = 0  # Gemma's <pad>
    lead = next((i for i, t in enumerate(ids) if t != pad), len(ids))
    return (ids[lead:] + ids[:lead])[:n_keys]


def _ltx2_grid(denoiser: nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int]:
    """Packed (B, N, C) video latents; LTX-2's pipelines give the token grid as ``num_frames``/``height``/``width``."""
    f, h, w = (kwargs.get(k) for k in ("num_frames", "height", "width"))
    if not (f and h and w):
        raise ValueError("LTX2VideoTransformer3DModel called without num_frames/height/width: cannot place video tokens")
    return int(f), int(h), int(w)


def _ltx2_guidance_pass(args: tuple, kwargs: dict) -> bool:
    """LTX2Pipeline's spatio-temporal guidance call (self-attention of some blocks skipped) and its modality
    guidance call (audio-video attention off) follow the CFG call of each step with the prompt alone."""
    return bool(kwargs.get("spatio_temporal_guidance_blocks")) or bool(kwargs.get("isolate_modalities"))


# ---- wan (video)
def _wan_image_context(module: nn.Module) -> int:
    """Wan 2.1 I2V's cross-attention attends to the CLIP image tokens (``add_k_proj``) in a call of its
    own before the text one."""
    return int(getattr(module, "add_k_proj", None) is not None)
# ---- cogvideox, mochi (video) ------------------------------------------------------------------
def _frames_first_grid(denoiser: nn.Module, args: tuple, kwargs: dict) -> tuple[int, int, int]:
    """CogVideoX takes its latents as (B, F, C, H, W)."""
    return _latent_grid(denoiser, args, kwargs, 1, "(B, F, C, H, W)")


# Mochi's VAE decodes each latent frame to 6 frames and drops the first 5 (causal)
_mochi_time = causal_vae_time("vae_temporal_scale_factor", 6)


def _video_then_row_text(tap: Any, q_len: int, k_len: int) -> Slices | None:
    """Mochi calls attention per batch row on [video, that row's valid text tokens]."""
    call = tap.capture.current
    n = call.frames * call.latent_hw[0] * call.latent_hw[1]
    return Slices(slice(0, n), slice(n, k_len)) if q_len >= n and k_len > n else None


# ---- hunyuanvideo, hunyuanvideo15 (video) ------------------------------------------------------------
def _keep_last(ids: list[int], n_keys: int) -> int:
    """HunyuanVideo cuts ``crop_start`` ids (a call argument: the prompt template's) off the front of a
    sequence padded to ``max_sequence_length + crop_start``: the keys are the last ``n_keys`` ids."""
    return max(0, len(ids) - n_keys)


def _hunyuanvideo15_input(args: tuple, kwargs: dict, name: str, position: int) -> Any:
    return kwargs[name] if name in kwargs else args[position] if len(args) > position else None


def _hunyuanvideo15_locate(tap: Any, q_len: int, k_len: int) -> list[Slices] | None:
    """HunyuanVideo 1.5 packs each sample's keys as [video, valid image tokens (I2V's vision encoder),
    valid ByT5 glyph tokens, valid Qwen tokens, the invalid (masked) ones of each]: the Qwen part
    starts after that row's valid image and ByT5 tokens. Key slices run over the Qwen length; past a
    row's valid Qwen tokens they are other (masked) tokens, not text. The ByT5 tokens spell the
    prompt's quoted text again, character by character, as ``Text "..."``: they are not the prompt's
    tokens and stay out of the text keys, like the image tokens."""
    capture = tap.capture
    h, w = capture.current.latent_hw
    n = capture.current.frames * h * w
    args, kwargs = capture.inputs
    mask = _hunyuanvideo15_input(args, kwargs, "encoder_attention_mask", 3)
    mask_2 = _hunyuanvideo15_input(args, kwargs, "encoder_attention_mask_2", 6)
    image = _hunyuanvideo15_input(args, kwargs, "image_embeds", 7)
    if not isinstance(mask, torch.Tensor) or not isinstance(mask_2, torch.Tensor) or not isinstance(image, torch.Tensor):
        raise ValueError("HunyuanVideo15Transformer3DModel called without its masks and image_embeds: cannot find the text")
    # the model takes all-zero image embeddings for text to video and then masks every image token
    images = 0 if bool(torch.all(image == 0)) else int(image.shape[1])
    length = int(mask.shape[1])
    if q_len < n or k_len < n + int(image.shape[1]) + int(mask_2.shape[1]) + length:
        return None
    valid = torch.arange(length)[None, :] < mask.bool().sum(1).cpu()[:, None]
    starts = [n + images + int(b) for b in mask_2.bool().sum(1).tolist()]
    return [Slices(slice(0, n), slice(s, s + length), valid) for s in starts]


FAMILIES: tuple[Family, ...] = (
    Family(
        name="unet",
        title="Stable Diffusion 1.x/2.x, SDXL, Kolors, AnimateDiff (UNet cross-attention)",
        # AnimateDiff's motion UNet: the SD UNet's layers run per frame, its motion modules attend over time
        denoisers=("UNet2DConditionModel", "UNetMotionModel"),
        attr="unet",
        capture="projections",
        text=_UNET_TEXT,
        text_input=_unet_text,
        pipelines=(
            "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
            "StableDiffusionControlNetPipeline", "StableDiffusionXLPipeline", "StableDiffusionXLModularPipeline",
            "KolorsPipeline", "KolorsImg2ImgPipeline", "AnimateDiffPipeline", "AnimateDiffVideoToVideoPipeline",
        ),
        # Kolors (a UNet2DConditionModel too): tests/capture/test_family_kolors.py
        tests=(("UNet2DConditionModel", "tests/capture/test_trace.py"),
               ("UNetMotionModel", "tests/capture/test_family_animatediff.py")),
        notes=(
            "SDXL concatenates its encoders along features: one tokenizer's ids index the keys; Kolors' "
            "ChatGLM keys are left-padded, [gMASK] sop before the prompt, padding not masked; AnimateDiff: "
            "one token frame per video frame (the VAE decodes frame by frame), frames run as batch rows"
        ),
    ),
    Family(
        name="sd3",
        title="Stable Diffusion 3 / 3.5",
        denoisers=("SD3Transformer2DModel",),
        # SD3.5's image-only attn2 has no text stream (no add_k_proj)
        sites=(Site(r"transformer_blocks\.\d+\.attn", "joint", "image_text", needs=("add_k_proj",)),),
        text=(TextPart("text_encoder", "tokenizer", length=77), TextPart("text_encoder_3", "tokenizer_3")),
        pipelines=("StableDiffusion3Pipeline",),
        tests="tests/capture/test_joint.py",
        notes="the keys are [CLIP-L|CLIP-G (77 tokens, features concatenated) ; T5]",
    ),
    Family(
        name="flux",
        title="Flux.1 (dev, schnell, Kontext)",
        denoisers=("FluxTransformer2DModel",),
        sites=(
            Site(r"transformer_blocks\.\d+\.attn", "double", "text_image", needs=("add_k_proj",)),
            Site(r"single_transformer_blocks\.\d+\.attn", "single", "text_image", text_from="denoiser"),
        ),
        text=(TextPart("text_encoder_2", "tokenizer_2"),),  # CLIP only gives a pooled vector
        grid=_ids_grid("img_ids"),
        patch=lambda denoiser: 2,  # latents are packed 2x2
        timestep_position=None,
        separate_negative=True,
        pipelines=("FluxPipeline", "FluxKontextPipeline", "FluxModularPipeline"),
        tests="tests/capture/test_joint.py",
        notes="Kontext's reference image: tokens after the generated ones (img_ids first coordinate 1), not image queries",
    ),
    # ---- flux2, chroma
    Family(
        name="flux2",
        title="FLUX.2 (dev, klein)",
        denoisers=("Flux2Transformer2DModel",),
        sites=(
            Site(r"transformer_blocks\.\d+\.attn", "double", "text_image"),
            Site(r"single_transformer_blocks\.\d+\.attn", "single", "text_image", text_from="denoiser"),
        ),
        # no token is dropped: the chat template stays in the keys, the prompt after dev's (Mistral)
        # "[INST]" or klein's (Qwen3) "<|im_start|>user\n"
        text=(TextPart("text_encoder", "tokenizer", after=("[INST]", "<|im_start|>user\n")),),
        grid=_time_zero_grid,
        patch=lambda denoiser: 2,  # latents are patchified 2x2 into channels
        separate_negative=True,  # klein base: cond call, then the uncond one; dev is guidance-distilled
        pipelines=("Flux2Pipeline", "Flux2KleinPipeline", "Flux2KleinKVPipeline", "Flux2KleinInpaintPipeline"),
        tests="tests/capture/test_family_flux2.py",
        notes="keys are [text (padded to 512, left-padded for dev), image, reference images]",
    ),
    Family(
        name="chroma",
        title="Chroma",
        denoisers=("ChromaTransformer2DModel",),
        sites=(
            Site(r"transformer_blocks\.\d+\.attn", "double", "text_image", needs=("add_k_proj",)),
            Site(r"single_transformer_blocks\.\d+\.attn", "single", "text_image", text_from="denoiser"),
        ),
        text=(TextPart("text_encoder", "tokenizer"),),
        grid=_ids_grid("img_ids"),
        patch=lambda denoiser: 2,  # latents are packed 2x2
        separate_negative=True,
        pipelines=("ChromaPipeline", "ChromaImg2ImgPipeline"),
        tests="tests/capture/test_family_chroma.py",
        notes="the text mask is a float 0/1 the model adds to the scores (padding is damped, not masked): taken as given",
    ),
    # ---- qwenimage, zimage
    Family(
        name="qwenimage",
        title="Qwen-Image (text to image, Edit)",
        denoisers=("QwenImageTransformer2DModel",),
        sites=(Site(r"transformer_blocks\.\d+\.attn", "joint", "text_image"),),
        # the pipeline drops the template's system part by count; an edit's reference image is vision
        # tokens before the prompt (and latents after the generated image's tokens)
        text=(
            TextPart(
                "text_encoder", "tokenizer", drop="prompt_template_encode_start_idx",
                after=("<|im_start|>user\n", "<|vision_end|>"),
            ),
        ),
        grid=_qwenimage_grid,
        timestep_position=3,
        separate_negative=True,
        pipelines=("QwenImagePipeline", "QwenImageEditPipeline", "QwenImageImg2ImgPipeline"),
        tests="tests/capture/test_family_qwenimage.py",
        notes="keys are [Qwen2.5-VL text, image]; the text ends with 5 template tokens, an edit's starts with vision tokens",
    ),
    Family(
        name="zimage",
        title="Z-Image (Turbo)",
        denoisers=("ZImageTransformer2DModel",),
        # noise_refiner / context_refiner attend within the image / the caption alone
        sites=(Site(r"layers\.\d+\.attention", "single", "image_text", text_from="denoiser", locate=_zimage_locate),),
        text=(TextPart("text_encoder", "tokenizer", after="<|im_start|>user\n"),),
        grid=_zimage_grid,
        patch=lambda denoiser: 2,
        denoiser_text_len=lambda args, kwargs: max(_zimage_inputs(args, kwargs)[1]),
        timestep_kwarg="t",
        timestep_position=1,
        timestep_rises=True,
        cond_first=True,
        pipelines=("ZImagePipeline", "ZImageImg2ImgPipeline"),
        tests="tests/capture/test_family_zimage.py",
        notes="one sequence [image, caption] per sample, each padded to a multiple of 32 with unmasked pad tokens",
    ),
    # ---- sana, pixart, hunyuandit -------------------------------------------------------------
    Family(
        name="sana",
        title="Sana (SanaTransformer2DModel)",
        denoisers=("SanaTransformer2DModel",),
        # attn1 is linear attention (no softmax, no attention call): only attn2 meets the text
        sites=(Site(r"transformer_blocks\.\d+\.attn2", "cross", "cross"),),
        text=(TextPart("text_encoder", "tokenizer", select=_sana_keys),),
        text_input=_projected("caption_projection", "caption_norm"),
        pipelines=("SanaPipeline",),
        tests="tests/capture/test_family_sana.py",
        notes=(
            "keys are <bos> + the prompt + padding (the complex human instruction is cut off); "
            "resolution binning: the tokens cover the bin, maps are resized and cropped as the image"
        ),
    ),
    Family(
        name="pixart",
        title="PixArt-α, PixArt-Σ",
        denoisers=("PixArtTransformer2DModel",),
        sites=(Site(r"transformer_blocks\.\d+\.attn2", "cross", "cross"),),
        text=(TextPart("text_encoder", "tokenizer"),),
        text_input=_projected("caption_projection"),
        pipelines=("PixArtAlphaPipeline", "PixArtSigmaPipeline"),
        tests="tests/capture/test_family_pixart.py",
        notes="T5 keys, padding masked; resolution binning as Sana",
    ),
    Family(
        name="hunyuandit",
        title="HunyuanDiT",
        denoisers=("HunyuanDiT2DModel",),
        sites=(Site(r"blocks\.\d+\.attn2", "cross", "cross"),),
        # keys = [BERT (77) | mT5 (256)]; a word pools its positions in both
        text=(TextPart("text_encoder", "tokenizer", length=77), TextPart("text_encoder_2", "tokenizer_2")),
        timestep_position=1,
        text_input=_hunyuandit_text,
        pipelines=("HunyuanDiTPipeline",),
        tests="tests/capture/test_family_hunyuandit.py",
        notes="padding keys hold a learned vector and are attended (no mask); queries carry the image RoPE",
    ),
    # ---- cogview4, auraflow, lumina2, hidream -------------------------------------------------------
    Family(
        name="cogview4",
        title="CogView4",
        denoisers=("CogView4Transformer2DModel",),
        sites=(Site(r"transformer_blocks\.\d+\.attn1", "joint", "text_image"),),
        # GLM-4 ids are [<|endoftext|> left pads (to a multiple of 16, unmasked), [gMASK], <sop>, prompt]
        text=(TextPart("text_encoder", "tokenizer", after="<sop>"),),
        separate_negative=True,
        pipelines=("CogView4Pipeline", "CogView4ControlPipeline"),
        tests="tests/capture/test_family_cogview4.py",
        notes="cond and uncond are separate calls, each padded to its own length",
    ),
    Family(
        name="auraflow",
        title="AuraFlow",
        denoisers=("AuraFlowTransformer2DModel",),
        sites=(
            Site(r"joint_transformer_blocks\.\d+\.attn", "joint", "text_image", locate=_after_registers),
            Site(r"single_transformer_blocks\.\d+\.attn", "single", "text_image", locate=_after_registers),
        ),
        text=(TextPart("text_encoder", "tokenizer"),),
        pipelines=("AuraFlowPipeline",),
        tests="tests/capture/test_family_auraflow.py",
        notes="8 learned register tokens precede the text keys; padded text is zeroed, not masked",
    ),
    Family(
        name="lumina2",
        title="Lumina-Image 2.0",
        denoisers=("Lumina2Transformer2DModel",),
        # context_refiner / noise_refiner attend within the caption / the image alone
        sites=(Site(r"layers\.\d+\.attn", "joint", "text_image", locate=_lumina2_locate, packed_rows=True),),
        # prompts follow the system prompt and " <Prompt Start> "; a negative prompt has no prefix
        text=(TextPart("text_encoder", "tokenizer", after=("<Prompt Start>", "<bos>")),),
        denoiser_text_len=lambda args, kwargs: max(_caption_lengths(args, kwargs)),
        timestep_position=1,
        timestep_rises=True,
        separate_negative=True,
        pipelines=("Lumina2Pipeline",),
        tests="tests/capture/test_family_lumina2.py",
        notes="each sample is packed as [caption, image] with its own caption length; cond and uncond are separate calls",
    ),
    Family(
        name="hidream",
        title="HiDream-I1 (full, dev, fast)",
        denoisers=("HiDreamImageTransformer2DModel",),
        # the blocks call their attention with positional arguments and no text split: the text is the
        # end of the keys, its length the denoiser's; a non-square image's padding follows its tokens
        sites=(
            Site(r"double_stream_blocks\.\d+\.block\.attn1", "double", "image_text", text_from="denoiser"),
            Site(r"single_stream_blocks\.\d+\.block\.attn1", "single", "image_text", text_from="denoiser"),
        ),
        # CLIP-L/G only give a pooled vector; the Llama tokens come twice, as two layers' projections
        text=(
            TextPart("text_encoder_3", "tokenizer_3"),
            TextPart("text_encoder_4", "tokenizer_4"),
            TextPart("text_encoder_4", "tokenizer_4"),
        ),
        denoiser_text_len=_hidream_text_len,
        timestep_kwarg="timesteps",
        timestep_position=1,
        pipelines=("HiDreamImagePipeline",),
        tests="tests/capture/test_family_hidream.py",
        notes="keys are [image, T5, Llama last layer, Llama layer of the block]: the last part differs per block",
    ),
    # ---- wan (video)
    Family(
        name="wan",
        title="Wan 2.1, Wan 2.2 (T2V, I2V, TI2V-5B, A14B's two experts)",
        denoisers=("WanTransformer3DModel",),
        # attn1 is the video's self-attention; attn2 reads the text (and 2.1 I2V's image context first)
        sites=(Site(r"blocks\.\d+\.attn2", "cross", "cross", skip=_wan_image_context),),
        text=(TextPart("text_encoder", "tokenizer"),),
        grid=video_grid,
        patch=lambda denoiser: video_patch(denoiser)[1],
        timestep_position=1,
        separate_negative=True,
        time=vae_time,
        experts=("transformer_2",),
        text_input=_projected("condition_embedder.text_embedder"),
        pipelines=("WanPipeline", "WanImageToVideoPipeline"),
        tests="tests/capture/test_family_wan.py",
        notes=(
            "UMT5 keys padded to 512 with zero embeddings, attended unmasked; tokens frame-major over "
            "(latent frame, row, column); causal VAE, 4x in time; A14B: transformer for t >= boundary, "
            "transformer_2 after"
        ),
    ),
    # ---- cogvideox (video)
    Family(
        name="cogvideox",
        title="CogVideoX 1.0 (2b, 5b, 5b-I2V), CogVideoX 1.5 (5b, 5b-I2V)",
        denoisers=("CogVideoXTransformer3DModel",),
        sites=(Site(r"transformer_blocks\.\d+\.attn1", "joint", "text_image"),),
        text=(TextPart("text_encoder", "tokenizer"),),
        grid=_frames_first_grid,
        time=vae_time,
        pipelines=("CogVideoXPipeline", "CogVideoXImageToVideoPipeline"),
        tests="tests/capture/test_family_cogvideox.py",
        notes=(
            "keys are [T5 (226, padding attended), video frame-major]; latents (B, F, C, H, W), an I2V image "
            "on channels; 1.5 pads latent frames at the start to its temporal patch 2 and drops them"
        ),
    ),
    # ---- mochi (video)
    Family(
        name="mochi",
        title="Mochi 1",
        denoisers=("MochiTransformer3DModel",),
        sites=(Site(r"transformer_blocks\.\d+\.attn1", "joint", "image_text", locate=_video_then_row_text,
                    per_row=True),),
        text=(TextPart("text_encoder", "tokenizer"),),
        grid=video_grid,
        time=_mochi_time,
        timestep_rises=True,
        pipelines=("MochiPipeline",),
        tests="tests/capture/test_family_mochi.py",
        notes="each batch row attends over [video, its valid T5 tokens] in a call of its own; VAE time 6x, causal",
    ),
    # ---- sana_video (video)
    Family(
        name="sana_video",
        title="Sana-Video (text and image to video)",
        denoisers=("SanaVideoTransformer3DModel",),
        # attn1 is linear attention (no softmax, no attention call): only attn2 meets the text
        sites=(Site(r"transformer_blocks\.\d+\.attn2", "cross", "cross"),),
        text=(TextPart("text_encoder", "tokenizer", select=_sana_keys),),
        grid=video_grid,
        patch=lambda denoiser: video_patch(denoiser)[1],
        time=vae_time,
        text_input=_projected("caption_projection", "caption_norm"),
        pipelines=("SanaVideoPipeline", "SanaImageToVideoPipeline"),
        tests="tests/capture/test_family_sana_video.py",
        notes=(
            "keys as Sana's (<bos> + the prompt + padding, the instruction cut off); queries are the (1, 2, 2) "
            "patches frame-major; causal Wan VAE: 1 + 4 (n - 1) frames; image to video: latent frame 0 is the "
            "image (timestep 0), the returned video's frame 0"
        ),
    ),
    # ---- ltx (video)
    Family(
        name="ltx",
        title="LTX-Video (0.9.x)",
        denoisers=("LTXVideoTransformer3DModel",),
        # attn1 is the video's self-attention; attn2 attends from the video tokens to the T5 tokens
        sites=(Site(r"transformer_blocks\.\d+\.attn2", "cross", "cross", locate=_ltx_locate),),
        text=(TextPart("text_encoder", "tokenizer"),),
        grid=_ltx_grid,
        patch=lambda denoiser: video_patch(denoiser)[1],
        time=_ltx_time,
        text_input=_projected("caption_projection"),
        pipelines=("LTXPipeline", "LTXImageToVideoPipeline", "LTXConditionPipeline"),
        tests="tests/capture/test_family_ltx.py",
        notes=(
            "packed tokens frame-major; T5 keys, padding masked (bias -10000); image-to-video: the image is the "
            "first latent frame (its tokens are queries, at timestep 0); condition tokens at later frames precede "
            "the video's and are not queries"
        ),
    ),
    # ---- ltx2 (video)
    Family(
        name="ltx2",
        title="LTX-2 (video stream; audio not traced)",
        denoisers=("LTX2VideoTransformer3DModel",),
        # attn2: video queries, text keys; audio_attn2 (audio to text) and the audio-video attentions are not traced
        sites=(Site(r"transformer_blocks\.\d+\.attn2", "cross", "cross"),),
        text=(TextPart("text_encoder", "tokenizer", select=_ltx2_keys),),
        grid=_ltx2_grid,
        patch=lambda denoiser: video_patch(denoiser)[1],
        denoiser_text_len=lambda args, kwargs: _encoder_hidden_states_len((), kwargs),
        timestep_position=4,
        time=_ltx_time,
        skip_call=_ltx2_guidance_pass,
        text_input=_ltx2_text,
        text_handoff=_ltx2_handoff,
        text_varies=_ltx2_varies,
        pipelines=("LTX2Pipeline", "LTX2ImageToVideoPipeline"),
        tests="tests/capture/test_family_ltx2.py",
        notes=(
            "keys are the connector's output: the Gemma-3 prompt tokens (left padding removed) then learnt "
            "registers (unmasked, no words); the STG and modality-guidance calls are skipped"
        ),
    ),
    # ---- hunyuanvideo (video)
    Family(
        name="hunyuanvideo",
        title="HunyuanVideo",
        denoisers=("HunyuanVideoTransformer3DModel",),
        # both block kinds get the text as the module's encoder_hidden_states and attend over [video, text]
        sites=(
            Site(r"transformer_blocks\.\d+\.attn", "double", "image_text"),
            Site(r"single_transformer_blocks\.\d+\.attn", "single", "image_text"),
        ),
        # CLIP only gives a pooled vector; the Llama keys start inside the template, crop_start ids in
        text=(
            TextPart(
                "text_encoder", "tokenizer", drop=_keep_last, after="<|start_header_id|>user<|end_header_id|>\n\n",
            ),
        ),
        grid=video_grid,
        patch=lambda denoiser: video_patch(denoiser)[1],
        time=vae_time,
        separate_negative=True,  # true CFG (true_cfg_scale, negative_prompt): cond call, then the negative one
        pipelines=("HunyuanVideoPipeline",),
        tests="tests/capture/test_family_hunyuanvideo.py",
        notes=(
            "keys are [video, Llama (max_sequence_length, padding masked)]; the prompt follows the template's "
            "user header, <|eot_id|> closes it; causal VAE: 4 video frames per latent frame after the first"
        ),
    ),
    # ---- hunyuanvideo15 (video)
    Family(
        name="hunyuanvideo15",
        title="HunyuanVideo 1.5",
        denoisers=("HunyuanVideo15Transformer3DModel",),
        sites=(Site(r"transformer_blocks\.\d+\.attn", "double", "image_text", locate=_hunyuanvideo15_locate, packed_rows=True),),
        # Qwen2.5-VL in its chat template, the system part (108 tokens) cut by count
        text=(TextPart("text_encoder", "tokenizer", drop="prompt_template_encode_start_idx", after="<|im_start|>user\n"),),
        grid=video_grid,
        patch=lambda denoiser: video_patch(denoiser)[1],
        time=vae_time,
        separate_negative=True,  # the guider runs the cond batch, then the uncond one
        pipelines=("HunyuanVideo15Pipeline", "HunyuanVideo15ImageToVideoPipeline"),
        tests="tests/capture/test_family_hunyuanvideo15.py",
        notes=(
            "each sample's keys are [video, valid image tokens (I2V), valid ByT5 glyph tokens, valid Qwen tokens, "
            "masked rest]; only the Qwen tokens are text keys (ByT5 re-spells quoted text)"
        ),
    ),
)


def family_of(pipe: Any) -> tuple[Family, nn.Module] | None:
    """The family entry of a pipeline's denoiser and the denoiser, or None."""
    for fam in FAMILIES:
        denoiser = getattr(pipe, fam.attr, None)
        if denoiser is not None and any(c.__name__ in fam.denoisers for c in type(denoiser).__mro__):
            return fam, denoiser
    return None
