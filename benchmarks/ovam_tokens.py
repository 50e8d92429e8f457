"""OVAM token optimisation on the shapes world: does a token learned from one image of a shape map that
shape better on held-out images than the plain word?

For each shape noun: one training image (the first held-out scene from ``--train-seed`` on whose caption
names the shape in the singular and whose object was drawn) is traced with its queries kept, and one
token is learned from the drawn mask (``optimize_token``, started at the word, at ``--positions``
positions). Then ``--n`` held-out images that name the shape (scenes from ``--seed`` on, disjoint from
the training scenes) are generated three times: with the word encoded once (``open_vocabulary=[word]``),
with the word at ``--positions`` positions (``encode_positions``) and with the learned token, and the
noun's map is scored by IoU against the drawn object at tau (``daamkit eval``'s thresholding); the
prompt word's DAAM map is reported beside them. All runs must give the same image. The pooled means come
with 95% bootstrap intervals, and the token's gain over the word at the same positions with a paired one.
Where the caption names other shapes that were drawn, the share of the map's tau region that lies on
them says whether a map picks its own shape or any object.

``--model`` scores another shapes-world model, e.g. the one trained without the grounding loss
(``docs/model_card.md``), whose word maps do not follow their objects: the setting OVAM's token
optimisation is for. The shipped model was trained to ground its words, so its words already map
what a mask asks.

The shapes world's text encoder has no layers, so its embeddings carry their position and an object's
image queries match the position its noun had in the prompt: a word encoded once sits at position 1,
and a token learned at one position learns the training prompt's. ``--positions 14`` covers the
positions the world's captions put nouns at (chosen on scenes from 200000 on, not on the held-out set).

    python benchmarks/ovam_tokens.py --n 20
    python benchmarks/ovam_tokens.py --n 20 --model runs/world_ungrounded/model
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from PIL import Image

from daamkit import trace
from daamkit.jobs.pipeline import load_pipeline
from daamkit.methods import OvamMethod, encode_positions, optimize_token
from daamkit.metrics import mask_iou, scaled_threshold_mask
from daamkit.stats import bootstrap_mean_ci
from daamkit.tokens import split_words
from daamkit.world import PLURALS, SHAPES, default_model_path, drawn_masks, make_heldout_scene

ALL_NOUNS = {*SHAPES, *PLURALS.values()}


def names_shape(caption: str, shape: str) -> bool:
    return shape in split_words(caption)


def pil(images: np.ndarray) -> list[Image.Image]:
    return [Image.fromarray((im * 255).round().astype("uint8")) for im in images]


def generate(pipe, captions, seeds, args, **trace_kw):
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    with trace(pipe, **trace_kw) as tc:
        out = pipe(captions, num_inference_steps=args.steps, guidance_scale=args.guidance, generator=gens,
                   output_type="np").images
    return tc, out


def training_image(pipe, shape: str, args):
    """The first scene from ``args.train_seed`` on whose caption names ``shape`` and whose object was
    drawn, traced with its OVAM queries kept: (trace, scene, caption, drawn mask)."""
    k = args.train_seed
    while True:
        caption = make_heldout_scene(k).caption
        if names_shape(caption, shape):
            tc, out = generate(pipe, [caption], [k], args, methods=[OvamMethod([shape], keep_queries=True)])
            truth = drawn_masks(pil(out)[0], caption).get(shape, [None])[0]
            if truth is not None:
                return tc, k, caption, truth
        k += 1


def scenes_naming(shape: str, seed: int, n: int) -> list[tuple[int, str]]:
    """The first ``n`` (scene, caption) from ``seed`` on whose caption names ``shape``."""
    scenes, s = [], seed
    while len(scenes) < n:
        caption = make_heldout_scene(s).caption
        if names_shape(caption, shape):
            scenes.append((s, caption))
        s += 1
    return scenes


def other_objects(drawn: dict, shape: str, truth: np.ndarray) -> np.ndarray | None:
    """The drawn objects of the other shape nouns of a caption (None if it has none drawn)."""
    masks = [m for word, ms in drawn.items() if word in ALL_NOUNS and word != shape for m in ms if m is not None]
    union = np.any(masks, axis=0) & ~truth if masks else None
    return union if union is not None and union.any() else None


def region(wmap, tau: float) -> np.ndarray:
    """A word map's tau region (``daamkit eval``'s thresholding)."""
    return scaled_threshold_mask(wmap.normalized().numpy(), tau)


def iou(wmap, truth, tau: float) -> float:
    return mask_iou(region(wmap, tau), truth)


def scene_parser(description: str, *, seed: int, seed_help: str, n_help: str, threads: int) -> argparse.ArgumentParser:
    """The options of the shapes-world token benchmarks: which scenes, how they are generated and scored."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--n", type=int, default=20, help=n_help)
    p.add_argument("--seed", type=int, default=seed, help=seed_help)
    p.add_argument("--train-seed", type=int, default=100_000, help="first scene searched for training images")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--positions", type=int, default=14,
                   help="positions the word and the token are encoded at (1: once, as before)")
    p.add_argument("--tau", type=float, default=0.4)
    p.add_argument("--batch", type=int, default=10)
    p.add_argument("--threads", type=int, default=threads)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES))
    p.add_argument("--json", help="write the per-shape results here")
    p.add_argument("--model", help="a shapes-world model folder (default: the shipped model)")
    return p


