"""Configs of real pipelines, written in the repo, and random-weight builds of them (nothing is downloaded).

Each folder under ``daamkit/testing/configs/`` is laid out like a diffusers model folder without weights:
``model_index.json`` names the pipeline and its component classes, and each component has its
``config.json`` (``scheduler/scheduler_config.json`` for the scheduler). Tokenizers are built offline
(:mod:`daamkit.testing.tokenizers` gives Stable Diffusion's CLIP ids).

```python
from daamkit.testing.configs import build_random_pipeline, parameter_counts
pipe = build_random_pipeline("sd15")            # full-size SD 1.5, random weights, ~4.3 GB fp32
parameter_counts("sd15")                         # {'unet': 859520964, ...} on the meta device, no memory
```

Random weights are for benchmarks and plumbing tests only: images are noise. ``init="fast"`` (default)
builds every module on the meta device, allocates the parameters once and fills them from one seeded
pool of standard-normal numbers, scaled per parameter to the variance of PyTorch's default init
(norm weights 1, norm biases 0, embeddings std 0.02). On 2 shared CPU cores SD 1.5 builds in 6-20 s,
almost all of it the kernel faulting in 4.3 GB of fresh pages (the fill itself is ~0.5 s), against
~18 s for the UNet alone with ``init="default"`` (the libraries' own initialisers). Values repeat
with the pool's period, which is harmless for timing but means the weights are not i.i.d.

Shipped: ``sd15`` (Stable Diffusion 1.5), ``sd3`` (SD3-medium: MM-DiT 2.03B, CLIP-L, OpenCLIP bigG,
T5-XXL encoder, 16-channel VAE) and ``flux`` (Flux.1-dev: 19 double + 38 single blocks, 11.9B, CLIP-L,
T5-XXL encoder, 16-channel VAE). The configs are the released ones; what a machine cannot hold is cut
at build time and said so: ``without=`` leaves components out (SD3 runs without T5: its part of the
context is zeros) and ``overrides=`` changes config entries of one component (e.g. fewer Flux blocks).

```python
pipe = build_random_pipeline("sd3", without=("text_encoder_3", "tokenizer_3"))
pipe = build_random_pipeline("flux", overrides={"transformer": {"num_layers": 2, "num_single_layers": 4}})
```

T5 tokenizers are a small sentencepiece model trained here (:func:`daamkit.testing.tokenizers.t5_tokenizer`; the real T5
vocabulary is not available offline): the code path is T5's, the ids are not.

To add a model: write ``testing/configs/NAME/`` (``model_index.json`` + component configs) and, where its
tokenizers are not CLIP's or T5's, add a factory to ``TOKENIZER_FACTORIES``.
"""

from __future__ import annotations

import importlib
import json
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

CONFIG_ROOT = Path(__file__).resolve().parent
_POOL_SIZE = 1 << 22  # 4M fp32 values (16 MB), period of the fast init


def available() -> list[str]:
    """Names of the configs shipped in the package (folders with a ``model_index.json``)."""
    return sorted(p.parent.name for p in CONFIG_ROOT.glob("*/model_index.json"))


def config_dir(name: str) -> Path:
    d = CONFIG_ROOT / name
    if not (d / "model_index.json").is_file():
        raise ValueError(f"no config named {name!r}; available: {', '.join(available()) or 'none'}")
    return d


def model_index(name: str) -> dict[str, Any]:
    return json.loads((config_dir(name) / "model_index.json").read_text(encoding="utf-8"))


def components(name: str) -> dict[str, tuple[str, str]]:
    """Component name -> (library, class name), for the components that have a class (not ``None``)."""
    out = {}
    for key, value in model_index(name).items():
        if key.startswith("_") or not isinstance(value, list) or len(value) != 2 or value[0] is None:
            continue
        out[key] = (value[0], value[1])
    return out


def _class(library: str, class_name: str) -> type:
    return getattr(importlib.import_module(library), class_name)


def load_config(name: str, component: str) -> dict[str, Any]:
    d = config_dir(name) / component
    path = d / "scheduler_config.json" if (d / "scheduler_config.json").is_file() else d / "config.json"
    return json.loads(path.read_text(encoding="utf-8"))


