"""``explain`` on rendered shapes-world scenes (images the model never made): how strength and DDIM
inversion trade the maps' fit to the drawn shapes against how far the regeneration drifts.

For each of ``--n`` rendered test scenes, each strength and each noising (seeded noise, DDIM inversion):
the noun maps are thresholded at tau and scored by IoU against the drawn objects; the best trivial
baseline (whole image, centre Gaussian) is reported beside them; drift is the mean absolute difference,
in 0..255 grey levels, between the regenerated image and the scene.

    python benchmarks/explain_strength.py --n 8 --steps 20
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from daamkit.evaluate.baselines import centre_gaussian, whole_image
from daamkit.jobs.explain import explain
from daamkit.jobs.pipeline import load_pipeline
from daamkit.metrics import mask_iou, threshold_mask
from daamkit.world import default_model_path, make_scene


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, default=5.0)
    ap.add_argument("--strengths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 1.0])
    args = ap.parse_args()
    pipe = load_pipeline(default_model_path(), dtype="float32")
    pipe.set_progress_bar_config(disable=True)
    scenes = [make_scene(i, "test") for i in range(args.n)]
    rows = []
    for inversion in (None, "ddim"):
        for strength in args.strengths:
            ious, bases, drift = [], [], []
            start = time.perf_counter()
            for scene in scenes:
                r = explain(pipe, scene.image, scene.caption, strength=strength, inversion=inversion,
                            steps=args.steps, guidance_scale=args.guidance)
                drift.append(float(np.abs(np.asarray(r.regenerated, float) - np.asarray(scene.image, float)).mean()))
                seen: dict[str, int] = {}
                for word, role, truth in scene.word_masks():
                    k = seen.get(word, 0)
                    seen[word] = k + 1
                    if role != "noun" or truth is None:
                        continue
                    heat = r.heat_maps.word(word, occurrence=k).normalized().numpy()
                    ious.append(mask_iou(threshold_mask(heat), truth))
                    bases.append(max(mask_iou(threshold_mask(b(truth.shape)), truth)
                                     for b in (whole_image, centre_gaussian)))
            row = {"inversion": inversion or "noise", "strength": strength, "nouns": len(ious),
                   "iou": round(float(np.mean(ious)), 3), "baseline": round(float(np.mean(bases)), 3),
                   "beats_baseline": round(float(np.mean(np.array(ious) > np.array(bases))), 2),
                   "drift": round(float(np.mean(drift)), 2),
                   "s_per_image": round((time.perf_counter() - start) / len(scenes), 2)}
            rows.append(row)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
