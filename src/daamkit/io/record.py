"""Save and load a whole run: image, prompt, seed, settings and heat maps.

A record is a pair of files sharing a stem::

    <stem>.safetensors   tensors: "maps" float32 (T, h, w); "image" uint8 (H, W, C) if there is an image
    <stem>.json          format "daamkit.run", format_version 1, prompt, negative_prompt, seed, settings,
                         meta, the heat maps' alignment / image_size / meta, the tensors' names, dtypes
                         and shapes, and the sha256 of the .safetensors file

One record holds one image (a batch is saved as one record per image, e.g. ``run_0``, ``run_1``):
this keeps every file self-contained and lets a record be copied, deleted or compared on its own.

Guarantees:

* Exact round trip: ``torch.equal`` maps, identical image bytes and mode, equal dicts. Because JSON has no
  tuples, int keys, NaN or inf, ``save`` refuses settings/meta holding them instead of returning
  something different from what was saved.
* No pickle anywhere: safetensors for tensors, JSON for the rest, so loading a file from someone else
  cannot run code.
* Atomic writes: both files are written to temporary names and moved into place with ``os.replace``,
  the JSON last. The JSON carries the checksum of the tensor file, so a pair left inconsistent by a crash
  or a later edit is reported rather than read.
* Damaged or foreign inputs raise :class:`RecordError` (a ``ValueError``) saying what is wrong.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import operator
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from daamkit.errors import DaamkitError
from daamkit.heatmap import GlobalHeatMap
from daamkit.tokens import TokenAlignment

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "RecordError",
    "RunRecord",
    "load_record",
    "record_paths",
    "save_record",
]

FORMAT_NAME = "daamkit.run"
FORMAT_VERSION = 1
MAPS_TENSOR = "maps"
IMAGE_TENSOR = "image"

_WHAT = (
    "a daamkit run record is a pair <stem>.safetensors + <stem>.json written by daamkit.io.record "
    "(RunRecord.save)"
)
# Image modes stored byte-exactly (uint8 HWC with this many channels); others are converted to RGB.
_MODES = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}
_MODE_FOR_CHANNELS = {c: m for m, c in _MODES.items()}


class RecordError(DaamkitError, ValueError):
    """A file is not a (complete, undamaged, supported) daamkit run record."""


def record_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(<stem>.safetensors, <stem>.json)`` for a stem or either file's path."""
    p = Path(path)
    # Only strip our own suffixes: a stem like "runs/dog.v2" must keep its dot part.
    stem = p.with_suffix("") if p.suffix in (".json", ".safetensors") else p
    return Path(f"{stem}.safetensors"), Path(f"{stem}.json")


def _json_problem(obj: Any, where: str) -> str | None:
    """Why ``obj`` would not come back equal from JSON, or None if it would."""
    if obj is None or isinstance(obj, (bool, str)):
        return None
    if isinstance(obj, int):
        return None if type(obj) is int else f"{where} is a {type(obj).__name__}, not a plain int"
    if isinstance(obj, float):
        if type(obj) is not float:
            return f"{where} is a {type(obj).__name__}, not a plain float"
        return None if math.isfinite(obj) else f"{where} is {obj} (JSON has no NaN/inf)"
    if isinstance(obj, list):
        for i, v in enumerate(obj):
            if (msg := _json_problem(v, f"{where}[{i}]")) is not None:
                return msg
        return None
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str):
                return f"{where} has a non-string key {k!r} (JSON keys are strings)"
            if (msg := _json_problem(v, f"{where}[{k!r}]")) is not None:
                return msg
        return None
    if isinstance(obj, tuple):
        return f"{where} is a tuple (JSON gives back a list; use a list)"
    return f"{where} is a {type(obj).__name__}, which JSON cannot hold"


def _require_json_safe(obj: Any, where: str) -> None:
    if (msg := _json_problem(obj, where)) is not None:
        raise ValueError(f"cannot save exactly: {msg}")


