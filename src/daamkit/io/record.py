"""Save and load a whole run: image, prompt, seed, settings and heat maps.

A record is a pair of files sharing a stem::

    <stem>.safetensors   tensors: "maps" float32 (T, h, w); "image" uint8 (H, W, C) if there is an image
    <stem>.json          format "daamkit.run", format_version 1, prompt, negative_prompt, seed, settings,
                         meta, the heat maps' alignment / image_size / meta, the tensors' names, dtypes
                         and shapes, and the sha256 of the .safetensors file

One record holds one image (a batch is saved as one record per image, e.g. ``run_0``, ``run_1``):
this keeps every file self-contained and lets a record be copied, deleted or compared on its own.

A video's record (format_version 2) holds maps (T, F, h, w) with their time axis in the heat maps' meta
(``meta["time"]``, see :class:`daamkit.frames.TimeAxis`) and, instead of an image, the video's frames:
"frames" uint8 (frames, H, W, C), named in the JSON's "video" field. Image records are still written as
format_version 1, so a daamkit that predates videos keeps reading them; it refuses a video's record as
too new instead of misreading it.

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
* A record is untrusted input: every field of the JSON and of the safetensors header is checked for
  type and range before anything is built from it, and sizes are bounded (:data:`MAX_JSON_BYTES`,
  :data:`MAX_NESTING`, :data:`MAX_IMAGE_SIDE`, :data:`MAX_IMAGE_PIXELS`, :data:`MAX_VIDEO_FRAMES`,
  :data:`MAX_VIDEO_VOXELS`), so a crafted pair of small
  files cannot make a later ``expand()`` allocate gigabytes, read the padding token's map through a
  negative position, or exhaust the stack.
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
from daamkit.frames import TimeAxis
from daamkit.heatmap import GlobalHeatMap
from daamkit.tokens import TokenAlignment

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MAX_VIDEO_FRAMES",
    "RecordError",
    "RunRecord",
    "load_record",
    "record_paths",
    "save_record",
]

FORMAT_NAME = "daamkit.run"
FORMAT_VERSION = 2
IMAGE_FORMAT_VERSION = 1  # what image records are still written as
MAPS_TENSOR = "maps"
IMAGE_TENSOR = "image"
FRAMES_TENSOR = "frames"

# Bounds on what a record may ask for. A record's JSON is tiny (a few kB: the alignment, settings and
# meta), so 16 MiB leaves room for any plausible meta while refusing to parse a disguised data dump.
MAX_JSON_BYTES = 16 * 2**20
# Settings and meta are flat in practice; 64 levels is far beyond them and far below the interpreter's
# recursion limit, which json.loads, ==, deepcopy and a re-save all walk recursively.
MAX_NESTING = 64
# expand() allocates tokens x H x W float32: bound the image so that one word map stays at 256 MiB and a
# record cannot ask for more than a 16k-pixel side (4x beyond today's largest diffusers outputs).
MAX_IMAGE_SIDE = 16384
MAX_IMAGE_PIXELS = 2**26
# A video's word map expands to frames x H x W float32: 4 GiB at most (257 frames of 1280 x 720 is a
# quarter of that), and no more frames than a time axis of a few minutes at 24 fps.
MAX_VIDEO_FRAMES = 4096
MAX_VIDEO_VOXELS = 2**30
# Temporal patch and VAE compression of today's video models are 1 to 8.
MAX_TIME_FACTOR = 64
# torch.Generator.manual_seed accepts exactly this range.
_SEED_RANGE = (-(2**63), 2**64 - 1)
_MAX_MAX_LENGTH = 2**31 - 1
_DTYPES = {
    MAPS_TENSOR: ("float32", torch.float32),
    IMAGE_TENSOR: ("uint8", torch.uint8),
    FRAMES_TENSOR: ("uint8", torch.uint8),
}

_WHAT = (
    "a daamkit run record is a pair <stem>.safetensors + <stem>.json written by daamkit.io.record "
    "(RunRecord.save)"
)
# Image modes stored byte-exactly (uint8 HWC with this many channels); others are converted to RGB.
_MODES = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}
_MODE_FOR_CHANNELS = {c: m for m, c in _MODES.items()}
_FRAME_CHANNELS = (1, 3, 4)


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


@dataclass(eq=False)
class RunRecord:
    """Everything needed to look at one generated image's (or video's) heat maps again later.

    A video's record has ``image=None`` and its frames in ``frames``, a uint8 numpy array
    (frames, H, W, C) with C = 1, 3 or 4 (other inputs are read with :func:`daamkit.video.as_frames`).
    """

    prompt: str
    image: PIL.Image.Image | None
    heat_maps: GlobalHeatMap
    seed: int | None = None
    settings: dict[str, Any] = field(default_factory=dict)  # JSON-safe: steps, guidance, model, ...
    negative_prompt: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # anything else, JSON-safe
    frames: np.ndarray | None = None

    @property
    def is_video(self) -> bool:
        return self.heat_maps.is_video

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RunRecord):
            return NotImplemented
        same_frames = (self.frames is None) == (other.frames is None) and (
            self.frames is None or np.array_equal(self.frames, other.frames)
        )
        return same_frames and (
            self.prompt, self.image, self.heat_maps, self.seed, self.settings, self.negative_prompt, self.meta
        ) == (other.prompt, other.image, other.heat_maps, other.seed, other.settings, other.negative_prompt,
              other.meta)

    __hash__ = None  # type: ignore[assignment]

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


def _frames_array(frames: Any, gm: GlobalHeatMap) -> np.ndarray:
    if not gm.is_video:
        raise ValueError("frames belong to a video's record, but the heat maps are an image's (no time axis)")
    if isinstance(frames, np.ndarray) and frames.dtype == np.uint8 and frames.ndim == 4 \
            and frames.shape[-1] in _FRAME_CHANNELS:
        arr = np.ascontiguousarray(frames)
    else:
        from daamkit.video import as_frames

        arr = as_frames(frames)
    if arr.shape[0] != gm.num_frames or tuple(arr.shape[1:3]) != gm.image_size:
        raise ValueError(f"frames are (frames, height, width) = {arr.shape[:3]} but the heat maps are for "
                         f"{(gm.num_frames, *gm.image_size)}")
    return arr


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
    image_info = video_info = None
    if record.image is not None and record.frames is not None:
        raise ValueError("a record holds an image or a video's frames, not both")
    if gm.is_video and record.image is not None:
        raise ValueError("the heat maps are a video's: store its frames (frames=...), not an image")
    if record.frames is not None:
        tensors[FRAMES_TENSOR] = torch.from_numpy(_frames_array(record.frames, gm))
        video_info = {"tensor": FRAMES_TENSOR}
    if record.image is not None:
        arr, mode = _image_array(record.image)
        if (arr.shape[0], arr.shape[1]) != gm.image_size:
            raise ValueError(
                f"image is (height, width) = {arr.shape[:2]} but the heat maps are for {gm.image_size}"
            )
        tensors[IMAGE_TENSOR] = torch.from_numpy(arr)
        image_info = {"tensor": IMAGE_TENSOR, "mode": mode, "source_mode": record.image.mode}
    version = FORMAT_VERSION if gm.is_video else IMAGE_FORMAT_VERSION
    data = st_save(tensors, metadata={"format": FORMAT_NAME, "format_version": str(version)})

    from daamkit._version import __version__

    doc = {
        "format": FORMAT_NAME,
        "format_version": version,
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
        **({"video": video_info} if gm.is_video else {}),
        "tensors": {
            k: {"dtype": str(v.dtype).removeprefix("torch."), "shape": list(v.shape)}
            for k, v in tensors.items()
        },
        "safetensors_sha256": hashlib.sha256(data).hexdigest(),
    }
    write_pair(st_path, json_path, data, doc)
    return st_path, json_path


def write_pair(st_path: Path, json_path: Path, data: bytes, doc: dict[str, Any]) -> None:
    """Write safetensors ``data`` and the JSON ``doc`` that describes them, each atomically.

    Tensors first, JSON last: a crash in between leaves either no JSON (reported as a missing sidecar)
    or an old JSON whose checksum does not match the new tensors (reported as a mismatch).
    """
    text = json.dumps(doc, indent=2, ensure_ascii=False, allow_nan=False) + "\n"
    st_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_st = _write_atomic(st_path, data)
    try:
        tmp_json = _write_atomic(json_path, text.encode("utf-8"))
    except BaseException:
        os.unlink(tmp_st)
        raise
    try:
        os.replace(tmp_st, st_path)
        os.replace(tmp_json, json_path)
    except BaseException:
        for tmp in (tmp_st, tmp_json):
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise


# -- loading -------------------------------------------------------------------------------------------------
def _fail(path: Path, problem: str) -> RecordError:
    return RecordError(f"{path}: {problem}; {_WHAT}")


def _is_int(v: Any) -> bool:
    return type(v) is int  # bool is an int subclass but never a valid count, size or position


def _parse_json(text: str | bytes, path: Path, what: str) -> Any:
    """``json.loads`` that turns every way a hostile text can fail (bad syntax, NaN/Infinity, a
    5000-digit number, nesting past the C parser's stack) into one :class:`RecordError`."""

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not a JSON number")

    try:
        doc = json.loads(text, parse_constant=no_constant)
    except json.JSONDecodeError as e:
        raise _fail(path, f"{what} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    except UnicodeDecodeError:
        raise _fail(path, f"{what} is not UTF-8 text") from None
    except RecursionError:
        raise _fail(path, f"{what} is nested deeper than {MAX_NESTING} levels") from None
    except ValueError as e:  # NaN/Infinity, or an integer too long to convert
        raise _fail(path, f"{what} holds a number daamkit never writes ({e})") from None
    if (msg := _structure_problem(doc)) is not None:
        raise _fail(path, f"{what}: {msg}")
    return doc


def _structure_problem(doc: Any) -> str | None:
    """Nesting deeper than :data:`MAX_NESTING` or a non-finite float anywhere (iterative: no recursion)."""
    stack: list[tuple[Any, int, str]] = [(doc, 0, "")]
    while stack:
        obj, depth, where = stack.pop()
        if isinstance(obj, float) and not math.isfinite(obj):
            return f"{where or 'the document'} is {obj} (records hold finite numbers only)"
        if isinstance(obj, str) and not _is_utf8(obj):
            return f"{where or 'the document'} holds a lone surrogate (\\ud800-\\udfff), which is not text"
        if isinstance(obj, dict) and not all(_is_utf8(k) for k in obj):
            return f"{where or 'the document'} has a key with a lone surrogate, which is not text"
        if isinstance(obj, (dict, list)):
            if depth >= MAX_NESTING:
                return f"{where or 'it'} is nested deeper than {MAX_NESTING} levels"
            items = obj.items() if isinstance(obj, dict) else enumerate(obj)
            # name the field by its first two keys: a path 64 levels long is no help in a message
            stack.extend((v, depth + 1, f"{where}[{k!r}]" if depth < 2 else where) for k, v in items)
    return None


def _is_utf8(text: str) -> bool:
    # JSON's \ud800 escapes decode to lone surrogates: loadable, but never printable or saveable again
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _safetensors_header(data: bytes, path: Path) -> dict[str, Any]:
    """Parse the safetensors header ourselves so truncation gets its own message."""
    if len(data) < 8:
        raise _fail(path, f"truncated safetensors file ({len(data)} bytes, not even a header)")
    n = int.from_bytes(data[:8], "little")
    if 8 + n > len(data):
        raise _fail(path, f"truncated safetensors file (header says {n} bytes, file has {len(data) - 8})")
    header = _parse_json(data[8 : 8 + n], path, "the safetensors header")
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
        and _is_int(v["data_offsets"][1])
    ]
    if ends and max(ends) > body:
        raise _fail(
            path, f"truncated safetensors file (tensor data needs {max(ends)} bytes, file has {body})"
        )
    meta = header.get("__metadata__")
    if meta is not None and (
        not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values())
    ):
        raise _fail(path, "damaged safetensors file (__metadata__ is not a map of strings)")
    unknown = sorted(k for k in header if k not in ("__metadata__", *_DTYPES))
    if unknown:
        raise _fail(path, f"unexpected tensor(s) {', '.join(map(repr, unknown[:5]))} (a record holds "
                    f"{MAPS_TENSOR!r} and optionally {IMAGE_TENSOR!r} or {FRAMES_TENSOR!r})")
    return header


