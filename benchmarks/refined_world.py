"""DAAM against its self-attention refinement (``trace(refine=...)``, ``method="refined"``) on the
shapes world, with ``daamkit eval``'s protocol: held-out captions, nouns' and colours' maps thresholded
at tau and scored by IoU against the drawn objects.

Both maps come from one traced call per batch, so they describe the same images. Each ``--iterations``
value is one more trace of the same batch (same seeds: the same images, which is checked).

    python benchmarks/refined_world.py --n 24 --steps 20 --iterations 1 2
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from daamkit.evaluate.protocol import DEFAULT_TAUS, EvalResult, score_run
from daamkit.jobs.generate import traced_generation_maps
from daamkit.jobs.pipeline import load_pipeline
from daamkit.methods import RefinedMethod
from daamkit.world import default_model_path, make_heldout_scene


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=24, help="held-out captions (scene seeds --seed ...)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--iterations", type=int, nargs="+", default=[1], help="k of A^k M, one trace each")
    p.add_argument("--resolutions", type=int, nargs="+", default=None, help="downsampling factors (default: the finest with self-attention)")
    p.add_argument("--tau", type=float, default=0.4, help="the threshold reported in the table")
    p.add_argument("--json", dest="json_path", default=None)
    args = p.parse_args(argv)

    pipe = load_pipeline(default_model_path(), progress=False)
    pipe.set_progress_bar_config(disable=True)
    captions = [make_heldout_scene(args.seed + i).caption for i in range(args.n)]
    results = {"daam": EvalResult(taus=DEFAULT_TAUS)} | {f"refined k={k}": EvalResult(taus=DEFAULT_TAUS)
                                                           for k in args.iterations}
    seconds: dict[str, float] = {}
    for start in range(0, args.n, args.batch_size):
        batch = captions[start : start + args.batch_size]
        images = None
        for k in args.iterations:
            gens = [torch.Generator().manual_seed(args.seed + start + j) for j in range(len(batch))]
            method = RefinedMethod(resolutions=args.resolutions, iterations=k)
            t0 = time.perf_counter()
            pairs = traced_generation_maps(pipe, batch, generator=gens, steps=args.steps,
                                           guidance_scale=args.guidance, trace_options={"refine": method})
            seconds[f"k={k}"] = seconds.get(f"k={k}", 0.0) + time.perf_counter() - t0
            if images is None:
                images = [np.asarray(im) for im, _ in pairs]
                for j, (image, maps) in enumerate(pairs):
                    s, c = score_run(maps["daam"], image, batch[j], image_index=start + j)
                    results["daam"].scores += s
                    results["daam"].checks.append(c)
            elif any(not np.array_equal(a, np.asarray(b)) for a, (b, _) in zip(images, pairs, strict=True)):
                raise SystemExit("the same seeds gave other images: the trace changed the generation")
            for j, (image, maps) in enumerate(pairs):
                s, c = score_run(maps["refined"], image, batch[j], image_index=start + j)
                results[f"refined k={k}"].scores += s
                results[f"refined k={k}"].checks.append(c)
        print(f"{min(start + len(batch), args.n)}/{args.n} images", flush=True)

    table: dict[str, dict[str, dict[str, list[float]]]] = {}
    print(f"\nmIoU at tau={args.tau} [95% CI] on {args.n} held-out shapes-world images, {args.steps} steps")
    for name, res in results.items():
        table[name] = {}
        for kind in ("noun", "colour"):
            n = sum(1 for s in res.scores if s.kind == kind)
            if not n:
                continue
            mean, lo, hi = res.miou(kind, args.tau)
            best = {t: round(res.miou(kind, t)[0], 4) for t in DEFAULT_TAUS}
            table[name][kind] = {"miou": [mean, lo, hi], "n": n, "by_tau": best}  # type: ignore[dict-item]
            print(f"  {name:<12} {kind:<6} {mean:.3f} [{lo:.3f}, {hi:.3f}]  (n={n})  by tau: {best}")
    print(f"  time per trace of all images: {', '.join(f'{k} {v:.1f} s' for k, v in seconds.items())}")
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump({"settings": vars(args), "table": table, "seconds": seconds}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
