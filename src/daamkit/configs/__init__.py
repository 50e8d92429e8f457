"""Configs of real pipelines, written in the repo, and random-weight builds of them (nothing is downloaded).

Each folder under ``daamkit/configs/`` is laid out like a diffusers model folder without weights:
``model_index.json`` names the pipeline and its component classes, and each component has its
``config.json`` (``scheduler/scheduler_config.json`` for the scheduler). Tokenizers are built offline
(:mod:`daamkit.vocab` gives Stable Diffusion's CLIP ids).

```python
from daamkit.configs import build_random_pipeline, parameter_counts
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

To add a model: write ``configs/NAME/`` (``model_index.json`` + component configs) and, where its
tokenizers are not CLIP's, add a factory to ``TOKENIZER_FACTORIES``.
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


def _construct(name: str, component: str) -> nn.Module:
    library, class_name = components(name)[component]
    cls = _class(library, class_name)
    d = config_dir(name) / component
    if library == "transformers":
        return cls(cls.config_class.from_pretrained(str(d)))
    return cls.from_config(cls.load_config(str(d)))


def build_model(
    name: str,
    component: str,
    *,
    device: str | torch.device = "meta",
    dtype=torch.float32,
    seed: int = 0,
    init: str = "fast",
) -> nn.Module:
    """One model component (``unet``, ``vae``, ``text_encoder``, ...) with random weights, in eval mode.

    ``device="meta"`` builds it without memory (for parameter counts); ``init`` is ``"fast"`` (seeded pool,
    see the module docstring) or ``"default"`` (the libraries' initialisers, slow on CPU).
    """
    if init not in ("fast", "default"):
        raise ValueError(f"init must be 'fast' or 'default', got {init!r}")
    device = torch.device(device)
    if device.type == "meta":
        with torch.device("meta"):
            model = _construct(name, component)
    elif init == "default":
        with torch.random.fork_rng(devices=[]), torch.device(device):  # leave the global RNG as it was
            torch.manual_seed(seed)
            model = _construct(name, component)
        _cast(model, dtype)
    else:
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):  # parameters on meta, buffers real
            model = _construct(name, component)
        buffers = {n: b for n, b in model.named_buffers()}
        model.to_empty(device=device)
        for n, b in buffers.items():  # to_empty also emptied the buffers (e.g. CLIP's position_ids)
            owner, _, leaf = n.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = b.to(device)
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
        from ..vocab import clip_tokenizer

        with tempfile.TemporaryDirectory() as tmp:
            return clip_tokenizer(tmp, pad_token=pad_token)

    return make


# tokenizer component name -> factory; SD 1.x/2.x "tokenizer" and SDXL "tokenizer_2" are CLIP BPE with the real ids.
TOKENIZER_FACTORIES: dict[str, Callable[[], Any]] = {
    "tokenizer": _clip_tokenizer("<|endoftext|>"),
    "tokenizer_2": _clip_tokenizer("!"),
}


def parameter_counts(name: str) -> dict[str, int]:
    """Parameters of each model component, counted on the meta device (no memory, about a second)."""
    out = {}
    for comp, (library, class_name) in components(name).items():
        cls = _class(library, class_name)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            model = build_model(name, comp, device="meta")
            out[comp] = sum(p.numel() for p in model.parameters())
    return out


def build_random_pipeline(
    name: str, dtype=torch.float32, device: str | torch.device = "cpu", seed: int = 0, init: str = "fast"
):
    """The pipeline of config ``name`` (e.g. ``"sd15"``) with random weights, on ``device`` in ``dtype``.

    Schedulers come from their configs, tokenizers from ``TOKENIZER_FACTORIES`` (offline), and the
    safety checker / feature extractor are left out. SD 1.5 at fp32 takes ~4.3 GB and 6-20 s on CPU.
    """
    index = model_index(name)
    pipe_cls = _class("diffusers", index["_class_name"])
    kwargs: dict[str, Any] = {}
    for i, (comp, (library, class_name)) in enumerate(components(name).items()):
        cls = _class(library, class_name)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            kwargs[comp] = build_model(name, comp, device=device, dtype=dtype, seed=seed + i, init=init)
        elif comp.startswith("tokenizer"):
            if comp not in TOKENIZER_FACTORIES:
                raise NotImplementedError(f"no offline tokenizer factory for {name}/{comp}")
            kwargs[comp] = TOKENIZER_FACTORIES[comp]()
        else:  # scheduler
            kwargs[comp] = cls.from_config(load_config(name, comp))
    for key, value in index.items():  # components shipped as [null, null], e.g. safety_checker
        if not key.startswith("_") and isinstance(value, list) and len(value) == 2 and value[0] is None:
            kwargs[key] = None
    if "requires_safety_checker" in index:
        kwargs["requires_safety_checker"] = index["requires_safety_checker"]
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
]