def _get(doc: dict[str, Any], key: str, types: type | tuple[type, ...], path: Path, where: str = "") -> Any:
    name = f"{where}.{key}" if where else key
    if key not in doc:
        raise _fail(path, f"missing field {name!r}")
    value = doc[key]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise _fail(path, f"field {name!r} has the wrong type (bool)")
    if not isinstance(value, types):
        raise _fail(path, f"field {name!r} has the wrong type ({type(value).__name__})")
    return value


def _int_field(doc: dict[str, Any], key: str, path: Path, where: str, lo: int, hi: int) -> int:
    value = _get(doc, key, int, path, where)
    if not lo <= value <= hi:
        raise _fail(path, f"field {where}.{key} is {value}, outside {lo}..{hi}")
    return value


def _check_alignment(d: Any, n_tokens: int, path: Path) -> TokenAlignment:
    """The alignment of ``d`` after checking every field; positions must index the ``n_tokens`` maps."""
    w = "heat_maps.alignment"
    if not isinstance(d, dict):
        raise _fail(path, f"field {w!r} has the wrong type ({type(d).__name__})")
    if d.get("format") != "daamkit.TokenAlignment" or d.get("version") != 1:
        raise _fail(path, f"field {w!r} is not a version 1 daamkit token alignment")
    tokens = _get(d, "tokens", list, path, w)
    if not all(isinstance(t, str) for t in tokens):
        raise _fail(path, f"field '{w}.tokens' must be a list of strings")
    if len(tokens) != n_tokens:
        raise _fail(path, f"shape mismatch: maps have {n_tokens} token rows but the alignment has "
                    f"{len(tokens)} tokens; they must describe the same key sequence")
    words = _get(d, "words", list, path, w)
    for i, word in enumerate(words):
        ww = f"{w}.words[{i}]"
        if not isinstance(word, dict):
            raise _fail(path, f"field {ww!r} has the wrong type ({type(word).__name__})")
        _get(word, "text", str, path, ww)
        _int_field(word, "index", path, ww, 0, len(words) - 1)
        _int_field(word, "occurrence", path, ww, 0, len(words) - 1)
        _get(word, "truncated", bool, path, ww)
        _get(word, "is_punctuation", bool, path, ww)
        for p in _get(word, "positions", list, path, ww):
            if not _is_int(p):
                raise _fail(path, f"field '{ww}.positions' holds {p!r}, not a token position")
            if not 0 <= p < n_tokens:
                raise _fail(path, f"field '{ww}.positions' holds {p}, outside the {n_tokens} token positions "
                            f"0..{n_tokens - 1}")
    _int_field(d, "max_length", path, w, 1, _MAX_MAX_LENGTH)
    _get(d, "prompt", (str, type(None)), path, w)
    return TokenAlignment.from_dict(d)


