"""The time axis of a video's maps: which token frame each frame of the returned video comes from.

A video transformer attends over frames of tokens. One token frame covers ``patch`` latent frames
(the temporal patch size); a pipeline may pad ``skip`` latent frames at the start and drop them after
denoising (CogVideoX 1.5 pads to a multiple of the patch); the VAE then expands each latent frame to
``compression`` video frames, except that a causal video VAE (Wan, HunyuanVideo, CogVideoX, LTX,
Mochi) decodes the first latent frame to one video frame of its own. So a causal VAE with
compression 4 turns 21 latent frames into 1 + 20 x 4 = 81 video frames, and video frame ``i > 0``
comes from latent frame ``(i - 1) // 4 + 1``.

Maps keep one plane per token frame; :meth:`TimeAxis.token_frame` names the plane that lies on a
given frame of the returned video, so that frame ``i`` of an overlay lies on frame ``i`` of the video.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any


@dataclass(frozen=True)
class TimeAxis:
    """How ``frames`` token frames map onto the frames of the returned video.

    frames: token frames (the maps' time axis). patch: latent frames per token frame. skip: latent
    frames the pipeline padded at the start and dropped before decoding. compression: video frames per
    latent frame. causal: the first latent frame decodes to a single video frame. output: the number of
    frames the pipeline returned, when it differs from what the VAE gives (a pipeline that trims).
    """

    frames: int
    patch: int = 1
    skip: int = 0
    compression: int = 1
    causal: bool = False
    output: int | None = None

    def __post_init__(self) -> None:
        for name in ("frames", "patch", "compression"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"TimeAxis {name} must be at least 1, got {getattr(self, name)}")
        if self.skip < 0 or self.skip >= self.frames * self.patch:
            raise ValueError(f"TimeAxis skip must be in 0..{self.frames * self.patch - 1}, got {self.skip}")
        if self.output is not None and self.output < 1:
            raise ValueError(f"TimeAxis output must be at least 1, got {self.output}")

    @property
    def latent_frames(self) -> int:
        """Latent frames the VAE decodes (padding dropped)."""
        return self.frames * self.patch - self.skip

    @property
    def decoded_frames(self) -> int:
        n = self.latent_frames
        return 1 + (n - 1) * self.compression if self.causal else n * self.compression

    @property
    def num_frames(self) -> int:
        """Frames of the returned video."""
        return self.output if self.output is not None else self.decoded_frames

    def latent_frame(self, i: int) -> int:
        """The latent frame (padding dropped) that video frame ``i`` is decoded from."""
        if not 0 <= i < self.num_frames:
            raise IndexError(f"frame {i} out of range: the video has {self.num_frames} frames, numbered 0..{self.num_frames - 1}")
        if self.causal:
            j = 0 if i == 0 else (i - 1) // self.compression + 1
        else:
            j = i // self.compression
        return min(j, self.latent_frames - 1)

    def token_frame(self, i: int) -> int:
        """The maps' plane that lies on video frame ``i``."""
        return (self.latent_frame(i) + self.skip) // self.patch

    def decoded(self, latent_frames: int, frames: int) -> TimeAxis:
        """This axis as the VAE's decode showed it: ``latent_frames`` decoded into ``frames``.

        Fewer latent frames than the token frames cover: the pipeline padded the difference at the
        start and dropped it (CogVideoX 1.5). ``frames`` tells whether the first latent frame decoded
        to one frame of its own (CogVideoX's VAE does only for an odd count). Counts that fit neither
        reading leave the axis as it is.
        """
        pad = self.frames * self.patch - latent_frames
        if not 0 <= pad < self.frames * self.patch:
            return self
        causal = self.causal
        if latent_frames > 1 and frames == latent_frames * self.compression:
            causal = False
        elif frames == 1 + (latent_frames - 1) * self.compression:
            causal = True
        return replace(self, skip=pad, causal=causal)

    def index(self) -> list[int]:
        """``token_frame(i)`` for every video frame."""
        return [self.token_frame(i) for i in range(self.num_frames)]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> TimeAxis:
        if not isinstance(data, dict) or "frames" not in data:
            raise ValueError(f"a time axis is a JSON object with 'frames', got {data!r}")
        known = {"frames", "patch", "skip", "compression", "causal", "output"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown time axis field(s) {sorted(unknown)}; allowed: {sorted(known)}")
        try:
            return cls(
                frames=int(data["frames"]), patch=int(data.get("patch", 1)), skip=int(data.get("skip", 0)),
                compression=int(data.get("compression", 1)), causal=bool(data.get("causal", False)),
                output=None if data.get("output") is None else int(data["output"]),
            )
        except (TypeError, ValueError, OverflowError) as e:  # OverflowError: JSON's 1e400 reads as inf
            raise ValueError(f"bad time axis {data!r}: {e}") from None