def world_pipeline(args: argparse.Namespace):
    """The shapes-world pipeline of ``args.model`` (default: the shipped one), on ``args.threads`` threads,
    without progress bars."""
    torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model or default_model_path(), progress=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main() -> None:
    p = scene_parser(__doc__.split("\n")[0], seed=0, seed_help="first held-out scene of the evaluation",
                     n_help="held-out images per shape", threads=1)
    p.add_argument("--iterations", type=int, default=100, help="optimize_token's iterations (its default)")
    p.add_argument("--lr", type=float, default=1.0, help="optimize_token's lr (its default)")
    args = p.parse_args()
    pipe = world_pipeline(args)

    rows = []
    for shape in args.shapes:
        t0 = time.time()
        # ---- learn the token on one image
        tc, k, caption, truth = training_image(pipe, shape, args)
        train_plain = iou(tc.heat_maps(0, method="ovam").word(shape), truth, args.tau)
        token = optimize_token(tc, truth, init=shape, iterations=args.iterations, lr=args.lr,
                               positions=args.positions)
        word_at = encode_positions(pipe, shape, args.positions)
        del tc
        tc, again = generate(pipe, [caption], [k], args, open_vocabulary=[token])
        train_token = iou(tc.heat_maps(0, method="ovam").word(shape), truth, args.tau)
        del tc
        t_train = time.time() - t0

        # ---- held-out images naming the shape
        scenes = scenes_naming(shape, args.seed, args.n)
        scores: dict[str, list[float]] = {"daam": [], "ovam_word": [], "ovam_word_at": [], "ovam_token": []}
        off: dict[str, list[float]] = {"ovam_word_at": [], "ovam_token": []}  # map share on the other objects
        for start in range(0, len(scenes), args.batch):
            part = scenes[start : start + args.batch]
            seeds, captions = [x[0] for x in part], [x[1] for x in part]
            tc_word, out_word = generate(pipe, captions, seeds, args, open_vocabulary=[shape])
            tc_token, out_token = generate(pipe, captions, seeds, args, open_vocabulary=[token])
            tc_at, out_at = generate(pipe, captions, seeds, args, open_vocabulary=[word_at])
            if not (np.array_equal(out_word, out_token) and np.array_equal(out_word, out_at)):
                raise SystemExit("the images differ between the two traces: OVAM changed the generation")
            for j, image in enumerate(pil(out_word)):
                drawn = drawn_masks(image, captions[j])
                truth = drawn.get(shape, [None])[0]
                if truth is None:
                    continue  # not drawn: nothing to score against, as in daamkit eval
                regions = {
                    "daam": region(tc_word.heat_maps(j).word(shape, occurrence=0), args.tau),
                    "ovam_word": region(tc_word.heat_maps(j, method="ovam").word(shape), args.tau),
                    "ovam_word_at": region(tc_at.heat_maps(j, method="ovam").word(shape), args.tau),
                    "ovam_token": region(tc_token.heat_maps(j, method="ovam").word(shape), args.tau),
                }
                for name, r in regions.items():
                    scores[name].append(mask_iou(r, truth))
                others = other_objects(drawn, shape, truth)
                if others is not None:  # does the map pick this shape, or any object?
                    for name in off:
                        r = regions[name]
                        off[name].append(float((r & others).sum() / max(1, r.sum())))
        row = {"shape": shape, "train_scene": k, "train_iou_word": train_plain,
               "train_iou_token": train_token, "scored": len(scores["daam"]),
               **{name: float(np.mean(v)) if v else float("nan") for name, v in scores.items()},
               "scores": scores, "on_other_objects": off,
               "train_seconds": t_train, "seconds": time.time() - t0}
        rows.append(row)
        print(f"{shape:9s} train image: word {train_plain:.3f} -> token {train_token:.3f};  held-out "
              f"n={row['scored']:3d}  DAAM {row['daam']:.3f}  OVAM word {row['ovam_word']:.3f}  "
              f"OVAM word x{args.positions} {row['ovam_word_at']:.3f}  OVAM token {row['ovam_token']:.3f}  "
              f"({row['seconds']:.0f} s)", flush=True)

    print()
    print(f"mIoU at tau={args.tau} over held-out images that name the shape (steps {args.steps}, "
          f"{args.iterations} iterations, lr {args.lr}, {args.positions} positions)")
    print(f"| shape | train IoU word | train IoU token | n | DAAM (prompt word) | OVAM word | OVAM word x{args.positions} "
          "| OVAM learned token | token - word |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['train_iou_word']:.3f} | {r['train_iou_token']:.3f} | {r['scored']} | "
              f"{r['daam']:.3f} | {r['ovam_word']:.3f} | {r['ovam_word_at']:.3f} | {r['ovam_token']:.3f} | "
              f"{r['ovam_token'] - r['ovam_word']:+.3f} |")
    names = ("daam", "ovam_word", "ovam_word_at", "ovam_token")
    pooled = {name: [v for r in rows for v in r["scores"][name]] for name in names}
    means = {name: bootstrap_mean_ci(pooled[name]) for name in names}
    print()
    print(f"pooled over {len(pooled['daam'])} held-out images, mean [95% bootstrap interval]:")
    for name in names:
        m, lo, hi = means[name]
        print(f"  {name:13s} {m:.3f} [{lo:.3f}, {hi:.3f}]")
    for a, b in (("ovam_token", "ovam_word_at"), ("ovam_token", "ovam_word"), ("ovam_word_at", "ovam_word")):
        m, lo, hi = bootstrap_mean_ci(np.subtract(pooled[a], pooled[b]))
        print(f"  {a} - {b}: {m:+.3f} [{lo:+.3f}, {hi:+.3f}] (paired)")
    print("share of the tau region on the caption's other shapes (images with another shape drawn):")
    shares = {}
    for name in ("ovam_word_at", "ovam_token"):
        xs = [v for r in rows for v in r["on_other_objects"][name]]
        shares[name] = bootstrap_mean_ci(xs) if xs else (float("nan"),) * 3
        print(f"  {name:13s} {shares[name][0]:.3f} [{shares[name][1]:.3f}, {shares[name][2]:.3f}]  (n={len(xs)})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"settings": vars(args), "rows": rows, "means": means, "on_other_objects": shares}, f, indent=1)


if __name__ == "__main__":
    main()