def _check_image_size(value: list[Any], grid: tuple[int, int], path: Path) -> tuple[int, int]:
    if len(value) != 2 or not all(_is_int(v) for v in value):
        raise _fail(path, f"field 'heat_maps.image_size' must be [height, width] integers, got {value!r}")
    h, w = value
    if not (1 <= h <= MAX_IMAGE_SIDE and 1 <= w <= MAX_IMAGE_SIDE) or h * w > MAX_IMAGE_PIXELS:
        raise _fail(path, f"field 'heat_maps.image_size' is {value}: beyond the {MAX_IMAGE_SIDE}-pixel side / "
                    f"{MAX_IMAGE_PIXELS}-pixel bound a record may ask for")
    # The grid follows the image up to rounding (a latent side is the image side over the VAE factor,
    # halved per down block, floored or ceiled): one scale s must fit both sides, with one cell of slack.
    gh, gw = grid
    lo = max(h / (gh + 1), w / (gw + 1))
    hi = min(h / (gh - 1) if gh > 1 else math.inf, w / (gw - 1) if gw > 1 else math.inf)
    if lo > hi * 1.000001:
        raise _fail(path, f"field 'heat_maps.image_size' {value} does not fit the {gh}x{gw} map grid (the "
                    "height and width are scaled differently)")
    return h, w


