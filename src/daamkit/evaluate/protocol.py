"""The DAAM paper's COCO-Gen protocol, on the shapes world.

Generate images from held-out captions, recover the objects that were actually drawn (the world's
flat colours make exact segmentation possible), threshold each noun's (and colour adjective's) DAAM
map at tau, and score it by IoU against the drawn object's mask. Trivial baselines are thresholded
the same way. Words whose object was not drawn are not scored (as in the paper, which scores the
objects a segmenter finds) and the generation accuracy says how often that happens.

Several attribution methods (:data:`daamkit.methods.METHODS`) can be scored side by side on the same
images: one pipeline call per batch traces all of them, and every method's maps of a word are scored
against the same drawn mask. Methods that map words given to them (OVAM) get each scene's nouns and
colours, in caption order, through :meth:`~daamkit.methods.AttributionMethod.for_images`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
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
    method: str = "daam"  # the attribution method whose map was scored


@dataclass
class EvalResult:
    scores: list[WordScore] = field(default_factory=list)
    checks: list[dict] = field(default_factory=list)  # one generation check per image
    taus: tuple[float, ...] = DEFAULT_TAUS
    settings: dict[str, Any] = field(default_factory=dict)
    # runs left out of a records evaluation: {"id", "reason"}; damaged ones are listed, not fatal
    skipped: list[dict[str, str]] = field(default_factory=list)
    # the attribution methods scored, in table order; the baselines are read off the first one's scores
    methods: tuple[str, ...] = ("daam",)
    # methods asked for but not scored, and why (e.g. concept maps on a UNet)
    notes: list[str] = field(default_factory=list)

    # ---- summaries -----------------------------------------------------------------------------
    def miou(
        self, kind: str, tau: float, baseline: str | None = None, method: str | None = None
    ) -> tuple[float, float, float]:
        """Mean IoU of ``method``'s maps (default: the first method) of ``kind`` words at ``tau``, or of
        ``baseline`` on the same words, with its 95% bootstrap interval."""
        key = _tau_key(tau)
        method = method or self.methods[0]
        vals = [
            (s.iou[key] if baseline is None else s.baselines[baseline][key])
            for s in self.scores
            if s.kind == kind and s.method == method
        ]
        return bootstrap_mean_ci(vals)

    def paired_difference(self, kind: str, tau: float, method: str, reference: str | None = None
                          ) -> tuple[float, float, float]:
        """Mean of ``method``'s IoU minus ``reference``'s (default: the first method) over the words both
        scored, with its 95% bootstrap interval: on the same images and words, the pairs make the
        interval of the difference much narrower than the two methods' intervals suggest."""
        key = _tau_key(tau)
        reference = reference or self.methods[0]
        ref = {(s.image, s.word, s.occurrence): s.iou[key] for s in self.scores
               if s.kind == kind and s.method == reference}
        return bootstrap_mean_ci([s.iou[key] - ref[(s.image, s.word, s.occurrence)] for s in self.scores
                                  if s.kind == kind and s.method == method and (s.image, s.word, s.occurrence) in ref])

    def generation(self) -> dict[str, tuple[float, float, float]]:
        """Per-image rates: every requested object drawn in its colour / also in its shape / exactly the
        scene asked for; and the per-image share of requested colours present."""
        return {
            "all_objects_drawn": bootstrap_mean_ci([float(c["objects_present"] == 1.0) for c in self.checks]),
            "all_objects_right_shape": bootstrap_mean_ci([float(c["shapes_correct"] == 1.0) for c in self.checks]),
            "exact_scene": bootstrap_mean_ci([float(c["exact"]) for c in self.checks]),
            "colours_present": bootstrap_mean_ci([float(c["colors_present"]) for c in self.checks]),
        }

    def _kinds(self) -> list[str]:
        return sorted({s.kind for s in self.scores})

    def _baselines(self) -> list[str]:
        return sorted({b for s in self.scores if s.method == self.methods[0] for b in s.baselines})

    def summary(self) -> dict[str, Any]:
        """``words[kind]["miou"]`` holds one row per method and per baseline (method names and
        baseline names differ), each tau -> (mean, low, high); ``n`` and ``peak_inside`` are the
        first method's, ``by_method`` has them for every method, and for the others ``minus_first``,
        the paired difference to the first method (:meth:`paired_difference`) per tau."""
        table: dict[str, Any] = {}
        for kind in self._kinds():
            rows = {m: {_tau_key(t): self.miou(kind, t, method=m) for t in self.taus} for m in self.methods}
            for b in self._baselines():
                rows[b] = {_tau_key(t): self.miou(kind, t, b) for t in self.taus}
            by_method = {}
            for m in self.methods:
                mine = [s for s in self.scores if s.kind == kind and s.method == m]
                by_method[m] = {"n": len(mine), "peak_inside": bootstrap_mean_ci([float(s.peak_inside) for s in mine])}
                if m != self.methods[0]:
                    by_method[m]["minus_first"] = {_tau_key(t): self.paired_difference(kind, t, m) for t in self.taus}
            first = by_method[self.methods[0]]
            table[kind] = {"n": first["n"], "miou": rows, "peak_inside": first["peak_inside"], "by_method": by_method}
        return {
            "images": len(self.checks),
            "taus": list(self.taus),
            "methods": list(self.methods),
            "notes": list(self.notes),
            "generation": self.generation(),
            "words": table,
            "settings": self.settings,
            "skipped": len(self.skipped),
        }

    def best_baseline(self, kind: str, tau: float = 0.4) -> tuple[str, float]:
        names = self._baselines()
        best = max(names, key=lambda b: self.miou(kind, tau, b)[0])
        return best, self.miou(kind, tau, best)[0]

    # ---- outputs -------------------------------------------------------------------------------
    def markdown(self, tau: float = 0.4) -> str:
        s = self.summary()
        lines = [f"Images: {s['images']}. mIoU at tau = {tau} with 95% bootstrap intervals.", ""]
        if self.skipped:
            lines[-1:-1] = [f"Skipped runs: {len(self.skipped)} (listed in eval.json)."]
        for note in self.notes:
            lines[-1:-1] = [f"Not scored: {note}"]
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
                n = t["by_method"][name]["n"] if name in t["by_method"] else t["n"]
                m, lo, hi = row[key]
                lines.append(f"| {kind} | {n} | {name} | {m:.3f} | {lo:.3f}-{hi:.3f} |")
            for name, own in t["by_method"].items():
                if "minus_first" in own:
                    m, lo, hi = own["minus_first"][key]
                    lines.append(f"| {kind} | {own['n']} | {name} minus {self.methods[0]} (paired) | {m:+.3f} | "
                                 f"{lo:+.3f} to {hi:+.3f} |")
            for name, own in t["by_method"].items():
                p = own["peak_inside"]
                label = "peak of the map inside its object" + (f" ({name})" if len(self.methods) > 1 else "")
                lines.append(f"| {kind} | {own['n']} | {label} | {p[0]:.3f} | {p[1]:.3f}-{p[2]:.3f} |")
        lines += ["", "mIoU against tau:", "", "| words | map | " + " | ".join(map(str, self.taus)) + " |",
                  "|---|---|" + "---|" * len(self.taus)]
        for kind, t in s["words"].items():
            for name, row in t["miou"].items():
                lines.append(f"| {kind} | {name} | " + " | ".join(f"{row[_tau_key(x)][0]:.3f}" for x in self.taus) + " |")
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {"summary": self.summary(), "scores": [asdict(s) for s in self.scores], "checks": self.checks,
                "skipped": self.skipped}

    def plot(self, path: str | Path | None = None):
        """mIoU against tau: one panel per word kind, one line (with its 95% band) per method, the
        baselines dashed in grey."""
        from matplotlib.figure import Figure

        kinds = self._kinds()
        fig = Figure(figsize=(5.5 * max(1, len(kinds)) * 0.8, 3.6), layout="constrained")
        axes = fig.subplots(1, max(1, len(kinds)), squeeze=False)[0]
        for ax, kind in zip(axes, kinds, strict=False):
            for method in self.methods:
                m = [self.miou(kind, t, method=method) for t in self.taus]
                ax.plot(self.taus, [x[0] for x in m], marker="o", label=method)
                ax.fill_between(self.taus, [x[1] for x in m], [x[2] for x in m], alpha=0.2)
            # grey, one dash pattern each: the colours stay the methods' however many there are
            for b, ls in zip(self._baselines(), ("--", ":", "-.", (0, (5, 1, 1, 1, 1, 1))) * 2, strict=False):
                ax.plot(self.taus, [self.miou(kind, t, b)[0] for t in self.taus], ls=ls, lw=1, color="0.45", label=b)
            ax.set_title(f"{kind}s", fontsize=9)
            ax.set_xlabel("threshold tau")
            ax.set_ylabel("mIoU")
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
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
    heat_maps: GlobalHeatMap | Mapping[str, GlobalHeatMap],
    image: Any,
    caption: str,
    taus: Sequence[float] = DEFAULT_TAUS,
    image_index: int = 0,
    rng: np.random.Generator | None = None,
) -> tuple[list[WordScore], dict]:
    """Score every noun and colour adjective of one generated shapes-world image.

    ``heat_maps``: one method's maps (scored as ``"daam"``) or several methods' maps of the same image by
    method name; every method's map of a word is scored against the same drawn mask, with the same
    trivial baselines ("other word" is the method's own map of another word). A word a method has no
    map of is left out of that method's scores.
    """
    from daamkit.world import COLORS, PLURALS, SHAPES, drawn_masks, generation_accuracy

    by_method = {"daam": heat_maps} if isinstance(heat_maps, GlobalHeatMap) else dict(heat_maps)
    if not by_method:
        raise ValueError("score_run needs the maps of at least one method")
    rng = rng or np.random.default_rng(image_index)
    check = generation_accuracy(image, caption)
    masks = drawn_masks(image, caption)
    size = next(iter(by_method.values())).image_size
    nouns = set(SHAPES) | set(PLURALS.values())
    scores: list[WordScore] = []
    for word, per_occurrence in masks.items():
        kind = "noun" if word in nouns else "colour" if word in COLORS else None
        if kind is None:
            continue
        for k, truth in enumerate(per_occurrence):
            if truth is None:
                continue  # the object was not drawn: nothing to score against
            trivial = {name: fn(size, rng) for name, fn in BASELINES.items()}
            for method, maps in by_method.items():
                try:
                    wmap = maps.word(word, occurrence=k)
                except (KeyError, ValueError):
                    continue
                heat = wmap.normalized().numpy()
                if heat.shape != truth.shape:
                    raise ValueError(f"map {heat.shape} and drawn mask {truth.shape} differ in size")
                others = [w for w in maps.words if w != word and w in nouns] or [w for w in maps.words if w != word]
                base_maps = dict(trivial)
                if others:
                    base_maps["other word"] = maps.word(others[0]).normalized().numpy()
                scores.append(
                    WordScore(
                        image=image_index,
                        caption=caption,
                        word=word,
                        kind=kind,
                        occurrence=k,
                        iou={_tau_key(t): mask_iou(scaled_threshold_mask(heat, t), truth) for t in taus},
                        baselines={
                            name: {_tau_key(t): mask_iou(scaled_threshold_mask(b, t), truth) for t in taus}
                            for name, b in base_maps.items()
                        },
                        peak_inside=bool(truth.flat[int(np.argmax(heat))]),
                        method=method,
                    )
                )
    return scores, {"image": image_index, "caption": caption, **check.to_dict()}


