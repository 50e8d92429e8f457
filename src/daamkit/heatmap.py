"""Heat map objects: all tokens of one image (GlobalHeatMap) and one word (WordHeatMap).

The data objects hold tensors on the aggregation grid (the latent grid, which may be non-square) and
know the generated image's size in pixels. Everything that turns them into pictures lives in
:mod:`daamkit.plot`; the methods here only delegate, so that importing this module never pulls in
matplotlib.

Conventions (the DAAM definition, see "How the maps are computed" in the README):

* Sizes are always ``(height, width)``, like tensors; PIL's ``Image.size`` is ``(width, height)`` and is
  converted where an image is accepted.
* A word's map is the mean of the grid maps of its token positions, over all occurrences of the word
  unless one occurrence is chosen.
* ``expand`` upsamples bicubically (``align_corners=False``) to the image size and clamps at 0, because
  bicubic interpolation overshoots below zero next to sharp peaks.
* ``normalized`` divides by the maximum (an all-zero map stays all zero, never NaN).
* ``mask(threshold)`` is ``normalized >= threshold``; thresholding and IoU / IoA (with their ``>=`` and
  empty-mask conventions) live in :mod:`daamkit.metrics`, re-exported here.

Videos: maps gain a time axis, one plane per token frame: ``GlobalHeatMap.maps`` is (T, F, h, w) and
a word's ``value`` (F, h, w). ``time`` (a :class:`~daamkit.frames.TimeAxis`, kept in ``meta["time"]``)
says which plane lies on each frame of the returned video, so ``frame(i)`` is the 2-D map of video
frame ``i`` (every image analysis applies to it), ``frames(start, stop)`` the mean over a range of
video frames, ``expand()`` a (frames, H, W) map on the video and ``frame_scores()`` how much a word
acts on each frame (the mean of its map over the frame).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from daamkit.frames import TimeAxis
from daamkit.metrics import (
    DEFAULT_THRESHOLD,
    as_bool_mask,
    check_threshold,
    mask_ioa,
    mask_iou,
    threshold_mask,
)
from daamkit.tokens import TokenAlignment, Word, WordNotFoundError

if TYPE_CHECKING:  # plot types only for annotations: keep matplotlib/PIL out of the import path
    import PIL.Image
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "DEFAULT_THRESHOLD",
    "GlobalHeatMap",
    "WordHeatMap",
    "as_bool_mask",
    "mask_ioa",
    "mask_iou",
]

Size = tuple[int, int]
NormMethod = Literal["max", "minmax"]


def _check_size(size: Sequence[int], what: str) -> Size:
    try:
        h, w = (int(s) for s in size)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be (height, width), got {size!r}") from None
    if h <= 0 or w <= 0:
        raise ValueError(f"{what} must be positive (height, width), got {size!r}")
    return h, w


class WordHeatMap:
    """The heat map of one word (or token, or phrase) on the aggregation grid.

    ``value`` is the (h, w) grid map; ``image_size`` the (H, W) size in pixels it expands to.
    """

    def __init__(
        self,
        value: torch.Tensor,
        word: str,
        positions: Sequence[int] = (),
        image_size: Sequence[int] | None = None,
        words: Sequence[Word] = (),
        occurrence: int | None = None,
        time: TimeAxis | None = None,
    ) -> None:
        want = 2 if time is None else 3
        if not isinstance(value, torch.Tensor) or value.ndim != want:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            what = "a 2-D (h, w)" if time is None else "a 3-D (frames, h, w)"
            raise ValueError(f"WordHeatMap value must be {what} tensor, got {shape}")
        if time is not None and value.shape[0] != time.frames:
            raise ValueError(f"WordHeatMap value has {value.shape[0]} frames but its time axis {time.frames}")
        self.value: torch.Tensor = value.detach().to(torch.float32)
        self.word: str = word
        self.positions: tuple[int, ...] = tuple(int(p) for p in positions)
        # Default to the grid size so that maps built by hand (baselines, tests) work without an image.
        self.image_size: Size = _check_size(
            image_size if image_size is not None else tuple(value.shape[-2:]), "image_size"
        )
        self.words: tuple[Word, ...] = tuple(words)
        self.occurrence: int | None = occurrence
        self.time: TimeAxis | None = time

    # -- time -----------------------------------------------------------------------------------------
    @property
    def is_video(self) -> bool:
        return self.time is not None

    @property
    def num_frames(self) -> int:
        """Frames of the video the map lies on (1 for an image)."""
        return 1 if self.time is None else self.time.num_frames

    def _video(self, what: str) -> TimeAxis:
        if self.time is None:
            raise ValueError(f"{what} needs a video's map; {self.word!r} is an image's")
        return self.time

    def frames(self, start: int, stop: int | None = None) -> WordHeatMap:
        """The 2-D map of video frames ``start..stop-1`` (default: frame ``start`` alone), the mean of
        the planes that lie on them, each frame counted once."""
        time = self._video("frames()")
        stop = start + 1 if stop is None else stop
        if not 0 <= start < stop <= time.num_frames:
            raise IndexError(f"frames {start}:{stop} out of range: the video has {time.num_frames} frames, numbered "
                             f"0..{time.num_frames - 1}")
        planes = [time.token_frame(i) for i in range(start, stop)]
        value = self.value[planes].mean(0)
        return WordHeatMap(value, self.word, self.positions, self.image_size, self.words, self.occurrence)

    def frame(self, i: int) -> WordHeatMap:
        """The 2-D map that lies on video frame ``i``."""
        return self.frames(i, i + 1)

    def frame_scores(self) -> torch.Tensor:
        """How much the word acts on each video frame: the mean of its map over the frame, (frames,)."""
        time = self._video("frame_scores()")
        per_plane = self.value.mean(dim=(-2, -1))
        return per_plane[time.index()]

    # -- geometry -------------------------------------------------------------------------------------
    @property
    def grid_size(self) -> Size:
        """(h, w) of the aggregation grid."""
        return int(self.value.shape[-2]), int(self.value.shape[-1])

    def expand(self, size: Sequence[int] | None = None) -> torch.Tensor:
        """Bicubic upsampling to ``size`` = (H, W) (default: the image size), clamped at 0.

        Returns a float32 (H, W) tensor on the map's device; a video's map gives (frames, H, W), frame
        ``i`` on the video's frame ``i``.
        """
        h, w = _check_size(size, "size") if size is not None else self.image_size
        planes = self.value[None] if self.time is None else self.value
        out = F.interpolate(planes[:, None], size=(h, w), mode="bicubic", align_corners=False)[:, 0].clamp_(min=0)
        return out[0] if self.time is None else out[self.time.index()]

    def normalized(self, size: Sequence[int] | None = None, method: NormMethod = "max") -> torch.Tensor:
        """The expanded map scaled to [0, 1].

        ``method="max"`` (default, as in the README) divides by the maximum; ``"minmax"`` maps [min, max] to
        [0, 1] as the reference implementation's ``expand_as`` does. A constant map (e.g. all zero) gives
        all zeros instead of NaN. A map holding NaN or inf raises ``ValueError``.
        """
        e = self.expand(size)
        hi = e.max()
        if not torch.isfinite(hi):
            raise ValueError(f"heat map of {self.word!r} holds NaN or inf values")
        if method == "max":
            lo = torch.zeros((), dtype=e.dtype, device=e.device)
        elif method == "minmax":
            lo = e.min()
        else:
            raise ValueError(f"method must be 'max' or 'minmax', got {method!r}")
        span = hi - lo
        if span <= 0:
            return torch.zeros_like(e)
        return ((e - lo) / span).clamp_(0, 1)

    def mask(self, threshold: float = DEFAULT_THRESHOLD, size: Sequence[int] | None = None) -> np.ndarray:
        """Boolean (H, W) numpy mask ``normalized() >= threshold`` (see the module docstring on ``>=``)."""
        threshold = check_threshold(threshold)
        return threshold_mask(self.normalized(size), threshold)

    def _other_mask(self, other: WordHeatMap | Any, threshold: float) -> np.ndarray:
        if isinstance(other, WordHeatMap) and (other.time is None) != (self.time is None):
            raise ValueError(f"cannot compare {self.word!r} with {other.word!r}: one is a video's map, the other an "
                             "image's (pick a frame with .frame(i))")
        if self.time is not None and not isinstance(other, WordHeatMap):
            other = np.asarray(other.cpu() if isinstance(other, torch.Tensor) else other)
            if other.shape != (self.num_frames, *self.image_size):
                raise ValueError(f"mask must be (frames, height, width) = {(self.num_frames, *self.image_size)} for "
                                 f"this video's map, got {other.shape}")
            return other.astype(bool)
        if isinstance(other, WordHeatMap):
            if other.image_size != self.image_size:
                raise ValueError(
                    f"cannot compare {self.word!r} (image size {self.image_size}) with {other.word!r} "
                    f"(image size {other.image_size}): heat maps must belong to images of the same size"
                )
            return other.mask(threshold)
        return as_bool_mask(other, self.image_size, what="mask")

    def iou(self, other: WordHeatMap | Any, threshold: float = DEFAULT_THRESHOLD) -> float:
        """IoU of this map's mask with ``other`` (a WordHeatMap, thresholded the same way, or a bool
        (H, W) mask as numpy array or torch tensor). 0.0 when the union is empty."""
        return mask_iou(self.mask(threshold), self._other_mask(other, threshold))

    def ioa(self, other: WordHeatMap | Any, threshold: float = DEFAULT_THRESHOLD) -> float:
        """``|A ∩ B| / |B|`` with A this map's mask and B = ``other``'s (WordHeatMap or bool mask).
        0.0 when B is empty."""
        return mask_ioa(self.mask(threshold), self._other_mask(other, threshold))

    # -- devices ----------------------------------------------------------------------------------------
    def to(self, device: torch.device | str) -> WordHeatMap:
        return WordHeatMap(
            self.value.to(device), self.word, self.positions, self.image_size, self.words, self.occurrence, self.time
        )

    def cpu(self) -> WordHeatMap:
        return self.to("cpu")

    def numpy(self) -> np.ndarray:
        """The grid map as a float32 numpy array (h, w)."""
        return self.value.cpu().numpy()

    # -- pictures (delegated to daamkit.plot) -------------------------------------------------------------
    def overlay(
        self, image: PIL.Image.Image, alpha: float = 0.5, cmap: str = "jet", weighted: bool = False
    ) -> PIL.Image.Image:
        """The normalised map, expanded to ``image``'s own size, blended over it (RGB PIL image)."""
        from daamkit import plot

        if self.time is not None:
            raise ValueError(f"{self.word!r} is a video's map: overlay one frame (.frame(i).overlay(frame_image)) or "
                             "write overlay videos with daamkit.video")
        return plot.overlay(image, self.normalized((image.height, image.width)), alpha, cmap, weighted)

    def plot(
        self,
        ax: Axes | None = None,
        image: PIL.Image.Image | None = None,
        colorbar: bool = True,
        **kwargs: Any,
    ) -> Axes:
        """Draw the map (over ``image`` if given) on ``ax`` (a new Figure's axes if None); see
        :func:`daamkit.plot.plot_word` for the other options."""
        from daamkit import plot

        if self.time is not None:
            raise ValueError(f"{self.word!r} is a video's map: plot one frame (.frame(i).plot()) or its frame_scores()")
        return plot.plot_word(self, image=image, ax=ax, colorbar=colorbar, **kwargs)

    def __repr__(self) -> str:
        h, w = self.grid_size
        frames = "" if self.time is None else f"frames={self.num_frames}, "
        return (
            f"WordHeatMap({self.word!r}, positions={self.positions}, {frames}grid={h}x{w}, "
            f"image_size={self.image_size})"
        )