def _read(path: Path, limit: int | None = None) -> bytes:
    try:
        if limit is not None and (size := path.stat().st_size) > limit:
            raise _fail(path, f"file is {size} bytes, more than the {limit} a record's JSON may have")
        return path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as e:
        raise _fail(path, f"cannot read it ({e.strerror or e})") from None


def load_record(path: str | os.PathLike[str], verify: bool = True) -> RunRecord:
    """Load a record from its stem, ``<stem>.json`` or ``<stem>.safetensors``.

    ``verify=False`` skips the sha256 check (the structure is still checked). Raises
    ``FileNotFoundError`` if neither file exists and :class:`RecordError` for anything damaged, foreign,
    incomplete, too new or out of bounds (see the module docstring).
    """
    st_path, json_path = record_paths(path)
    if not json_path.exists():
        if st_path.exists():
            raise _fail(st_path, f"missing sidecar {json_path.name} (the JSON half of the record)")
        raise FileNotFoundError(f"no daamkit record at {path} (looked for {json_path} and {st_path})")

    # -- the JSON half: is this ours, and can we read this version?
    doc = _parse_json(_read(json_path, MAX_JSON_BYTES), json_path, "the record")
    if not isinstance(doc, dict) or "format" not in doc:
        raise _fail(json_path, "foreign JSON file (no 'format' field)")
    if doc["format"] != FORMAT_NAME:
        raise _fail(json_path, f"foreign file: format is {doc['format']!r:.80}, expected {FORMAT_NAME!r}")
    version = doc.get("format_version")
    if not _is_int(version) or version < 1:
        raise _fail(json_path, f"invalid format_version {version!r:.80}")
    if version > FORMAT_VERSION:
        raise _fail(
            json_path,
            f"format_version {version} is newer than this daamkit reads (up to {FORMAT_VERSION}); "
            "upgrade daamkit",
        )
    if "written_by" in doc:
        _get(doc, "written_by", str, json_path)
    prompt = _get(doc, "prompt", str, json_path)
    negative = _get(doc, "negative_prompt", (str, type(None)), json_path)
    seed = _get(doc, "seed", (int, type(None)), json_path)
    if seed is not None and not _SEED_RANGE[0] <= seed <= _SEED_RANGE[1]:
        raise _fail(json_path, f"field 'seed' is outside the range a torch generator accepts ({seed:.3g})")
    settings = _get(doc, "settings", dict, json_path)
    meta = _get(doc, "meta", dict, json_path)
    hm = _get(doc, "heat_maps", dict, json_path)
    declared = _get(doc, "tensors", dict, json_path)
    expected_sha = _get(doc, "safetensors_sha256", str, json_path)
    if len(expected_sha) != 64 or expected_sha.strip("0123456789abcdef"):
        raise _fail(json_path, "field 'safetensors_sha256' is not a sha256 hex digest")
    image_info = _get(doc, "image", (dict, type(None)), json_path)

    # -- the tensor half: present, complete, the file the JSON was written with
    if not st_path.exists():
        raise _fail(json_path, f"missing tensor file {st_path.name} (the safetensors half of the record)")
    data = _read(st_path)
    header = _safetensors_header(data, st_path)
    if verify and hashlib.sha256(data).hexdigest() != expected_sha:
        raise _fail(
            st_path,
            f"checksum mismatch with {json_path.name}: the tensor file was changed or replaced after the "
            "record was written (or the pair does not belong together)",
        )
    st_meta = header.get("__metadata__") or {}
    if st_meta.get("format", FORMAT_NAME) != FORMAT_NAME:
        raise _fail(st_path, f"foreign safetensors file (format {st_meta.get('format')!r:.80})")
    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error types; all mean a damaged file
        raise _fail(st_path, f"damaged safetensors file ({e})") from None
    # The JSON lists exactly the file's tensors, each with its dtype and shape.
    for name in sorted(set(declared) - set(tensors)):
        raise _fail(st_path, f"missing tensor {name!r:.80} (listed in {json_path.name})")
    for name in sorted(set(tensors) - set(declared)):
        raise _fail(json_path, f"field 'tensors' does not list the tensor {name!r} of {st_path.name}")

    # -- the heat maps
    maps_name = _get(hm, "tensor", str, json_path, "heat_maps")
    if maps_name != MAPS_TENSOR:
        raise _fail(json_path, f"field 'heat_maps.tensor' is {maps_name!r:.80}, expected {MAPS_TENSOR!r}")
    maps = _tensor(tensors, maps_name, "the heat maps", declared, st_path)
    hm_meta = _get(hm, "meta", dict, json_path, "heat_maps")
    time = None
    if hm_meta.get("time") is not None:
        if version < 2:
            raise _fail(json_path, "field 'heat_maps.meta.time' (a video's time axis) needs format_version 2")
        time = _check_time(hm_meta["time"], json_path)
    want, axes = (3, "(T, h, w)") if time is None else (4, "(T, frames, h, w)")
    if maps.ndim != want or min(maps.shape) < 1:
        raise _fail(
            st_path, f"shape mismatch: tensor {maps_name!r} has shape {list(maps.shape)}, not {axes} "
            "with every side at least 1"
        )
    if time is not None and maps.shape[1] != time.frames:
        raise _fail(st_path, f"shape mismatch: the maps have {maps.shape[1]} token frames but the time axis "
                    f"(heat_maps.meta.time) {time.frames}")
    alignment = _check_alignment(hm.get("alignment"), int(maps.shape[0]), json_path)
    grid = (int(maps.shape[-2]), int(maps.shape[-1]))
    hm_grid = _get(hm, "grid_size", list, json_path, "heat_maps")
    if hm_grid != list(grid):
        raise _fail(json_path, f"shape mismatch: field 'heat_maps.grid_size' is {hm_grid!r:.80} but the maps "
                    f"are {list(grid)}")
    image_size = _check_image_size(_get(hm, "image_size", list, json_path, "heat_maps"), grid, json_path)
    if time is not None and time.num_frames * image_size[0] * image_size[1] > MAX_VIDEO_VOXELS:
        raise _fail(json_path, f"the video is {time.num_frames} frames of {image_size[0]}x{image_size[1]}: beyond "
                    f"the {MAX_VIDEO_VOXELS} frames x pixels a record may ask for")
    heat_maps = GlobalHeatMap(maps, alignment, image_size, hm_meta)

    # -- a video's frames
    frames = None
    video_info = _get(doc, "video", (dict, type(None)), json_path) if version >= 2 and "video" in doc else None
    if video_info is None:
        if FRAMES_TENSOR in tensors:
            raise _fail(json_path, f"field 'video' is missing or null but {st_path.name} holds a video's frames")
    else:
        if time is None:
            raise _fail(json_path, "field 'video' is set but the heat maps have no time axis (heat_maps.meta.time)")
        name = _get(video_info, "tensor", str, json_path, "video")
        if name != FRAMES_TENSOR:
            raise _fail(json_path, f"field 'video.tensor' is {name!r:.80}, expected {FRAMES_TENSOR!r}")
        frames_t = _tensor(tensors, name, "the video's frames", declared, st_path)
        expected = (time.num_frames, *heat_maps.image_size)
        if frames_t.ndim != 4 or tuple(frames_t.shape[:3]) != expected or frames_t.shape[3] not in _FRAME_CHANNELS:
            raise _fail(st_path, f"shape mismatch: frames tensor {list(frames_t.shape)} is not (frames, height, "
                        f"width, channels) = {[*expected, 3]} with 1, 3 or 4 channels")
        frames = frames_t.numpy()

    # -- the image
    image = None
    if image_info is not None and time is not None:
        raise _fail(json_path, "field 'image' is set but the heat maps are a video's (a video's record holds frames)")
    if image_info is None:
        if IMAGE_TENSOR in tensors:
            raise _fail(json_path, f"field 'image' is null but {st_path.name} holds an image")
    else:
        name = _get(image_info, "tensor", str, json_path, "image")
        if name != IMAGE_TENSOR:
            raise _fail(json_path, f"field 'image.tensor' is {name!r:.80}, expected {IMAGE_TENSOR!r}")
        mode = _get(image_info, "mode", str, json_path, "image")
        if "source_mode" in image_info:
            _get(image_info, "source_mode", str, json_path, "image")
        arr_t = _tensor(tensors, name, "the image", declared, st_path)
        if mode not in _MODES:
            raise _fail(json_path, f"unsupported image mode {mode!r:.80}")
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

    return RunRecord(
        prompt=prompt,
        image=image,
        heat_maps=heat_maps,
        seed=seed,
        settings=settings,
        negative_prompt=negative,
        meta=meta,
        frames=frames,
    )


