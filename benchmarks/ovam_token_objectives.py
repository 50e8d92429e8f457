"""OVAM token optimisation on the shapes world: which training objective, if any, makes a token learned
from one image map its shape better on other images than the word it starts from?

For each shape: one training image (the first scene from ``--train-seed`` on whose caption names the
shape and whose object was drawn, as ``ovam_tokens.py`` picks it) is traced with its queries kept, and
one token per objective is learned from the drawn mask, started at the word at ``--positions``
positions (one offset shared by the copies, as ``optimize_token(..., positions=n)`` learns it):

* ``bce``: the library's objective (``optimize_token``): binary cross-entropy between the token's
  summed OVAM probability and the mask, start and end tokens as encoded; at 30 iterations / lr 0.01
  and 200 / 0.02 (small steps), 100 / 0.2, and 100 / 1.0 (``optimize_token``'s defaults; lr in units
  of the word's root-mean-square entry).
* ``bce_max``: the same on the map divided by its maximum, the form the evaluation thresholds;
  ``bce_max_start`` also learns the start token's row.
* ``ovam``: the objective of OVAM's code: the start token and the word's rows learned, the end token
  dropped, the two maps [start, word] min-max normalised together and scored by cross-entropy over the
  two against [1 - mask, mask]; the lowest-loss iterate kept.

Then ``--n`` images per shape that name it (scenes from ``--seed`` on; by default a validation range
disjoint from ``ovam_tokens.py``'s held-out scenes) are generated once with their queries kept, and every
token's map (``ovam_map``, the method's maps over the kept steps, to the image size bicubically as
``WordHeatMap.expand``) is scored by IoU against the drawn object at tau, beside the word at the same
positions. Pooled means with 95 % bootstrap intervals, and each objective's paired difference from
the word.

    python benchmarks/ovam_token_objectives.py --n 20     # ~10 min on 2 cores
    python benchmarks/ovam_token_objectives.py --n 20 --model runs/world_ungrounded/model
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ovam_tokens import generate, pil, scene_parser, scenes_naming, training_image, world_pipeline  # noqa: E402

from daamkit.methods import OvamMethod, encode_positions  # noqa: E402
from daamkit.methods.ovam import ovam_map  # noqa: E402
from daamkit.metrics import mask_iou, scaled_threshold_mask  # noqa: E402
from daamkit.stats import bootstrap_mean_ci  # noqa: E402
from daamkit.world import drawn_masks  # noqa: E402

# name: (loss, iterations, lr, learn the start row, drop the end row)
OBJECTIVES = {
    "bce_30": ("bce", 30, 0.01, False, False),
    "bce_200": ("bce", 200, 0.02, False, False),
    "bce_lr0.2_100": ("bce", 100, 0.2, False, False),
    "bce_lr1_100": ("bce", 100, 1.0, False, False),
    "bce_max_100": ("bce_max", 100, 0.02, False, False),
    "bce_max_start_100": ("bce_max", 100, 0.02, True, False),
    "ovam_100": ("ovam", 100, 0.02, True, True),
    "ovam_300": ("ovam", 300, 0.05, True, True),
}


def word_iou(grid_map: torch.Tensor, truth: np.ndarray, tau: float) -> float:
    e = F.interpolate(grid_map[None, None], size=truth.shape, mode="bicubic", align_corners=False)[0, 0]
    return mask_iou(scaled_threshold_mask(e.clamp(min=0).detach().numpy(), tau), truth)


def learn(tc, truth, base, rows, loss_name, iterations, lr, learn_start, drop_end):
    """The attribution rows learned from one mask by one objective, and its lowest loss."""
    first, n = rows[0], len(rows)
    grid = tuple(tc.config.grid) if tc.config.grid is not None else tuple(tc.generation.call.latent_hw)
    target = F.interpolate(torch.as_tensor(truth, dtype=torch.float32)[None, None], size=grid, mode="area")[0, 0]
    head = base.embeds[:first].float()
    tail = base.embeds[:0].float() if drop_end else base.embeds[rows[-1] + 1 :].float()
    start = base.embeds[rows].float()
    offset = torch.zeros(start.shape[1], requires_grad=True)
    head_offset = torch.zeros_like(head, requires_grad=True)
    scale = float(start.norm(dim=1).mean()) / max(1.0, start.shape[1] ** 0.5)
    opt = torch.optim.Adam([offset, head_offset] if learn_start else [offset], lr=lr * scale)
    best, best_loss = None, float("inf")
    with torch.enable_grad():
        for it in range(iterations + 1):
            ctx = torch.cat([head + head_offset, start + offset, tail])
            maps = ovam_map(tc, ctx, 0, base.space)
            tok = maps[first : first + n].sum(0)
            if loss_name == "bce":
                loss = F.binary_cross_entropy(tok.clamp(1e-6, 1 - 1e-6), target)
            elif loss_name == "bce_max":
                loss = F.binary_cross_entropy((tok / tok.max()).clamp(1e-6, 1 - 1e-6), target)
            else:
                two = torch.stack([maps[:first].sum(0), tok])
                two = (two - two.min()) / (two.max() - two.min())
                loss = -(torch.stack([1 - target, target]) * F.log_softmax(two, 0)).sum(0).mean()
            if float(loss.detach()) < best_loss:
                best_loss, best = float(loss.detach()), ctx.detach().clone()
            if it == iterations:
                break
            opt.zero_grad()
            loss.backward()
            opt.step()
    return best, best_loss


def main() -> None:
    args = scene_parser(__doc__.split("\n")[0], seed=200_000, seed_help="first scene scored (default: a validation range)",
                        n_help="images per shape scored", threads=2).parse_args()
    pipe = world_pipeline(args)

    results = {}
    for shape in args.shapes:
        t0 = time.time()
        tc, k, _, truth = training_image(pipe, shape, args)
        base = encode_positions(pipe, shape, args.positions)
        rows = sorted({q for w in base.alignment.words for q in w.positions})
        tokens = {"word": (base.embeds.float(), 0.0)}
        for name, spec in OBJECTIVES.items():
            tokens[name] = learn(tc, truth, base, rows, *spec)
        train = {name: word_iou(ovam_map(tc, emb, 0, base.space)[rows[0] : rows[0] + len(rows)].sum(0), truth, args.tau)
                 for name, (emb, _) in tokens.items()}
        del tc
        scenes = scenes_naming(shape, args.seed, args.n)
        scores: dict[str, list[float]] = {name: [] for name in tokens}
        for b in range(0, len(scenes), args.batch):
            part = scenes[b : b + args.batch]
            tc, out = generate(pipe, [c for _, c in part], [x for x, _ in part], args,
                               methods=[OvamMethod([shape], keep_queries=True)])
            for j, image in enumerate(pil(out)):
                truth = drawn_masks(image, part[j][1]).get(shape, [None])[0]
                if truth is None:
                    continue  # not drawn: nothing to score against, as in daamkit eval
                with torch.no_grad():
                    for name, (emb, _) in tokens.items():
                        m = ovam_map(tc, emb, j, base.space)[rows[0] : rows[0] + len(rows)].sum(0)
                        scores[name].append(word_iou(m, truth, args.tau))
            del tc
        results[shape] = {"train_scene": k, "train_iou": train, "scores": scores,
                          "loss": {name: v[1] for name, v in tokens.items()}}
        print(f"{shape:9s} n={len(scores['word']):3d}  train IoU "
              + " ".join(f"{name} {v:.3f}" for name, v in train.items())
              + "\n          held-out mIoU " + " ".join(f"{name} {np.mean(v):.3f}" for name, v in scores.items())
              + f"  ({time.time() - t0:.0f} s)", flush=True)

    pooled = {name: [x for r in results.values() for x in r["scores"][name]] for name in ["word", *OBJECTIVES]}
    print(f"\nmIoU at tau={args.tau}, {len(pooled['word'])} images (scenes from {args.seed}), token learned at "
          f"{args.positions} positions from one image per shape; mean [95 % bootstrap], paired minus the word:")
    summary = {}
    for name, xs in pooled.items():
        m, lo, hi = bootstrap_mean_ci(xs)
        d, dlo, dhi = bootstrap_mean_ci(np.subtract(xs, pooled["word"]))
        train = np.mean([r["train_iou"][name] for r in results.values()])
        summary[name] = {"mean": m, "low": lo, "high": hi, "minus_word": d, "minus_word_low": dlo,
                         "minus_word_high": dhi, "train_iou_mean": float(train)}
        print(f"  {name:18s} {m:.3f} [{lo:.3f}, {hi:.3f}]   {d:+.3f} [{dlo:+.3f}, {dhi:+.3f}]   "
              f"(training image IoU {train:.3f})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "objectives": OBJECTIVES, "results": results, "summary": summary}, f,
                      indent=1)


if __name__ == "__main__":
    main()