class GlobalHeatMap:
    """Heat maps of every token position of one image.

    ``maps`` is (T, h, w) on the aggregation grid, with T = ``len(alignment.tokens)`` (the key axis of the
    attention, BOS/EOS/padding included); a video's are (T, F, h, w), with its time axis in
    ``meta["time"]``. ``meta`` is a JSON-safe dict (settings, layer/step selection...) that records keep
    next to the maps.
    """

    def __init__(
        self,
        maps: torch.Tensor,
        alignment: TokenAlignment,
        image_size: Sequence[int],
        meta: dict[str, Any] | None = None,
    ) -> None:
        meta = dict(meta) if meta else {}
        time = TimeAxis.from_json(meta["time"]) if meta.get("time") is not None else None
        want = 3 if time is None else 4
        if not isinstance(maps, torch.Tensor) or maps.ndim != want:
            shape = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
            what = "(tokens, h, w)" if time is None else "(tokens, frames, h, w) (meta has a time axis)"
            raise ValueError(f"maps must be a {what} tensor, got {shape}")
        if time is not None and maps.shape[1] != time.frames:
            raise ValueError(f"maps have {maps.shape[1]} frames but the time axis {time.frames}")
        n_tokens = len(alignment.tokens)
        if maps.shape[0] != n_tokens:
            # A mismatch means maps and alignment come from different tokenizations: word lookups
            # would silently read the wrong rows, so refuse early.
            raise ValueError(
                f"maps have {maps.shape[0]} token rows but the alignment has {n_tokens} tokens; they must "
                "describe the same key sequence"
            )
        self.maps: torch.Tensor = maps.detach().to(torch.float32)
        self.alignment: TokenAlignment = alignment
        self.image_size: Size = _check_size(image_size, "image_size")
        self.meta: dict[str, Any] = meta
        self.time: TimeAxis | None = time

    # -- time ---------------------------------------------------------------------------------------------
    @property
    def is_video(self) -> bool:
        return self.time is not None

    @property
    def num_frames(self) -> int:
        """Frames of the video the maps lie on (1 for an image)."""
        return 1 if self.time is None else self.time.num_frames

    def frames(self, start: int, stop: int | None = None) -> GlobalHeatMap:
        """The image maps of video frames ``start..stop-1`` (default: frame ``start`` alone): each token's
        mean over the planes that lie on those frames, each frame counted once."""
        if self.time is None:
            raise ValueError("frames() needs a video's maps; these are an image's")
        stop = start + 1 if stop is None else stop
        if not 0 <= start < stop <= self.time.num_frames:
            raise IndexError(f"frames {start}:{stop} out of range: the video has {self.time.num_frames} frames, "
                             f"numbered 0..{self.time.num_frames - 1}")
        planes = [self.time.token_frame(i) for i in range(start, stop)]
        meta = {k: v for k, v in self.meta.items() if k != "time"}
        meta["frames"] = [start, stop]
        return GlobalHeatMap(self.maps[:, planes].mean(1), self.alignment, self.image_size, meta)

    def frame(self, i: int) -> GlobalHeatMap:
        """The image maps that lie on video frame ``i``."""
        return self.frames(i, i + 1)

    def frame_scores(self, words: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """``{word: (frames,) tensor}``: how much each word acts on each video frame (its map's mean
        over the frame); default: every word."""
        if self.time is None:
            raise ValueError("frame_scores() needs a video's maps; these are an image's")
        return {w: self.word(w).frame_scores() for w in (self.words if words is None else words)}

    # -- basic facts ----------------------------------------------------------------------------------------
    @property
    def grid_size(self) -> Size:
        """(h, w) of the aggregation grid (follows the latent grid; may be non-square)."""
        return int(self.maps.shape[-2]), int(self.maps.shape[-1])

    @property
    def num_tokens(self) -> int:
        return int(self.maps.shape[0])

    @property
    def prompt(self) -> str | None:
        return self.alignment.prompt

    @property
    def tokens(self) -> tuple[str, ...]:
        return tuple(self.alignment.tokens)

    @property
    def words(self) -> list[str]:
        """Distinct word texts that have maps, in prompt order (no punctuation, no truncated words).

        Repeated words appear once: ``word(text)`` averages all their occurrences.
        """
        return self._word_texts(include_punctuation=False)

    @property
    def truncated_words(self) -> list[str]:
        """Words wholly past the tokenizer's max length: the model never saw them, they have no map.

        (A word cut in the middle keeps the positions it has and is available through :meth:`word`.)
        """
        return [w.text for w in self.alignment.words if not w.positions]

    def _word_texts(self, include_punctuation: bool) -> list[str]:
        return list(dict.fromkeys(self.alignment.word_texts(include_punctuation=include_punctuation)))

    # -- maps -----------------------------------------------------------------------------------------------
    def token_map(self, pos: int) -> torch.Tensor:
        """The (h, w) grid map of token position ``pos`` ((frames, h, w) for a video)."""
        if not 0 <= pos < self.num_tokens:
            raise IndexError(f"token position {pos} out of range 0..{self.num_tokens - 1}")
        return self.maps[pos]

    def token_heat_map(self, pos: int) -> WordHeatMap:
        """Token position ``pos`` as a WordHeatMap (labelled with the token string)."""
        return WordHeatMap(self.token_map(pos), self.alignment.tokens[pos], (pos,), self.image_size, time=self.time)

    def word(self, query: str, occurrence: int | None = None) -> WordHeatMap:
        """Map of ``query`` (one word or consecutive words), the mean over its token positions.

        ``occurrence=None`` averages every occurrence; ``occurrence=k`` only the k-th (0-based).
        Raises :class:`daamkit.tokens.WordNotFoundError` (listing the prompt's words) if absent.
        """
        found = self.alignment.find(query, occurrence)
        return self._from_words(query.strip(), found, occurrence)

    def _from_words(self, label: str, found: Sequence[Word], occurrence: int | None) -> WordHeatMap:
        # Union, so a token shared by two matches (overlapping phrase occurrences) is not counted twice.
        positions = tuple(sorted({p for w in found for p in w.positions}))
        if not positions:  # defensive: tokens.py raises for words past the cut already
            raise WordNotFoundError(f"{label!r} has no token positions (past the cut?); words: {self.words}")
        if positions[-1] >= self.num_tokens:
            raise IndexError(
                f"{label!r} maps to position {positions[-1]} but there are {self.num_tokens} maps"
            )
        value = self.maps[list(positions)].mean(0)
        return WordHeatMap(value, label, positions, self.image_size, tuple(found), occurrence, self.time)

    def __getitem__(self, query: str) -> WordHeatMap:
        return self.word(query)

    def __contains__(self, query: object) -> bool:
        if not isinstance(query, str):
            return False
        try:
            self.alignment.find(query)
        except (KeyError, ValueError):
            return False
        return True

    def items(
        self, include_punctuation: bool = False, per_occurrence: bool = False
    ) -> list[tuple[str, WordHeatMap]]:
        """``(label, WordHeatMap)`` for the prompt's words (those the model saw).

        By default one entry per distinct word, in order of first appearance, averaging all occurrences
        (same as ``word(text)``). With ``per_occurrence=True`` one entry per word in prompt order;
        repeated words are labelled ``"dog (1)"``, ``"dog (2)"``...
        """
        seen = [
            w for w in self.alignment.words if w.positions and (include_punctuation or not w.is_punctuation)
        ]
        by_text: dict[str, list[Word]] = {}
        for w in seen:
            by_text.setdefault(w.text, []).append(w)
        # Built from the Word records directly rather than by re-querying their text, so every word
        # the alignment lists gets exactly its own positions.
        if not per_occurrence:
            return [(t, self._from_words(t, ws, None)) for t, ws in by_text.items()]
        out: list[tuple[str, WordHeatMap]] = []
        for w in seen:
            label = w.text if len(by_text[w.text]) == 1 else f"{w.text} ({by_text[w.text].index(w) + 1})"
            out.append((label, self._from_words(w.text, [w], w.occurrence)))
        return out

    def words_maps(self, include_punctuation: bool = False) -> list[tuple[str, WordHeatMap]]:
        """Alias of :meth:`items` (one entry per distinct word)."""
        return self.items(include_punctuation)

    def compute_word_maps(self, words: Sequence[str] | None = None) -> dict[str, WordHeatMap]:
        """``{word: WordHeatMap}`` for ``words`` (default: :attr:`words`)."""
        return {w: self.word(w) for w in (self.words if words is None else words)}

    def __iter__(self) -> Iterator[tuple[str, WordHeatMap]]:
        return iter(self.items())

    def expand(self, size: Sequence[int] | None = None) -> torch.Tensor:
        """All token maps upsampled bicubically to (H, W) (default: image size), clamped at 0: (T, H, W)."""
        if self.time is not None:
            raise ValueError("a video's maps expand one frame or one word at a time: .frame(i).expand() or "
                             ".word(w).expand()")
        h, w = _check_size(size, "size") if size is not None else self.image_size
        return F.interpolate(self.maps[:, None], size=(h, w), mode="bicubic", align_corners=False)[
            :, 0
        ].clamp_(min=0)

    # -- devices / equality -----------------------------------------------------------------------------
    def to(self, device: torch.device | str) -> GlobalHeatMap:
        return GlobalHeatMap(self.maps.to(device), self.alignment, self.image_size, self.meta)

    def cpu(self) -> GlobalHeatMap:
        return self.to("cpu")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GlobalHeatMap):
            return NotImplemented
        return (
            self.image_size == other.image_size
            and self.alignment == other.alignment
            and self.meta == other.meta
            and self.maps.shape == other.maps.shape
            and torch.equal(self.maps.cpu(), other.maps.cpu())
        )

    __hash__ = None  # type: ignore[assignment]  # mutable tensor inside: not hashable

    # -- pictures (delegated) -----------------------------------------------------------------------------
    def plot_grid(
        self, image: PIL.Image.Image | None = None, words: Sequence[str] | None = None, **kwargs: Any
    ) -> Figure:
        """A Figure with one panel per word; see :func:`daamkit.plot.plot_grid`."""
        from daamkit import plot

        if self.time is not None:
            raise ValueError("a video's maps plot one frame at a time (.frame(i).plot_grid(frame_image)) or as "
                             "frame_scores (daamkit.plot.plot_frame_scores)")
        return plot.plot_grid(self, image=image, words=words, **kwargs)

    def __repr__(self) -> str:
        h, w = self.grid_size
        frames = "" if self.time is None else f"frames={self.num_frames}, "
        return (
            f"GlobalHeatMap(tokens={self.num_tokens}, {frames}grid={h}x{w}, image_size={self.image_size}, "
            f"words={self.words})"
        )