def _check_time(d: Any, path: Path) -> TimeAxis:
    """The time axis in ``heat_maps.meta.time`` after checking every field's type and bound."""
    w = "heat_maps.meta.time"
    if not isinstance(d, dict):
        raise _fail(path, f"field {w!r} has the wrong type ({type(d).__name__})")
    known = {"frames", "patch", "skip", "compression", "causal", "output"}
    if unknown := sorted(set(d) - known):
        raise _fail(path, f"field {w!r} has unknown key(s) {unknown[:5]!r:.120}; allowed: {sorted(known)}")
    frames = _int_field(d, "frames", path, w, 1, MAX_VIDEO_FRAMES)
    patch = _int_field(d, "patch", path, w, 1, MAX_TIME_FACTOR) if "patch" in d else 1
    compression = _int_field(d, "compression", path, w, 1, MAX_TIME_FACTOR) if "compression" in d else 1
    skip = _int_field(d, "skip", path, w, 0, frames * patch - 1) if "skip" in d else 0
    causal = _get(d, "causal", bool, path, w) if "causal" in d else False
    output = d.get("output")
    if output is not None:
        output = _int_field(d, "output", path, w, 1, MAX_VIDEO_FRAMES)
    time = TimeAxis(frames=frames, patch=patch, skip=skip, compression=compression, causal=causal, output=output)
    if time.num_frames > MAX_VIDEO_FRAMES:
        raise _fail(path, f"field {w!r} makes a video of {time.num_frames} frames, more than the "
                    f"{MAX_VIDEO_FRAMES} a record may ask for")
    return time


def _tensor(
    tensors: dict[str, torch.Tensor], name: str, what: str, declared: dict[str, Any], path: Path
) -> torch.Tensor:
    """Tensor ``name`` of the file (``what`` it holds, for the message), checked against the JSON."""
    if name not in tensors:
        raise _fail(path, f"missing tensor {name!r} ({what})")
    t = tensors[name]
    dtype_name, dtype = _DTYPES[name]
    if t.dtype != dtype:
        raise _fail(path, f"tensor {name!r} has dtype {t.dtype}, expected {dtype}")
    spec = declared.get(name)
    if not isinstance(spec, dict) or spec.get("dtype") != dtype_name or spec.get("shape") != list(t.shape):
        raise _fail(
            path, f"shape mismatch: tensor {name!r} is {dtype_name} {list(t.shape)}, the JSON says "
            f"{spec!r:.120}"
        )
    return t