def select_methods(names: str | Sequence[str], family: str | None = None) -> tuple[list[str], list[str]]:
    """The attribution methods an evaluation scores, by canonical name, and notes on those left out.

    ``names``: method names or aliases of :data:`daamkit.methods.METHODS` (a comma-separated string or a
    list), or ``"all"``: every method that applies to a ``family`` model (those that do not are left
    out with a note). A named method that does not apply raises ``UnsupportedPipelineError``; with
    ``family=None`` only the names are checked. Raises :class:`InputError` for an unknown or repeated
    name, naming the allowed ones.
    """
    from daamkit.capture import UnsupportedPipelineError
    from daamkit.errors import InputError
    from daamkit.methods import METHODS, canonical_name

    items = [n.strip() for n in names.split(",")] if isinstance(names, str) else [str(n).strip() for n in names]
    allowed = "all, " + ", ".join(
        cls.name + (f" (alias {', '.join(cls.aliases)})" if cls.aliases else "") for cls in METHODS.values()
    )
    if not items or any(not n for n in items):
        raise InputError(f"the methods hold an empty name ({names!r}); allowed: {allowed}")
    if items == ["all"]:
        chosen, notes = [], []
        for cls in METHODS.values():
            if family is not None and cls.families is not None and family not in cls.families:
                notes.append(f"{cls.name}: skipped, it does not apply to this {family} model ({cls.requirement})")
            else:
                chosen.append(cls.name)
        return chosen, notes
    chosen = []
    for n in items:
        canonical = canonical_name(n)
        if canonical is None:
            hint = " ('all' stands alone)" if n == "all" else ""
            raise InputError(f"unknown attribution method {n!r}{hint}; allowed: {allowed}")
        if canonical in chosen:
            raise InputError(f"the methods name {canonical!r} twice ({names!r}); allowed: {allowed}")
        cls = METHODS[canonical]
        if family is not None and cls.families is not None and family not in cls.families:
            raise UnsupportedPipelineError(f"method {canonical!r} does not apply to this {family} model: "
                                           f"{cls.requirement}")
        chosen.append(canonical)
    return chosen, []


