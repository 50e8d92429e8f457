"""``daamkit world train`` (rebuild the embedded model) and ``daamkit world quality`` (how well it draws)."""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from daamkit.cli.common import finite_float, positive_int, seed_int
from daamkit.cli.world_train import add_arguments as add_train_arguments
from daamkit.cli.world_train import main_from_args as train_main
from daamkit.world.quality import (
    autoencoder_ceiling,
    evaluate_generation,
    heldout_captions,
    one_step_restoration,
    restoration,
    word_sensitivity,
    word_similarity,
)
from daamkit.world.scenes import make_scene


def register(sub: argparse._SubParsersAction) -> None:
    w = sub.add_parser("world", help="the shapes world: train the embedded model, measure how well it draws")
    wsub = w.add_subparsers(dest="world_command", required=True)
    t = wsub.add_parser("train", help="train the shapes-world model from scratch")
    add_train_arguments(t)
    t.set_defaults(func=train_main)
    q = wsub.add_parser("quality", help="generation accuracy of a shapes-world model, judged by the world's segmentation")
    add_quality_arguments(q)
    q.set_defaults(func=quality_main)


def add_quality_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="pipeline folder (default: the shipped model)")
    p.add_argument("--n", type=positive_int, default=200)
    p.add_argument("--split", choices=["heldout", "test", "train"], default="heldout")
    p.add_argument("--steps", type=positive_int, default=20)
    p.add_argument("--guidance", type=finite_float, default=5.0)
    p.add_argument("--batch", type=positive_int, default=16)
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--out", default=None, help="folder for summary.json, records.jsonl and a grid")
    p.add_argument(
        "--sensitivity",
        action="store_true",
        help="instead of generating: how much the denoising loss depends on the shape noun and on the "
        "colour word (swap test on --n one-object training scenes)",
    )
    p.add_argument(
        "--ceiling",
        action="store_true",
        help="instead of generating: score the --n scenes' exact renders after a round trip through the "
        "VAE (the best any denoiser on this VAE can do) and as they are (the judge's own error)",
    )
    p.add_argument(
        "--restore",
        action="store_true",
        help="instead of generating: start from the --n scenes' exact renders noised to several strengths "
        "and sample back (and the UNet's one-step estimate at several timesteps), to see at which noise "
        "levels the shapes are lost",
    )


def quality_main(a: argparse.Namespace) -> int:
    import torch

    from daamkit.jobs.pipeline import load_pipeline
    from daamkit.world import default_model_path

    if a.threads:
        torch.set_num_threads(a.threads)
    pipe = load_pipeline(a.model or default_model_path())
    if a.sensitivity:
        res = word_sensitivity(pipe, n=a.n, seed=a.seed)
        print(f"noise-prediction MSE when one word is swapped, relative to the true caption (n = {res['n']})")
        print("t:       " + "".join(f"{t:>9}" for t in res["timesteps"]))
        for role, label in (("noun", "shape"), ("color", "colour")):
            print(f"{label:<9}" + "".join(f"{res[role][t]:>+9.1%}" for t in res["timesteps"]))
        sim = word_similarity(pipe)
        print(
            f"text encoder output, mean cosine between words of one kind: shapes {sim['noun']:.3f}, "
            f"colours {sim['color']:.3f} (1 = indistinguishable)"
        )
        return 0
    if a.split == "heldout":
        scenes = heldout_captions(a.n, 10_000 + a.seed)
    else:
        scenes = [make_scene(10_000_000 + a.seed + i, a.split) for i in range(a.n)]
    if a.ceiling:
        vae_rt, exact = autoencoder_ceiling(pipe, scenes)
        for label, summ in (("VAE round trip", vae_rt), ("exact renders", exact)):
            al = summ["all"]
            print(
                f"{label} (n = {al['n']}): all objects drawn {al['all_objects_drawn']:.3f}, all shapes right "
                f"{al['all_shapes_right']:.3f}, right shape per object {al['shapes_correct']:.3f}, "
                f"exact scene {al['exact']:.3f}"
            )
        return 0
    if a.restore:
        def row(label: str, summ: dict) -> str:
            by = [summ.get(f"{k}_objects", {}).get("all_shapes_right", float("nan")) for k in (1, 2, 3)]
            return (
                f"{label:<26}{summ['all']['all_shapes_right']:>8.3f}{by[0]:>8.2f}{by[1]:>8.2f}{by[2]:>8.2f}"
                f"{summ['all']['all_objects_drawn']:>10.3f}"
            )

        print(f"all shapes right (n = {len(scenes)}); by 1 / 2 / 3 objects; all objects drawn")
        for strength, summ in restoration(pipe, scenes, steps=a.steps, guidance=a.guidance, seed=a.seed).items():
            print(row(f"sampled from strength {strength:g}", summ))
        for t, summ in one_step_restoration(pipe, scenes, seed=a.seed).items():
            print(row(f"one step from t = {t}", summ))
        return 0
    t0 = time.time()
    summary, recs, images = evaluate_generation(pipe, scenes, a.steps, a.guidance, a.batch, a.seed)
    summary["seconds"] = time.time() - t0
    summary["settings"] = {k: v for k, v in vars(a).items() if k != "func"}
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
