"""Which denoisers of the installed diffusers daamkit traces: the source of ``daamkit families`` and of
the README's family table.

A denoiser class is one that diffusers exports from ``diffusers.models.transformers`` or
``diffusers.models.unets`` and whose ``forward`` takes a text conditioning (a parameter named like
``encoder_hidden_states``, ``text_*``, ``cap_feats``, ``input_ids`` ...). Every such class is either in
:data:`~daamkit.capture.families.FAMILIES` or in :data:`NOT_SUPPORTED` with the reason; a test fails
when diffusers gains one that neither mentions.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from dataclasses import dataclass

from daamkit.capture.families import FAMILIES

_TEXT_PARAMS = ("encoder_hidden_states", "text", "context", "prompt", "cap_feats", "input_ids", "clip_text")

_VIDEO = "video: not built yet (its family entry and tiny pipeline are missing)"
_AUDIO = "audio, not images"

#: Denoisers with text conditioning that daamkit does not trace, and why.
NOT_SUPPORTED: dict[str, str] = {
    **{name: _VIDEO for name in (
        "AllegroTransformer3DModel", "AnyFlowFARTransformer3DModel", "AnyFlowTransformer3DModel",
        "ChronoEditTransformer3DModel", "ConsisIDTransformer3DModel",
        "CosmosTransformer3DModel", "Cosmos3OmniTransformer", "EasyAnimateTransformer3DModel",
        "HeliosTransformer3DModel", "HunyuanVideoFramepackTransformer3DModel", "I2VGenXLUNet",
        "Kandinsky5Transformer3DModel", "Kandinsky6Transformer3DModel", "LatteTransformer3DModel",
        "MiniMaxH3Transformer3DModel", "MotifVideoTransformer3DModel", "SanaWMLTX2RefinerTransformer3DModel",
        "SanaWMTransformer3DModel", "SkyReelsV2Transformer3DModel", "TransformerTemporalModel",
        "UNet3DConditionModel", "UNetSpatioTemporalConditionModel",
        "WanAnimate2Transformer3DModel", "WanAnimateTransformer3DModel",
        "WanVACETransformer3DModel", "JoyImageEditPlusTransformer3DModel", "JoyImageEditTransformer3DModel",
    )},
    **{name: _AUDIO for name in (
        "AceStepTransformer1DModel", "LongCatAudioDiTTransformer", "MiniMaxMusic3Transformer1DModel",
        "StableAudio3DiTModel", "StableAudioDiTModel",
    )},
    "PriorTransformer": "unCLIP prior: maps text to an image embedding, no image tokens",
    "UVit2DModel": "aMUSEd masked-token model: no diffusion pipeline to trace yet",
    "StableCascadeUNet": "Würstchen/Stable Cascade: not built yet",
    "Kandinsky3UNet": "not built yet",
    "Transformer2DModel": "generic block container (PixArt and latent-diffusion use their own classes)",
    "LuminaNextDiT2DModel": "Lumina-Next, superseded by Lumina-Image 2: not built yet",
    "CogView3PlusTransformer2DModel": "not built yet",
    "DreamLiteTransformer2DModel": "not built yet",
    "DreamLiteUNetModel": "not built yet",
    "BriaTransformer2DModel": "not built yet",
    "BriaFiboTransformer2DModel": "not built yet",
    "BriaFibo2Transformer2DModel": "not built yet",
    "ErnieImageTransformer2DModel": "not built yet",
    "Flux3Transformer2DModel": "not built yet",
    "GlmImageTransformer2DModel": "not built yet",
    "HunyuanImageTransformer2DModel": "not built yet",
    "Ideogram4Transformer2DModel": "not built yet",
    "Krea2Transformer2DModel": "not built yet",
    "LongCatImageTransformer2DModel": "not built yet",
    "NucleusMoEImageTransformer2DModel": "not built yet",
    "OmniGenTransformer2DModel": "text and image share one causal sequence of a language model: not built yet",
    "OvisImageTransformer2DModel": "not built yet",
    "PRXTransformer2DModel": "not built yet",
    "QwenImage21Transformer2DModel": "not built yet",
}


@dataclass(frozen=True)
class Row:
    denoiser: str
    module: str
    family: str | None  # the FAMILIES entry, or None
    status: str  # "supported" or the reason it is not
    pipelines: tuple[str, ...] = ()
    tests: str = ""


def text_conditioned_denoisers() -> dict[str, str]:
    """Class name -> module of every text-conditioned denoiser the installed diffusers defines."""
    from diffusers import ModelMixin

    found: dict[str, str] = {}
    for pkg_name in ("diffusers.models.transformers", "diffusers.models.unets"):
        pkg = importlib.import_module(pkg_name)
        for info in pkgutil.iter_modules(pkg.__path__):
            try:
                mod = importlib.import_module(f"{pkg_name}.{info.name}")
            except Exception:  # a module whose optional dependency is missing defines nothing we can trace
                continue
            for name, cls in vars(mod).items():
                if not (inspect.isclass(cls) and issubclass(cls, ModelMixin) and cls.__module__ == mod.__name__):
                    continue
                params = list(inspect.signature(cls.forward).parameters)
                if any(any(t in p for t in _TEXT_PARAMS) for p in params):
                    found[name] = info.name
    return found


def coverage() -> list[Row]:
    """One row per text-conditioned denoiser of the installed diffusers, supported ones first."""
    rows = []
    for name, module in sorted(text_conditioned_denoisers().items()):
        fam = next((f for f in FAMILIES if name in f.denoisers), None)
        if fam is not None:
            rows.append(Row(name, module, fam.name, "supported", fam.pipelines, fam.tests_of(name)))
        else:
            rows.append(Row(name, module, None, NOT_SUPPORTED.get(name, "not listed")))
    return sorted(rows, key=lambda r: (r.family is None, r.family or "", r.denoiser))


def markdown_table(rows: list[Row]) -> str:
    """The README table: supported families, then the rest with their reasons."""
    lines = ["| denoiser | family | status | tested pipelines | tests |", "|---|---|---|---|---|"]
    for r in rows:
        pipes = ", ".join(f"`{p}`" for p in r.pipelines)
        tests = f"`{r.tests}`" if r.tests else ""
        lines.append(f"| `{r.denoiser}` | {r.family or ''} | {r.status} | {pipes} | {tests} |")
    return "\n".join(lines)
