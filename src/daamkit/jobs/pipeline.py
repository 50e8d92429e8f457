"""Loading a user's local pipeline the normal diffusers way, never downloading anything."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from daamkit.errors import DaamkitError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")


class ModelLoadError(DaamkitError, ValueError):
    pass


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {name!r}; use one of {', '.join(DTYPES)}") from None


def load_pipeline(
    path: str | os.PathLike[str],
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    config: str | os.PathLike[str] | None = None,
) -> Any:
    """Load a diffusers pipeline from a local folder (``model_index.json``) or a single checkpoint file.

    Offline only (``local_files_only=True``): a single-file checkpoint needs ``config``, a local
    diffusers folder of the same architecture, since diffusers would otherwise fetch one from the Hub.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    p = Path(path).expanduser()
    torch_dtype = parse_dtype(dtype)
    if not p.exists():
        raise ModelLoadError(f"model path {str(p)!r} does not exist (daamkit loads local models only, it never downloads)")
    kwargs: dict[str, Any] = {"local_files_only": True}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    if p.is_dir():
        index = p / "model_index.json"
        if not index.is_file():
            raise ModelLoadError(
                f"{str(p)!r} is not a diffusers pipeline folder: it has no model_index.json. Pass a folder saved "
                "with pipe.save_pretrained(...) or a single .safetensors/.ckpt checkpoint with --config"
            )
        try:
            cls_name = json.loads(index.read_text())["_class_name"]
        except (ValueError, KeyError) as e:
            raise ModelLoadError(f"{index} is not a valid model_index.json: {e}") from None
        import diffusers

        cls = getattr(diffusers, cls_name, None) or diffusers.DiffusionPipeline
        extra = {"safety_checker": None} if "safety_checker" in json.loads(index.read_text()) else {}
        try:
            pipe = cls.from_pretrained(str(p), **kwargs, **extra)
        except Exception as e:  # diffusers raises many types; say which folder failed and why
            raise ModelLoadError(f"could not load the pipeline in {str(p)!r}: {e}") from e
    elif p.suffix in SINGLE_FILE_SUFFIXES:
        if config is None:
            raise ModelLoadError(
                f"{p.name} is a single-file checkpoint: pass --config DIR, a local diffusers folder of the same "
                "architecture (model_index.json and component configs), because offline diffusers cannot fetch one"
            )
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        cls_name = json.loads((Path(config) / "model_index.json").read_text()).get("_class_name", "")
        cls = StableDiffusionXLPipeline if "XL" in cls_name else StableDiffusionPipeline
        try:
            pipe = cls.from_single_file(str(p), config=str(config), **kwargs)
        except Exception as e:
            raise ModelLoadError(f"could not load the checkpoint {str(p)!r} with config {str(config)!r}: {e}") from e
    else:
        raise ModelLoadError(
            f"{str(p)!r} is neither a diffusers folder nor a checkpoint file ({', '.join(SINGLE_FILE_SUFFIXES)})"
        )
    from daamkit.capture import detect_capture

    detect_capture(pipe)  # raises UnsupportedPipelineError naming the supported families
    return pipe.to(device)
