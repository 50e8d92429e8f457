"""The DAAM paper's COCO-Gen protocol, on the shapes world.

Generate images from held-out captions, recover the objects that were actually drawn (the world's
flat colours make exact segmentation possible), threshold each noun's (and colour adjective's) DAAM
map at tau, and score it by IoU against the drawn object's mask. Trivial baselines are thresholded
the same way. Words whose object was not drawn are not scored (as in the paper, which scores the
objects a segmenter finds) and the generation accuracy says how often that happens.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from daamkit.errors import DaamkitError
from daamkit.evaluate.baselines import BASELINES
from daamkit.heatmap import GlobalHeatMap
from daamkit.metrics import mask_iou, scaled_threshold_mask
from daamkit.stats import bootstrap_mean_ci

DEFAULT_TAUS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


class EvalError(DaamkitError, ValueError):
    """Nothing could be evaluated (no runs, or every run damaged or without its image)."""


@dataclass
class WordScore:
    image: int
    caption: str
    word: str
    kind: str  # "noun" or "colour"
    occurrence: int
    iou: dict[str, float]  # tau (as text) -> IoU of the word map
    baselines: dict[str, dict[str, float]]  # baseline -> tau -> IoU
    peak_inside: bool  # the map's maximum lies inside the drawn object


@dataclass
class EvalResult:
    scores: list[WordScore] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)  # one generation check per image
    taus: tuple[float, ...] = DEFAULT_TAUS
    settings: dict[str, Any] = field(default_factory=dict)
    # runs left out of a records evaluation: {"id", "reason"}; damaged ones are listed, not fatal
    skipped: list[dict[str, str]] = field(default_factory=list)

    # ---- summaries -----------------------------------------------------------------------------
    def miou(self, kind: str, tau: float, baseline: str | None = None) -> tuple[float, float, float]:
        key = _tau_key(tau)
        vals = [
            (s.iou[key] if baseline is None else s.baselines[baseline][key]) for s in self.scores if s.kind == kind
        ]
        return bootstrap_mean_ci(vals)

    def generation(self) -> dict[str, tuple[float, float, float]]:
        """Per-image rates: every requested object drawn in its colour / also in its shape / exactly the
        scene asked for; and the per-image share of requested colours present."""
        return {
            "all_objects_drawn": bootstrap_mean_ci([float(c["objects_present"] == 1.0) for c in self.checks]),
            "all_objects_right_shape": bootstrap_mean_ci([float(c["shapes_correct"] == 1.0) for c in self.checks]),
            "exact_scene": bootstrap_mean_ci([float(c["exact"]) for c in self.checks]),
            "colours_present": bootstrap_mean_ci([float(c["colors_present"]) for c in self.checks]),
        }

    def summary(self) -> dict[str, Any]:
        kinds = sorted({s.kind for s in self.scores})
        baselines = sorted({b for s in self.scores for b in s.baselines})
        table: dict[str, Any] = {}
        for kind in kinds:
            rows = {"daam": {_tau_key(t): self.miou(kind, t) for t in self.taus}}
            for b in baselines:
                rows[b] = {_tau_key(t): self.miou(kind, t, b) for t in self.taus}
            n = sum(1 for s in self.scores if s.kind == kind)
            peak = bootstrap_mean_ci([float(s.peak_inside) for s in self.scores if s.kind == kind])
            table[kind] = {"n": n, "miou": rows, "peak_inside": peak}
        return {
            "images": len(self.checks),
            "taus": list(self.taus),
            "generation": self.generation(),
            "words": table,
            "settings": self.settings,
            "skipped": len(self.skipped),
        }

    def best_baseline(self, kind: str, tau: float = 0.4) -> tuple[str, float]:
        names = sorted({b for s in self.scores for b in s.baselines})
        best = max(names, key=lambda b: self.miou(kind, tau, b)[0])
        return best, self.miou(kind, tau, best)[0]

    # ---- outputs -------------------------------------------------------------------------------
    def markdown(self, tau: float = 0.4) -> str:
        s = self.summary()
        lines = [f"Images: {s['images']}. mIoU at tau = {tau} with 95% bootstrap intervals.", ""]
        if self.skipped:
            lines[-1:-1] = [f"Skipped runs: {len(self.skipped)} (listed in eval.json)."]
        gen = s["generation"]
        lines += [
            "| generation | rate | 95% CI |",
            "|---|---|---|",
            *[f"| {k.replace('_', ' ')} | {v[0]:.3f} | {v[1]:.3f}-{v[2]:.3f} |" for k, v in gen.items()],
            "",
            "| words | n | map | mIoU | 95% CI |",
            "|---|---|---|---|---|",
        ]
        key = _tau_key(tau)
        for kind, t in s["words"].items():
            for name, row in t["miou"].items():
                m, lo, hi = row[key]
                lines.append(f"| {kind} | {t['n']} | {name} | {m:.3f} | {lo:.3f}-{hi:.3f} |")
            p = t["peak_inside"]
            lines.append(f"| {kind} | {t['n']} | peak of the map inside its object | {p[0]:.3f} | {p[1]:.3f}-{p[2]:.3f} |")
        lines += ["", "mIoU of the DAAM maps against tau:", "", "| words | " + " | ".join(map(str, self.taus)) + " |",
                  "|---|" + "---|" * len(self.taus)]
        for kind, t in s["words"].items():
            lines.append(f"| {kind} | " + " | ".join(f"{t['miou']['daam'][_tau_key(x)][0]:.3f}" for x in self.taus) + " |")
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {"summary": self.summary(), "scores": [asdict(s) for s in self.scores], "checks": self.checks,
                "skipped": self.skipped}

    def plot(self, path: str | Path | None = None):
        from matplotlib.figure import Figure

        fig = Figure(figsize=(5.5, 3.6), layout="constrained")
        ax = fig.add_subplot()
        kinds = sorted({s.kind for s in self.scores})
        baselines = sorted({b for s in self.scores for b in s.baselines})
        for kind in kinds:
            m = [self.miou(kind, t) for t in self.taus]
            ax.plot(self.taus, [x[0] for x in m], marker="o", label=f"DAAM ({kind}s)")
            ax.fill_between(self.taus, [x[1] for x in m], [x[2] for x in m], alpha=0.2)
        for b in baselines:
            ax.plot(self.taus, [self.miou("noun", t, b)[0] for t in self.taus], ls="--", label=f"{b} (nouns)")
        ax.set_xlabel("threshold tau")
        ax.set_ylabel("mIoU")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        if path is not None:
            fig.savefig(path, dpi=150)
        return fig

    def save(self, out_dir: str | Path, tau: float = 0.4) -> dict[str, str]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "eval.json").write_text(json.dumps(self.to_json(), indent=1))
        (out / "eval.md").write_text(self.markdown(tau))
        self.plot(out / "miou_vs_tau.png")
        return {"json": str(out / "eval.json"), "markdown": str(out / "eval.md"), "plot": str(out / "miou_vs_tau.png")}


def _tau_key(tau: float) -> str:
    return f"{tau:g}"


def score_run(
    heat_maps: GlobalHeatMap,
    image: Any,
    caption: str,
    taus: Sequence[float] = DEFAULT_TAUS,
    image_index: int = 0,
    rng: np.random.Generator | None = None,
) -> tuple[list[WordScore], dict]:
    """Score every noun and colour adjective of one generated shapes-world image."""
    from daamkit.world import COLORS, PLURALS, SHAPES, drawn_masks, generation_accuracy

    rng = rng or np.random.default_rng(image_index)
    check = generation_accuracy(image, caption)
    masks = drawn_masks(image, caption)
    size = heat_maps.image_size
    nouns = set(SHAPES) | set(PLURALS.values())
    scores: list[WordScore] = []
    for word, per_occurrence in masks.items():
        kind = "noun" if word in nouns else "colour" if word in COLORS else None
        if kind is None:
            continue
        for k, truth in enumerate(per_occurrence):
            if truth is None:
                continue  # the object was not drawn: nothing to score against
            try:
                wmap = heat_maps.word(word, occurrence=k)
            except (KeyError, ValueError):
                continue
            heat = wmap.normalized().numpy()
            if heat.shape != truth.shape:
                raise ValueError(f"map {heat.shape} and drawn mask {truth.shape} differ in size")
            others = [w for w in heat_maps.words if w != word and w in nouns] or [
                w for w in heat_maps.words if w != word
            ]
            base_maps = {name: fn(size, rng) for name, fn in BASELINES.items()}
            if others:
                base_maps["other word"] = heat_maps.word(others[0]).normalized().numpy()
            scores.append(
                WordScore(
                    image=image_index,
                    caption=caption,
                    word=word,
                    kind=kind,
                    occurrence=k,
                    iou={_tau_key(t): mask_iou(scaled_threshold_mask(heat, t), truth) for t in taus},
                    baselines={
                        name: {_tau_key(t): mask_iou(scaled_threshold_mask(b, t), truth) for t in taus} for name, b in base_maps.items()
                    },
                    peak_inside=bool(truth.flat[int(np.argmax(heat))]),
                )
            )
    return scores, {"image": image_index, "caption": caption, **check.to_dict()}


def evaluate_records(records: Iterable[Any], taus: Sequence[float] = DEFAULT_TAUS) -> EvalResult:
    """Score saved runs (``RunRecord``s with their image), e.g. ``daamkit.load_runs(dir)``.

    Given a :class:`~daamkit.io.runs.Runs`, a damaged, missing or out-of-directory record is skipped and
    listed in ``result.skipped`` with the reason, as is a record without its image; a plain iterable
    of records raises whatever its iteration raises. Raises :class:`EvalError` if no image is left to
    score.
    """
    from daamkit.io.runs import Runs

    result = EvalResult(taus=tuple(taus))
    if isinstance(records, Runs):
        pairs: Iterable[tuple[str, Any, Exception | None]] = (
            (entry["id"], rec, err) for entry, rec, err in records.items_or_errors()
        )
    else:
        pairs = ((str(i), rec, None) for i, rec in enumerate(records))
    seen = 0
    for i, (run_id, rec, err) in enumerate(pairs):
        seen += 1
        if err is not None:
            result.skipped.append({"id": run_id, "reason": f"damaged: {err}"})
            continue
        if rec.heat_maps.is_video:
            result.skipped.append({"id": run_id, "reason": "a video's record (the protocol scores images)"})
            continue
        if rec.image is None:
            result.skipped.append({"id": run_id, "reason": "no image in the record (saved with --no-image?)"})
            continue
        s, c = score_run(rec.heat_maps, rec.image, rec.prompt, taus, image_index=i)
        result.scores += s
        result.checks.append(c)
    if not result.checks:
        where = f" in {records.root}" if isinstance(records, Runs) else ""
        why = f"{seen} run(s){where}, none with a readable record and image" if seen else f"no runs{where}"
        raise EvalError(f"nothing to evaluate: {why}" + (f" (first: {result.skipped[0]['id']}: "
                                                         f"{result.skipped[0]['reason']})" if result.skipped else ""))
    return result


def evaluate_world(
    pipe: Any,
    n: int = 200,
    seed: int = 0,
    steps: int = 20,
    guidance_scale: float = 5.0,
    taus: Sequence[float] = DEFAULT_TAUS,
    batch_size: int = 16,
    progress: bool = True,
    trace_options: dict | None = None,
) -> EvalResult:
    """Run the protocol on ``n`` held-out captions (scene seeds ``seed .. seed+n-1``)."""
    import torch
    from tqdm.auto import tqdm

    from daamkit.jobs.generate import traced_generation
    from daamkit.world import make_heldout_scene

    captions = [make_heldout_scene(seed + i).caption for i in range(n)]
    result = EvalResult(
        taus=tuple(taus),
        settings={"n": n, "seed": seed, "steps": steps, "guidance_scale": guidance_scale, "split": "heldout",
                  "trace": trace_options or {}},
    )
    pipe.set_progress_bar_config(disable=True)
    bar = tqdm(total=n, desc="eval", disable=not progress)
    for start in range(0, n, batch_size):
        batch = captions[start : start + batch_size]
        # CPU generators whatever the pipeline's device (not make_generators): the noise, and so the
        # reported figures, must not depend on where the model runs.
        gens = [torch.Generator().manual_seed(seed + start + j) for j in range(len(batch))]
        pairs = traced_generation(pipe, batch, generator=gens, steps=steps, guidance_scale=guidance_scale,
                                  trace_options=trace_options)
        for j, (image, hm) in enumerate(pairs):
            s, c = score_run(hm, image, batch[j], taus, image_index=start + j)
            result.scores += s
            result.checks.append(c)
        bar.update(len(batch))
    bar.close()
    return result
