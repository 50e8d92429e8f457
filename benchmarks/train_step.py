"""Steps per second of the shapes-world UNet phase: one process against data-parallel workers.

Runs the real training code (`daamkit.world.train.train`) on a throw-away run folder: the data, VAE and
latents phases on a small training set (only their shapes matter here), then the UNet phase with the
default architecture and batch, once in one process with all ``--threads`` and once with
``--unet-workers`` single-threaded processes (`torch.distributed`, gloo), from the same starting point.
The rate is read from the run's ``log.jsonl`` (steps 10 to ``--steps``, so start-up and the first
steps' allocations are left out) and printed with the ratio against the one-process baseline measured
in the same run. Each configuration is measured ``--repeats`` times in ABAB order; the median counts.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/train_step.py                 # 2 threads, 60 steps
    OMP_WAIT_POLICY=PASSIVE python benchmarks/train_step.py --threads 4 --workers 4 --bf16

Target (a complete run in about 2 hours on 2 cores, where the UNet's step count is what limits the
model): the workers must beat one process; on 2 cores they give about 1.4x.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path


def _rate(out: Path, first: int = 10) -> float:
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    recs = [r for r in recs if r["phase"] == "unet" and r["step"] >= first]
    a, b = recs[0], recs[-1]
    return (b["step"] - a["step"]) / (b["elapsed"] - a["elapsed"])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=None, help="data-parallel workers (default: --threads)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--dataset-size", type=int, default=512)
    a = p.parse_args(argv)
    workers = a.workers or a.threads

    from daamkit.world.train import Recipe, train

    root = Path(tempfile.mkdtemp(prefix="daamkit_train_step_"))
    try:
        base = root / "base"
        common = dict(threads=a.threads, batch=a.batch, sample_steps=0, bf16=a.bf16)
        # the first phases only provide inputs of the right shapes: two VAE steps, no decoder
        setup = Recipe(out=str(base), dataset_size=a.dataset_size, vae_steps=2, decoder_minutes=0, unet_steps=0, **common)
        if train(setup) != 0:
            return 1
        rates: dict[int, list[float]] = {1: [], workers: []}
        for rep in range(a.repeats):
            for w in (1, workers) if rep % 2 == 0 else (workers, 1):
                run = root / f"w{w}_{rep}"
                shutil.copytree(base, run, ignore=shutil.ignore_patterns("ckpt_unet.pt", "unet.done", "log.jsonl"))
                r = Recipe(out=str(run), resume=True, only="unet", unet_steps=a.steps, unet_workers=w, **common)
                if train(r, given=[*common, "unet_steps"]) != 0:
                    return 1
                rates[w].append(_rate(run))
                print(f"workers {w}, repeat {rep}: {rates[w][-1]:.3f} steps/s", file=sys.stderr)
        one, many = statistics.median(rates[1]), statistics.median(rates[workers])
        print(f"UNet phase, batch {a.batch}, {a.threads} threads, bf16 {'on' if a.bf16 else 'off'}")
        print(f"| processes | threads each | steps/s (median of {a.repeats}) | s/step | ratio |")
        print("|---|---|---|---|---|")
        print(f"| 1 | {a.threads} | {one:.3f} | {1 / one:.3f} | 1.00 |")
        print(f"| {workers} | {max(1, a.threads // workers)} | {many:.3f} | {1 / many:.3f} | {many / one:.2f} |")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