def scene_words(scene: Any) -> list[str]:
    """The nouns and colour adjectives of a shapes-world scene's caption, in caption order (repeats
    kept, so their occurrences match the prompt's): what open-vocabulary methods are asked to map."""
    return [w.text for w in scene.words if w.role in ("noun", "color")]


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
    methods: str | Sequence[str] = ("daam",),
) -> EvalResult:
    """Run the protocol on ``n`` held-out captions (scene seeds ``seed .. seed+n-1``).

    methods: the attribution methods to score side by side (see :func:`select_methods`; ``"all"`` for
        every method that applies to the pipeline). All of them are traced in the same pipeline call,
        so they are scored on the same images; methods that map given words get each scene's nouns
        and colours (:func:`scene_words`).
    """
    import torch
    from tqdm.auto import tqdm

    from daamkit.capture import detect_capture
    from daamkit.jobs.generate import traced_generation_maps
    from daamkit.methods import METHODS
    from daamkit.world import make_heldout_scene

    chosen, notes = select_methods(methods, detect_capture(pipe).family)
    scenes = [make_heldout_scene(seed + i) for i in range(n)]
    captions = [sc.caption for sc in scenes]
    settings: dict[str, Any] = {"n": n, "seed": seed, "steps": steps, "guidance_scale": guidance_scale,
                                "split": "heldout", "trace": trace_options or {}}
    if chosen != ["daam"]:
        settings["methods"] = chosen  # settings of a DAAM-only evaluation stay as they were
    result = EvalResult(taus=tuple(taus), settings=settings, methods=tuple(chosen), notes=notes)
    pipe.set_progress_bar_config(disable=True)
    bar = tqdm(total=n, desc="eval", disable=not progress)
    for start in range(0, n, batch_size):
        batch = captions[start : start + batch_size]
        words = [scene_words(sc) for sc in scenes[start : start + batch_size]]
        # DAAM is on in every trace; the others are built for this batch's scenes
        extra = [METHODS[m].for_images(words) for m in chosen if m != "daam"]
        # CPU generators whatever the pipeline's device (not make_generators): the noise, and so the
        # reported figures, must not depend on where the model runs.
        gens = [torch.Generator().manual_seed(seed + start + j) for j in range(len(batch))]
        pairs = traced_generation_maps(pipe, batch, generator=gens, steps=steps, guidance_scale=guidance_scale,
                                       trace_options={**(trace_options or {}), "methods": extra})
        for j, (image, maps) in enumerate(pairs):
            s, c = score_run({m: maps[m] for m in chosen}, image, batch[j], taus, image_index=start + j)
            result.scores += s
            result.checks.append(c)
        bar.update(len(batch))
    bar.close()
    return result