@dataclass(eq=True)
class RunRecord:
    """Everything needed to look at one generated image's heat maps again later."""

    prompt: str
    image: PIL.Image.Image | None
    heat_maps: GlobalHeatMap
    seed: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # JSON-safe: steps, guidance, model, ...
    negative_prompt: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # anything else, JSON-safe

    def save(self, path: str | os.PathLike[str]) -> tuple[Path, Path]:
        """Write ``<stem>.safetensors`` and ``<stem>.json`` (``path``: stem or either file name).

        Returns the two paths. Raises ValueError for content that would not round-trip exactly.
        """
        return save_record(self, path)

    @classmethod
    def load(cls, path: str | os.PathLike[str], verify: bool = True) -> RunRecord:
        """Read a record from its stem or either file; see :func:`load_record`."""
        return load_record(path, verify=verify)


# -- saving -------------------------------------------------------------------------------------------------
def _image_array(image: PIL.Image.Image) -> tuple[np.ndarray, str]:
    # Modes outside _MODES (P, CMYK, I;16, ...) have no faithful uint8 HWC form: store them as RGB.
    mode = image.mode if image.mode in _MODES else "RGB"
    arr = np.array(image.convert(mode) if mode != image.mode else image, dtype=np.uint8)  # writable copy
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return np.ascontiguousarray(arr), mode


def _write_atomic(path: Path, data: bytes) -> Path:
    """Write ``data`` to a new temporary file next to ``path``, fsync it and return its path.

    Same folder so that ``os.replace`` is an atomic rename; created with ``os.open(..., 0o666)`` rather
    than ``tempfile.mkstemp`` so the final file gets the usual umask permissions, not 0600.
    """
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return tmp