def _construct(name: str, component: str, overrides: dict[str, Any] | None = None) -> nn.Module:
    library, class_name = components(name)[component]
    cls = _class(library, class_name)
    d = config_dir(name) / component
    overrides = dict(overrides or {})
    if library == "transformers":
        config = cls.config_class.from_pretrained(str(d))
        for key, value in overrides.items():
            # a dotted key reaches into a sub-config ("text_config.num_hidden_layers" of a VLM)
            *path, leaf = key.split(".")
            target = config
            for part in path:
                target = getattr(target, part, None)
            if target is None or not hasattr(target, leaf):
                raise KeyError(f"{name}/{component}: {class_name} config has no {key!r}")
            setattr(target, leaf, value)
            layer_types = getattr(target, "layer_types", None)
            if leaf == "num_hidden_layers" and isinstance(layer_types, list) and len(layer_types) > value:
                # per-layer attention kinds (Gemma 2's sliding/global alternation) keep their order
                target.layer_types = layer_types[:value]
        return cls(config)
    config = cls.load_config(str(d))
    unknown = set(overrides) - set(config)
    if unknown:
        raise KeyError(f"{name}/{component}: config has no {sorted(unknown)}")
    config.update(overrides)
    return cls.from_config(config)


def build_model(
    name: str,
    component: str,
    *,
    device: str | torch.device = "meta",
    dtype=torch.float32,
    seed: int = 0,
    init: str = "fast",
    overrides: dict[str, Any] | None = None,
) -> nn.Module:
    """One model component (``unet``, ``vae``, ``text_encoder``, ...) with random weights, in eval mode.

    ``device="meta"`` builds it without memory (for parameter counts); ``init`` is ``"fast"`` (seeded pool,
    see the module docstring) or ``"default"`` (the libraries' initialisers, slow on CPU); ``overrides``
    replaces entries of the component's config (e.g. ``{"num_layers": 2}``).
    """
    if init not in ("fast", "default"):
        raise ValueError(f"init must be 'fast' or 'default', got {init!r}")
    device = torch.device(device)
    if device.type == "meta":
        with torch.device("meta"):
            model = _construct(name, component, overrides)
    elif init == "default":
        with torch.random.fork_rng(devices=[]), torch.device(device):  # leave the global RNG as it was
            torch.manual_seed(seed)
            model = _construct(name, component, overrides)
        _cast(model, dtype)
    else:
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):  # parameters on meta, buffers real
            model = _construct(name, component, overrides)
        buffers = {n: b for n, b in model.named_buffers()}
        model.to_empty(device=device)
        for n, b in buffers.items():  # to_empty also emptied the buffers (e.g. CLIP's position_ids)
            owner, _, leaf = n.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = b.to(device)
        if callable(getattr(model, "tie_weights", None)):
            # to_empty (meta -> device) makes a new Parameter per module, which unties transformers' tied
            # weights (T5's encoder.embed_tokens = shared): tie again, or the embedding exists twice
            model.tie_weights()
        _cast(model, dtype)
        _fast_init_(model, seed)
    model.requires_grad_(False)
    return model.eval()


def _cast(model: nn.Module, dtype: torch.dtype) -> None:
    if any(p.dtype != dtype for p in model.parameters()):
        nn.Module.to(model, dtype=dtype)  # plain torch cast: diffusers' own .to() warns about fp32 modules


