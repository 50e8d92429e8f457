"""The table of model families: one declarative :class:`Family` entry per denoiser kind.

Adding a family is adding an entry here (plus its tiny offline pipeline and tests): which modules of
the denoiser are text-image attention (:class:`Site`), where the text keys and the generated image's
queries lie in their attention call, which text encoders' tokens the keys are (:class:`TextPart`), and
how the image tokens sit on the latent grid. ``daamkit families`` and the README table are generated
from this table and :data:`NOT_SUPPORTED`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


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
    locate: overrides the layout: ``locate(tap, q_len, k_len) -> Slices | None``.
    """

    pattern: str
    block: str
    layout: str
    text_from: str = "module"
    needs: tuple[str, ...] = ()
    locate: Callable[..., Any] | None = None


@dataclass(frozen=True)
class TextPart:
    """One text encoder's tokens in the keys.

    encoder / tokenizer: pipeline attributes. length: key positions this part takes when another part
    follows it (None: the tokenizer's ``model_max_length``). drop: leading ids the pipeline cuts from
    the encoder's output before the denoiser sees it (an int, or the name of a pipeline attribute).
    after: the text that precedes the prompt in a chat template or instruction prefix; the words are
    looked for after its last occurrence in the ids, never in the template.
    select: instead of ``drop``, for a pipeline that picks the key positions out of the encoder's
        sequence: ``select(ids, n_keys)`` gives the ids of the keys, in key order, from the ids the
        encoder received (Sana keeps ``<bos>`` and the last ``n_keys - 1`` positions).
    """

    encoder: str
    tokenizer: str
    length: int | None = None
    drop: int | str = 0
    after: str | None = None
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
    pipelines: tuple[str, ...] = ()  # pipelines tested with this family
    tests: str = ""  # the test file
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def text_parts(self, called: Sequence[str]) -> list[TextPart]:
        """The parts whose encoders ran (all of them when none was seen: ``prompt_embeds``)."""
        ran = [p for p in self.text if p.encoder in called]
        return ran or list(self.text[:1])


_UNET_TEXT = (TextPart("text_encoder", "tokenizer"),)


def _sana_keys(ids: list[int], n_keys: int) -> list[int]:
    """SanaPipeline keeps <bos> and the last ``n_keys - 1`` positions of the encoder's sequence, which
    drops the complex human instruction before the prompt (a prompt encoded without one has just
    ``n_keys`` ids)."""
    return ids if len(ids) <= n_keys else ids[:1] + ids[len(ids) - n_keys + 1 :]


FAMILIES: tuple[Family, ...] = (
    Family(
        name="unet",
        title="Stable Diffusion 1.x/2.x, SDXL, Kolors (UNet cross-attention)",
        denoisers=("UNet2DConditionModel",),
        attr="unet",
        capture="projections",
        text=_UNET_TEXT,
        pipelines=(
            "StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
            "StableDiffusionControlNetPipeline", "StableDiffusionXLPipeline", "KolorsPipeline",
            "KolorsImg2ImgPipeline",
        ),
        tests="tests/capture/test_trace.py",  # Kolors: tests/capture/test_family_kolors.py
        notes=(
            "SDXL concatenates its encoders along features: one tokenizer's ids index the keys; Kolors' "
            "ChatGLM keys are left-padded, [gMASK] sop before the prompt, padding not masked"
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
        pipelines=("FluxPipeline",),
        tests="tests/capture/test_joint.py",
    ),
    # ---- sana, pixart, hunyuandit -------------------------------------------------------------
    Family(
        name="sana",
        title="Sana (SanaTransformer2DModel)",
        denoisers=("SanaTransformer2DModel",),
        # attn1 is linear attention (no softmax, no attention call): only attn2 meets the text
        sites=(Site(r"transformer_blocks\.\d+\.attn2", "cross", "cross"),),
        text=(TextPart("text_encoder", "tokenizer", select=_sana_keys),),
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
        pipelines=("HunyuanDiTPipeline",),
        tests="tests/capture/test_family_hunyuandit.py",
        notes="padding keys hold a learned vector and are attended (no mask); queries carry the image RoPE",
    ),
)


def family_of(pipe: Any) -> tuple[Family, nn.Module] | None:
    """The family entry of a pipeline's denoiser and the denoiser, or None."""
    for fam in FAMILIES:
        denoiser = getattr(pipe, fam.attr, None)
        if denoiser is not None and any(c.__name__ in fam.denoisers for c in type(denoiser).__mro__):
            return fam, denoiser
    return None
