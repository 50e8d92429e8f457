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
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

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
    ) -> None:
        if not isinstance(value, torch.Tensor) or value.ndim != 2:
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"WordHeatMap value must be a 2-D (h, w) tensor, got {shape}")
        self.value: torch.Tensor = value.detach().to(torch.float32)
        self.word: str = word
        self.positions: tuple[int, ...] = tuple(int(p) for p in positions)
        # Default to the grid size so that maps built by hand (baselines, tests) work without an image.
        self.image_size: Size = _check_size(
            image_size if image_size is not None else tuple(value.shape), "image_size"
        )
        self.words: tuple[Word, ...] = tuple(words)
        self.occurrence: int | None = occurrence

    # -- geometry -------------------------------------------------------------------------------------
    @property
    def grid_size(self) -> Size:
        """(h, w) of the aggregation grid."""
        return int(self.value.shape[0]), int(self.value.shape[1])

    def expand(self, size: Sequence[int] | None = None) -> torch.Tensor:
        """Bicubic upsampling to ``size`` = (H, W) (default: the image size), clamped at 0.

        Returns a float32 (H, W) tensor on the map's device.
        """
        h, w = _check_size(size, "size") if size is not None else self.image_size
        out = F.interpolate(self.value[None, None], size=(h, w), mode="bicubic", align_corners=False)
        return out[0, 0].clamp_(min=0)

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
            self.value.to(device), self.word, self.positions, self.image_size, self.words, self.occurrence
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

        return plot.plot_word(self, image=image, ax=ax, colorbar=colorbar, **kwargs)

    def __repr__(self) -> str:
        h, w = self.grid_size
        return (
            f"WordHeatMap({self.word!r}, positions={self.positions}, grid={h}x{w}, "
            f"image_size={self.image_size})"
        )


class GlobalHeatMap:
    """Heat maps of every token position of one image.

    ``maps`` is (T, h, w) on the aggregation grid, with T = ``len(alignment.tokens)`` (the key axis of the
    attention, BOS/EOS/padding included). ``meta`` is a JSON-safe dict (settings, layer/step selection...)
    that records keep next to the maps.
    """

    def __init__(
        self,
        maps: torch.Tensor,
        alignment: TokenAlignment,
        image_size: Sequence[int],
        meta: dict[str, Any] | None = None,
    ) -> None:
        if not isinstance(maps, torch.Tensor) or maps.ndim != 3:
            shape = tuple(maps.shape) if isinstance(maps, torch.Tensor) else type(maps).__name__
            raise ValueError(f"maps must be a (tokens, h, w) tensor, got {shape}")
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
        self.meta: dict[str, Any] = dict(meta) if meta else {}

    # -- basic facts ----------------------------------------------------------------------------------------
    @property
    def grid_size(self) -> Size:
        """(h, w) of the aggregation grid (follows the latent grid; may be non-square)."""
        return int(self.maps.shape[1]), int(self.maps.shape[2])

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
        """The (h, w) grid map of token position ``pos``."""
        if not 0 <= pos < self.num_tokens:
            raise IndexError(f"token position {pos} out of range 0..{self.num_tokens - 1}")
        return self.maps[pos]

    def token_heat_map(self, pos: int) -> WordHeatMap:
        """Token position ``pos`` as a WordHeatMap (labelled with the token string)."""
        return WordHeatMap(self.token_map(pos), self.alignment.tokens[pos], (pos,), self.image_size)

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
        return WordHeatMap(value, label, positions, self.image_size, tuple(found), occurrence)

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

        return plot.plot_grid(self, image=image, words=words, **kwargs)

    def __repr__(self) -> str:
        h, w = self.grid_size
        return (
            f"GlobalHeatMap(tokens={self.num_tokens}, grid={h}x{w}, image_size={self.image_size}, "
            f"words={self.words})"
        )
