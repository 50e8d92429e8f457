"""Generation accuracy of a shapes-world pipeline: does it draw what the caption asks for?

This is the model-side check only (no attention maps): generate one image per caption, segment it
(:mod:`daamkit.world.segment`) and compare with the requested colours and shapes. ``daamkit eval``
builds the DAAM evaluation on top of the same pieces.

    python -m daamkit.world.quality --model src/daamkit/world/model --n 200 --out runs/world_quality
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from daamkit.world.scenes import is_heldout, make_heldout_scene, make_scene
from daamkit.world.segment import generation_accuracy


def heldout_captions(n: int, seed: int = 0) -> list:
    """``n`` held-out test scenes (held-out template and/or held-out colour-shape pair)."""
    return [make_heldout_scene(seed + i) for i in range(n)]


def evaluate_generation(
    pipe,
    scenes,
    steps: int = 20,
    guidance: float = 5.0,
    batch: int = 16,
    seed: int = 0,
    progress: bool = True,
) -> tuple[dict, list[dict], list]:
    """Generate one image per scene caption (seeded per index) and score it. Returns
    (summary, per-image records, images)."""
    import torch
    from tqdm import tqdm

    recs, images = [], []
    it = range(0, len(scenes), batch)
    for i in tqdm(it, desc="generate", disable=not progress, file=sys.stderr):
        chunk = scenes[i : i + batch]
        gens = [torch.Generator().manual_seed(seed + i + k) for k in range(len(chunk))]
        out = pipe(
            [s.caption for s in chunk],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gens,
            height=64,
            width=64,
        ).images
        for s, im in zip(chunk, out, strict=True):
            chk = generation_accuracy(im, s)
            rec = chk.to_dict()
            rec.update(
                caption=s.caption, template=s.template, heldout=is_heldout(s), n_objects=len(s.objects)
            )
            recs.append(rec)
            images.append(im)
    return summarize(recs), recs, images


def _ci(xs) -> list[float]:
    xs = np.asarray(xs, float)
    if len(xs) < 2:
        return [float("nan"), float("nan")]
    h = 1.96 * xs.std(ddof=1) / math.sqrt(len(xs))
    return [float(xs.mean() - h), float(xs.mean() + h)]


def summarize(recs: list[dict]) -> dict:
    def agg(rs):
        if not rs:
            return {}
        out = {"n": len(rs)}
        for key in ("colors_present", "objects_present", "shapes_correct", "exact"):
            v = [float(r[key]) for r in rs]
            out[key] = float(np.mean(v))
            out[key + "_ci95"] = _ci(v)
        out["all_objects_drawn"] = float(np.mean([r["objects_present"] == 1.0 for r in rs]))
        return out

    summary = {"all": agg(recs)}
    for k in (1, 2, 3):
        summary[f"{k}_objects"] = agg([r for r in recs if r["n_objects"] == k])
    for t in sorted({r["template"] for r in recs}):
        summary[f"template:{t}"] = agg([r for r in recs if r["template"] == t])
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m daamkit.world.quality", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=None, help="pipeline folder (default: the shipped model)")
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--split", choices=["heldout", "test", "train"], default="heldout")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="folder for summary.json, records.jsonl and a grid")
    a = p.parse_args(argv)
    import torch

    from daamkit.world import load_pipeline

    if a.threads:
        torch.set_num_threads(a.threads)
    pipe = load_pipeline(a.model)
    if a.split == "heldout":
        scenes = heldout_captions(a.n, 10_000 + a.seed)
    else:
        scenes = [make_scene(10_000_000 + a.seed + i, a.split) for i in range(a.n)]
    t0 = time.time()
    summary, recs, images = evaluate_generation(pipe, scenes, a.steps, a.guidance, a.batch, a.seed)
    summary["seconds"] = time.time() - t0
    summary["settings"] = {k: v for k, v in vars(a).items()}
    print(json.dumps(summary["all"], indent=1))
    if a.out:
        from PIL import Image

        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        with open(out / "records.jsonl", "w") as f:
            for r in recs:
                f.write(json.dumps(r) + "\n")
        k = min(64, len(images))
        grid = Image.new("RGB", (64 * 8, 64 * math.ceil(k / 8)), "white")
        for i, im in enumerate(images[:k]):
            grid.paste(im, ((i % 8) * 64, (i // 8) * 64))
        grid.save(out / "grid.png")
        (out / "grid_captions.txt").write_text("\n".join(s.caption for s in scenes[:k]) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