def save_record(record: RunRecord, path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write ``record`` as ``<stem>.safetensors`` + ``<stem>.json``; returns both paths."""
    st_path, json_path = record_paths(path)
    gm = record.heat_maps
    if not isinstance(gm, GlobalHeatMap):
        raise TypeError(f"heat_maps must be a GlobalHeatMap (one record per image), got {type(gm).__name__}")
    if not isinstance(record.prompt, str):
        raise TypeError(f"prompt must be a str, got {type(record.prompt).__name__}")
    if record.negative_prompt is not None and not isinstance(record.negative_prompt, str):
        raise TypeError(f"negative_prompt must be a str or None, got {type(record.negative_prompt).__name__}")
    seed = None
    if record.seed is not None:
        if isinstance(record.seed, bool):
            raise TypeError("seed must be an int or None, got a bool")
        seed = operator.index(record.seed)  # accepts numpy ints, stores a plain int
    for name, value in (("settings", record.settings), ("meta", record.meta), ("heat_maps.meta", gm.meta)):
        if not isinstance(value, dict):
            raise TypeError(f"{name} must be a dict, got {type(value).__name__}")
        _require_json_safe(value, name)

    tensors = {MAPS_TENSOR: gm.maps.detach().cpu().to(torch.float32).contiguous()}
    image_info = None
    if record.image is not None:
        arr, mode = _image_array(record.image)
        if (arr.shape[0], arr.shape[1]) != gm.image_size:
            raise ValueError(
                f"image is (height, width) = {arr.shape[:2]} but the heat maps are for {gm.image_size}"
            )
        tensors[IMAGE_TENSOR] = torch.from_numpy(arr)
        image_info = {"tensor": IMAGE_TENSOR, "mode": mode, "source_mode": record.image.mode}
    data = st_save(tensors, metadata={"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)})

    from daamkit._version import __version__

    doc = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "written_by": f"daamkit {__version__}",
        "prompt": record.prompt,
        "negative_prompt": record.negative_prompt,
        "seed": seed,
        "settings": record.settings,
        "meta": record.meta,
        "heat_maps": {
            "tensor": MAPS_TENSOR,
            "image_size": list(gm.image_size),
            "grid_size": list(gm.grid_size),
            "alignment": gm.alignment.to_dict(),
            "meta": gm.meta,
        },
        "image": image_info,
        "tensors": {
            k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
            for k, v in tensors.items()
        },
        "safetensors_sha256": hashlib.sha256(data).hexdigest(),
    }
    text = json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False) + "\n"

    st_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_st = _write_atomic(st_path, data)
    try:
        tmp_json = _write_atomic(json_path, text.encode("utf-8"))
    except BaseException:
        os.unlink(tmp_st)
        raise
    # Tensors first, JSON last: a crash in between leaves either no JSON (reported as a missing sidecar)
    # or an old JSON whose checksum does not match the new tensors (reported as a mismatch).
    try:
        os.replace(tmp_st, st_path)
        os.replace(tmp_json, json_path)
    except BaseException:
        for tmp in (tmp_st, tmp_json):
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    return st_path, json_path


# -- loading -------------------------------------------------------------------------------------------------
def _fail(path: Path, problem: str) -> RecordError:
    return RecordError(f"{path}: {problem}; {_WHAT}")


def _safetensors_header(data: bytes, path: Path) -> dict[str, Any]:
    """Parse the safetensors header ourselves so truncation gets its own message."""
    if len(data) < 8:
        raise _fail(path, f"truncated safetensors file ({len(data)} bytes, not even a header)")
    n = int.from_bytes(data[:8], "little")
    if 8 + n > len(data):
        raise _fail(path, f"truncated safetensors file (header says {n} bytes, file has {len(data) - 8})")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _fail(path, "damaged safetensors file (header is not valid JSON)") from None
    if not isinstance(header, dict):
        raise _fail(path, "damaged safetensors file (header is not a JSON object)")
    body = len(data) - 8 - n
    ends = [
        v["data_offsets"][1]
        for k, v in header.items()
        if k != "__metadata__"
        and isinstance(v, dict)
        and isinstance(v.get("data_offsets"), list)
        and len(v["data_offsets"]) == 2
    ]
    if ends and max(ends) > body:
        raise _fail(
            path, f"truncated safetensors file (tensor data needs {max(ends)} bytes, file has {body})"
        )
    return header


def _get(doc: dict[str, Any], key: str, types: type | tuple[type, ...], path: Path) -> Any:
    if key not in doc:
        raise _fail(path, f"missing field {key!r}")
    value = doc[key]
    if not isinstance(value, types):
        raise _fail(path, f"field {key!r} has the wrong type ({type(value).__name__})")
    return value


def load_record(path: str | os.PathLike[str], verify: bool = True) -> RunRecord:
    """Load a record from its stem, ``<stem>.json`` or ``<stem>.safetensors``.

    ``verify=False`` skips the sha256 check (the structure is still checked). Raises
    ``FileNotFoundError`` if neither file exists and :class:`RecordError` for anything damaged, foreign,
    incomplete or too new.
    """
    st_path, json_path = record_paths(path)
    if not json_path.exists():
        if st_path.exists():
            raise _fail(st_path, f"missing sidecar {json_path.name} (the JSON half of the record)")
        raise FileNotFoundError(f"no daamkit record at {path} (looked for {json_path} and {st_path})")

    # -- the JSON half: is this ours, and can we read this version?
    try:
        doc = json.loads(json_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _fail(json_path, f"not valid JSON ({e}); truncated or not a record") from None
    if not isinstance(doc, dict) or "format" not in doc:
        raise _fail(json_path, "foreign JSON file (no 'format' field)")
    if doc["format"] != FORMAT_NAME:
        raise _fail(json_path, f"foreign file: format is {doc['format']!r}, expected {FORMAT_NAME!r}")
    version = doc.get("format_version")
    if type(version) is not int or version < 1:
        raise _fail(json_path, f"invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise _fail(
            json_path,
            f"format_version {version} is newer than this daamkit reads (up to {FORMAT_VERSION}); "
            "upgrade daamkit",
        )

    # -- the tensor half: present, complete, the file the JSON was written with
    if not st_path.exists():
        raise _fail(json_path, f"missing tensor file {st_path.name} (the safetensors half of the record)")
    data = st_path.read_bytes()
    header = _safetensors_header(data, st_path)
    expected_sha = _get(doc, "safetensors_sha256", str, json_path)
    if verify and hashlib.sha256(data).hexdigest() != expected_sha:
        raise _fail(
            st_path,
            f"checksum mismatch with {json_path.name}: the tensor file was changed or replaced after the "
            "record was written (or the pair does not belong together)",
        )
    meta = header.get("__metadata__") or {}
    if meta.get("format", FORMAT_NAME) != FORMAT_NAME:
        raise _fail(st_path, f"foreign safetensors file (format {meta.get('format')!r})")
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error types; all mean a damaged file
        raise _fail(st_path, f"damaged safetensors file ({e})") from None

    # -- the heat maps
    hm = _get(doc, "heat_maps", dict, json_path)
    declared = _get(doc, "tensors", dict, json_path)
    maps_name = _get(hm, "tensor", str, json_path)
    maps = _tensor(tensors, maps_name, "the heat maps", declared, torch.float32, st_path)
    if maps.ndim != 3:
        raise _fail(
            st_path, f"shape mismatch: tensor {maps_name!r} has shape {list(maps.shape)}, not (T, h, w)"
        )
    try:
        alignment = TokenAlignment.from_dict(_get(hm, "alignment", dict, json_path))
    except RecordError:
        raise
    except Exception as e:
        raise _fail(json_path, f"invalid token alignment ({type(e).__name__}: {e})") from None
    image_size = _get(hm, "image_size", list, json_path)
    hm_meta = _get(hm, "meta", dict, json_path)
    try:
        heat_maps = GlobalHeatMap(maps, alignment, image_size, hm_meta)
    except ValueError as e:
        raise _fail(json_path, f"shape mismatch: {e}") from None

    # -- the image
    image = None
    image_info = doc.get("image")
    if image_info is not None:
        if not isinstance(image_info, dict):
            raise _fail(json_path, "field 'image' has the wrong type")
        name = _get(image_info, "tensor", str, json_path)
        mode = _get(image_info, "mode", str, json_path)
        arr_t = _tensor(tensors, name, "the image", declared, torch.uint8, st_path)
        if mode not in _MODES:
            raise _fail(json_path, f"unsupported image mode {mode!r}")
        if (
            arr_t.ndim != 3
            or arr_t.shape[2] != _MODES[mode]
            or tuple(arr_t.shape[:2]) != heat_maps.image_size
        ):
            raise _fail(
                st_path,
                f"shape mismatch: image tensor {list(arr_t.shape)} does not fit mode {mode} and image size "
                f"{list(heat_maps.image_size)}",
            )
        arr = arr_t.numpy()
        image = PIL.Image.fromarray(arr[:, :, 0] if mode == "L" else arr)
        if image.mode != mode:
            raise _fail(json_path, f"image mode {image.mode} does not match the declared {mode}")

    seed = doc.get("seed")
    if seed is not None and type(seed) is not int:
        raise _fail(json_path, f"field 'seed' has the wrong type ({type(seed).__name__})")
    negative = doc.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        raise _fail(json_path, "field 'negative_prompt' has the wrong type")
    return RunRecord(
        prompt=_get(doc, "prompt", str, json_path),
        image=image,
        heat_maps=heat_maps,
        seed=seed,
        settings=_get(doc, "settings", dict, json_path),
        negative_prompt=negative,
        meta=_get(doc, "meta", dict, json_path),
    )


def _tensor(
    tensors: dict[str, torch.Tensor], name: str, what: str, declared: dict[str, Any], dtype: torch.dtype,
    path: Path,
) -> torch.Tensor:
    """Tensor ``name`` of the file (``what`` it holds, for the message), checked by :func:`_check_tensor`."""
    if name not in tensors:
        raise _fail(path, f"missing tensor {name!r} ({what})")
    t = tensors[name]
    _check_tensor(t, name, declared, dtype, path)
    return t


def _check_tensor(
    t: torch.Tensor, name: str, declared: dict[str, Any], dtype: torch.dtype, path: Path
) -> None:
    if t.dtype != dtype:
        raise _fail(path, f"tensor {name!r} has dtype {t.dtype}, expected {dtype}")
    spec = declared.get(name)
    if isinstance(spec, dict) and spec.get("shape") != list(t.shape):
        raise _fail(
            path, f"shape mismatch: tensor {name!r} is {list(t.shape)}, the JSON says {spec.get('shape')}"
        )
