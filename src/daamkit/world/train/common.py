"""Small pieces every phase uses: the run's log, atomic checkpoints, phase markers, the tokenizer,
the learning-rate schedule and the process helpers."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path


class Logger:
    """Appends one JSON record a line to ``<out>/log.jsonl``."""

    def __init__(self, out: Path):
        self.path = out / "log.jsonl"

    def __call__(self, **rec):
        rec["time"] = round(time.time(), 1)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def no_log(**rec) -> None:
    """The logger of a data-parallel worker other than rank 0."""


def save(obj, path: Path) -> None:
    """``torch.save``, written whole then renamed: a killed run never leaves half a checkpoint."""
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def done(out: Path, phase: str) -> bool:
    return (out / f"{phase}.done").exists()


def mark(out: Path, phase: str, info: dict | None = None) -> None:
    (out / f"{phase}.done").write_text(json.dumps(info or {}))


def tokenizer(out: Path):
    """The real CLIP BPE tokenizer, written once under ``<out>/tokenizer``."""
    from transformers import CLIPTokenizer

    from daamkit.testing.tokenizers import clip_tokenizer

    tdir = out / "tokenizer"
    if not (tdir / "vocab.json").exists():
        clip_tokenizer(tdir)
    return CLIPTokenizer.from_pretrained(str(tdir))


def lr_at(frac: float, base: float, warm_frac: float, final_ratio: float = 0.1) -> float:
    """Linear warm-up over ``warm_frac`` of the phase, then a cosine down to ``final_ratio`` of
    ``base``."""
    if frac < warm_frac:
        return base * max(frac / warm_frac, 0.02)
    p = min(1.0, (frac - warm_frac) / max(1e-8, 1 - warm_frac))
    return base * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def psnr(mse: float) -> float:
    """Peak signal-to-noise ratio in dB of images in [-1, 1]."""
    return -10 * math.log10(max(mse / 4, 1e-10))


def exit_with_parent(every: float = 2.0) -> None:
    """End this worker when the process that spawned it is gone (killed, say): orphaned workers would
    otherwise go on training and writing the run's checkpoints."""
    import threading

    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="daamkit-parent-watch").start()
