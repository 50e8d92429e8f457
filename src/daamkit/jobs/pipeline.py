"""Loading a user's local pipeline the normal diffusers way, never downloading anything."""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
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


def available_devices() -> list[str]:
    """The torch devices this machine can run on, e.g. ``['cpu', 'cuda:0', 'cuda:1']``."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` if this machine has it, else :class:`ModelLoadError` naming the
    devices it has."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ModelLoadError(f"unknown device {str(device)!r}: use cpu, cuda, cuda:N or mps "
                             f"(available here: {', '.join(available_devices())})") from None
    have = available_devices()
    if dev.type == "cpu":
        return dev
    name = dev.type if dev.index is None else f"{dev.type}:{dev.index}"
    if not any(d == name or d.split(":")[0] == name for d in have):
        raise ModelLoadError(f"device {str(device)!r} is not available here; available: {', '.join(have)}")
    return dev


@contextlib.contextmanager
def _loading_bars(show: bool) -> Iterator[None]:
    """Hide diffusers' and transformers' loading bars for the duration, then restore their setting."""
    if show:
        yield
        return
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    before = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if before[0]:
            dlog.enable_progress_bar()
        if before[1]:
            tlog.enable_progress_bar()


def _damaged_file(folder: Path, exc: BaseException) -> str | None:
    """The weight file (relative to ``folder``) that a loading error is about, when its message or
    chain names one; diffusers' messages do not always say which component failed."""
    text = " ".join(str(e) for e in _chain(exc))
    for m in re.finditer(r"[\w./\\-]+\.(?:safetensors|bin|ckpt|pt)", text):
        p = Path(m.group(0))
        with contextlib.suppress(ValueError):
            return str(p.resolve().relative_to(folder.resolve()))
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _check_weight_files(folder: Path) -> None:
    """Name a damaged safetensors file before diffusers trips over it with a message that does not."""
    try:
        from safetensors import safe_open
    except ImportError:  # pragma: no cover - diffusers depends on it
        return
    for f in sorted(folder.glob("*/*.safetensors")):
        try:
            with safe_open(str(f), framework="pt") as st:
                for key in st.keys():  # reads the header and checks the offsets against the file size
                    st.get_slice(key)
        except Exception as e:  # noqa: BLE001 - any failure means the file cannot be loaded
            raise ModelLoadError(f"{f.relative_to(folder)}: cannot be read ({_short(e)}); the file is damaged or "
                                 f"incomplete: copy or save the model in {str(folder)!r} again") from e


def _short(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return first[:200]


def load_pipeline(
    path: str | os.PathLike[str],
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    config: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> Any:
    """Load a diffusers pipeline from a local folder (``model_index.json``), a single checkpoint file, or
    the name of a shipped shapes-world model (:data:`daamkit.world.WORLD_MODELS`; a local path of the
    same name wins).

    Offline only (``local_files_only=True``): a single-file checkpoint needs ``config``, a local
    diffusers folder of the same architecture, since diffusers would otherwise fetch one from the Hub.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not str(path).strip():
        raise ModelLoadError("the model path is empty: give a local diffusers folder or a checkpoint file")
    from daamkit.world import WORLD_MODELS, model_path

    if str(path) in WORLD_MODELS and not Path(path).exists():
        path = model_path(str(path))
    p = Path(path).expanduser()
    torch_dtype = parse_dtype(dtype)
    check_device(device)
    if not p.exists():
        raise ModelLoadError(f"model path {str(p)!r} does not exist (daamkit loads local models only, it never downloads; "
                             f"the shipped shapes-world models are {', '.join(WORLD_MODELS)})")
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
        _check_weight_files(p)
        try:
            with _loading_bars(progress):
                pipe = cls.from_pretrained(str(p), **kwargs, **extra)
        except Exception as e:  # diffusers raises many types; say which folder and file failed and why
            where = _damaged_file(p, e)
            raise ModelLoadError(f"could not load the pipeline in {str(p)!r}"
                                 f"{f' ({where})' if where else ''}: {_short(e)}") from e
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
            with _loading_bars(progress):
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