@torch.no_grad()
def _fast_init_(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    pool = torch.randn(_POOL_SIZE, generator=g).to(device)
    offsets = torch.randint(0, _POOL_SIZE, (1 << 16,), generator=g).tolist()
    k = 0
    for module in model.modules():
        is_norm = "norm" in type(module).__name__.lower()
        weight = module._parameters.get("weight")
        fan_in = weight[0].numel() if weight is not None and weight.ndim >= 2 else None
        for pname, p in module._parameters.items():
            if p is None:
                continue
            if is_norm and p.ndim == 1:
                p.fill_(1.0 if pname == "weight" else 0.0)
                continue
            if isinstance(module, nn.Embedding):
                std = 0.02
            elif p.ndim >= 2:
                std = 1.0 / math.sqrt(3 * p[0].numel())  # variance of kaiming_uniform_(a=sqrt(5))
            elif fan_in is not None:
                std = 1.0 / math.sqrt(3 * fan_in)  # bias of a linear / conv layer
            else:
                std = 0.02
            flat = p.view(-1)
            start = 0
            while start < flat.numel():
                o = offsets[k % len(offsets)]
                k += 1
                m = min(flat.numel() - start, _POOL_SIZE - o)
                flat[start : start + m].copy_(pool[o : o + m])
                start += m
            p.mul_(std)


def _clip_tokenizer(pad_token: str) -> Callable[[], Any]:
    def make():
        from daamkit.testing.tokenizers import clip_tokenizer

        with tempfile.TemporaryDirectory() as tmp:
            return clip_tokenizer(tmp, pad_token=pad_token)

    return make


def _t5_tokenizer() -> Any:
    from daamkit.testing.tokenizers import t5_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return t5_tokenizer(tmp)


def _family_tokenizer(module: str, function: str) -> Callable[[], Any]:
    """A tokenizer of :mod:`daamkit.testing.families` (small vocabulary trained offline, the family's real
    special tokens and chat template), built in a temporary folder."""

    def make():
        builder = getattr(importlib.import_module(f"daamkit.testing.families.{module}"), function)
        with tempfile.TemporaryDirectory() as tmp:
            return builder(tmp)  # fast tokenizers: held in memory, the folder is not read again

    return make


# Tokenizer factories, looked up by "<config>/<component>" first (the families whose tokenizers share a
# class name but not a vocabulary), then by the tokenizer's class name (T5 for SD3's tokenizer_3 and Flux's
# tokenizer_2), then by component name: SD 1.x/2.x/SD3/Flux "tokenizer" and SDXL/SD3 "tokenizer_2" are
# CLIP BPE with the real ids (pad "<|endoftext|>" / "!").
TOKENIZER_FACTORIES: dict[str, Callable[[], Any]] = {
    "flux2-klein/tokenizer": _family_tokenizer("flux2", "qwen3_tokenizer"),
    "qwenimage/tokenizer": _family_tokenizer("qwenimage", "qwen2_5_vl_tokenizer"),
    "sana/tokenizer": _family_tokenizer("sana", "gemma_tokenizer"),
    "zimage/tokenizer": _family_tokenizer("zimage", "qwen3_tokenizer"),
    "T5TokenizerFast": _t5_tokenizer,
    "tokenizer": _clip_tokenizer("<|endoftext|>"),
    "tokenizer_2": _clip_tokenizer("!"),
}


def parameter_counts(name: str, overrides: dict[str, dict[str, Any]] | None = None) -> dict[str, int]:
    """Parameters of each model component, counted on the meta device (no memory, about a second).

    ``overrides``: component -> config entries to replace, as in :func:`build_random_pipeline`.
    """
    out = {}
    overrides = overrides or {}
    for comp, (library, class_name) in components(name).items():
        cls = _class(library, class_name)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            model = build_model(name, comp, device="meta", overrides=overrides.get(comp))
            out[comp] = sum(p.numel() for p in model.parameters())
    return out


def build_random_pipeline(
    name: str,
    dtype=torch.float32,
    device: str | torch.device = "cpu",
    seed: int = 0,
    init: str = "fast",
    *,
    without: tuple[str, ...] | list[str] = (),
    overrides: dict[str, dict[str, Any]] | None = None,
):
    """The pipeline of config ``name`` (e.g. ``"sd15"``) with random weights, on ``device`` in ``dtype``.

    Schedulers come from their configs, tokenizers from ``TOKENIZER_FACTORIES`` (offline), and the
    safety checker / feature extractor are left out. SD 1.5 at fp32 takes ~4.3 GB and 6-20 s on CPU.
    ``without``: components passed as ``None`` instead (e.g. SD3's ``text_encoder_3``/``tokenizer_3``);
    ``overrides``: component -> config entries to replace (e.g. ``{"transformer": {"num_layers": 2}}``).
    """
    index = model_index(name)
    pipe_cls = _class("diffusers", index["_class_name"])
    comps = components(name)
    overrides = overrides or {}
    unknown = (set(without) | set(overrides)) - set(comps)
    if unknown:
        raise ValueError(f"{name} has no component(s) {sorted(unknown)}; it has {sorted(comps)}")
    kwargs: dict[str, Any] = {}
    for i, (comp, (library, class_name)) in enumerate(comps.items()):
        cls = _class(library, class_name)
        if comp in without:
            kwargs[comp] = None
        elif isinstance(cls, type) and issubclass(cls, nn.Module):
            kwargs[comp] = build_model(
                name,
                comp,
                device=device,
                dtype=dtype,
                seed=seed + i,
                init=init,
                overrides=overrides.get(comp),
            )
        elif comp.startswith("tokenizer"):
            factory = (
                TOKENIZER_FACTORIES.get(f"{name}/{comp}")
                or TOKENIZER_FACTORIES.get(class_name)
                or TOKENIZER_FACTORIES.get(comp)
            )
            if factory is None:
                raise NotImplementedError(f"no offline tokenizer factory for {name}/{comp} ({class_name})")
            kwargs[comp] = factory()
        else:  # scheduler
            kwargs[comp] = cls.from_config(load_config(name, comp))
    for key, value in index.items():
        if key.startswith("_"):
            continue
        if isinstance(value, list) and len(value) == 2 and value[0] is None:
            kwargs[key] = None  # components shipped as [null, null], e.g. safety_checker
        elif not isinstance(value, list):
            kwargs[key] = value  # pipeline settings: requires_safety_checker, FLUX.2 klein's is_distilled
    return pipe_cls(**kwargs)


__all__ = [
    "CONFIG_ROOT",
    "TOKENIZER_FACTORIES",
    "available",
    "build_model",
    "build_random_pipeline",
    "components",
    "config_dir",
    "load_config",
    "model_index",
    "parameter_counts",
    "t5_tokenizer",
]
