"""Causal faithfulness on the shapes world: does a word act where its map says?

For held-out captions (the scenes of :func:`daamkit.evaluate.protocol.evaluate_world`, the same seeds),
every method's map of each noun and colour adjective whose object was drawn is put to two causal tests:

* **Counterfactual** (the literature's counterfactual edits): the caption again, same seed, with the
  word swapped for another of its kind (a colour for a colour, a shape for a shape, plural kept). The
  per-pixel change between the two images is what the word did; the map is scored against it by
  Spearman's rank correlation and by the ROC AUC of the change region (the change map thresholded by
  Otsu's method). The swap stays inside the training grammar, unlike deleting the word.
* **Deletion** (a deletion curve over tau, with prompt-to-prompt's attention reweighting): the word's
  attention is set to zero in the region where the map is at least tau of its maximum, and, as the
  control, in a random region of equal area (the same region rolled by a random offset, wrapping).
  The world's own segmenter judges whether the requested object (its colour and shape) is still
  drawn (so only objects the clean image drew with their shape are put to this test); the share of
  the image's pixel change that falls inside the region says where the edit acted (a region of area
  a that the edit ignores gets about a of a change spread evenly).

A map that tells the truth makes the counterfactual change land on it (high correlation and AUC) and
makes deletion in its own region remove the object more often than deletion in a random region of the
same size. The centre Gaussian (a map that knows nothing about the image) is scored the same way, as
the floor. Every generation is one pipeline call per batch with one CPU generator per image, so an
image never depends on its batch; the edits are per image.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from daamkit.evaluate.baselines import centre_gaussian
from daamkit.metrics import scaled_threshold_mask
from daamkit.stats import bootstrap_mean_ci

DEFAULT_TAUS = (0.2, 0.4, 0.6)
#: The reference map scored like a method: it knows where objects tend to be, not where this one is.
FLOOR = "centre gaussian"


@dataclass
class CausalScore:
    """One word of one image under one method's map (or the floor map)."""

    image: int
    caption: str
    word: str
    kind: str  # "noun" or "colour"
    occurrence: int
    method: str
    swap: str  # the caption of the counterfactual
    spearman: float  # map vs counterfactual change, over pixels
    auc: float  # map as a score for the counterfactual's change region (NaN: no region)
    change_area: float  # share of the image in the change region
    # per tau (as text): 1.0 when the object is gone after deleting the word's attention in the map's
    # region / in the random region; the share of the pixel change inside the region (NaN: nothing
    # changed); the region's share of the image
    removed: dict[str, float] = field(default_factory=dict)
    removed_random: dict[str, float] = field(default_factory=dict)
    inside: dict[str, float] = field(default_factory=dict)
    inside_random: dict[str, float] = field(default_factory=dict)
    area: dict[str, float] = field(default_factory=dict)


def _tau_key(tau: float) -> str:
    return f"{tau:g}"


def _nan_ci(values: Sequence[float]) -> tuple[float, float, float]:
    vals = [v for v in values if v == v]
    return bootstrap_mean_ci(vals) if vals else (float("nan"),) * 3


def _curve_area(taus: Sequence[float], ys: Sequence[float]) -> float:
    """Area under a curve over tau, divided by the tau range (the curve's mean height)."""
    if len(taus) < 2:
        return float(ys[0])
    t, y = np.asarray(taus, float), np.asarray(ys, float)
    return float(np.sum((y[1:] + y[:-1]) * np.diff(t)) / 2 / (t[-1] - t[0]))


@dataclass
class FaithfulnessResult:
    scores: list[CausalScore] = field(default_factory=list)
    taus: tuple[float, ...] = DEFAULT_TAUS
    methods: tuple[str, ...] = ("daam",)
    settings: dict[str, Any] = field(default_factory=dict)
    images: int = 0

    def rows(self) -> tuple[str, ...]:
        return (*self.methods, FLOOR)

    def _of(self, kind: str, method: str) -> list[CausalScore]:
        return [s for s in self.scores if s.kind == kind and s.method == method]

    def summary(self) -> dict[str, Any]:
        """Per word kind and map: n, the counterfactual scores, and per tau the removal rates in the
        map's region and in the random region, their paired difference, the inside/outside change
        shares; each a (mean, low, high) with its 95% bootstrap interval. ``deletion_area`` is the
        mean removal over tau (area under the deletion curve) of the map's and the random regions."""
        out: dict[str, Any] = {}
        for kind in sorted({s.kind for s in self.scores}):
            table = {}
            for m in self.rows():
                mine = self._of(kind, m)
                if not mine:
                    continue
                per_tau = {}
                for t in self.taus:
                    k = _tau_key(t)
                    have = [s for s in mine if k in s.removed]
                    per_tau[k] = {
                        "n": len(have),
                        "removed": _nan_ci([s.removed[k] for s in have]),
                        "removed_random": _nan_ci([s.removed_random[k] for s in have]),
                        "removed_minus_random": _nan_ci([s.removed[k] - s.removed_random[k] for s in have]),
                        "inside": _nan_ci([s.inside[k] for s in have]),
                        "inside_random": _nan_ci([s.inside_random[k] for s in have]),
                        "area": _nan_ci([s.area[k] for s in have]),
                    }
                full = [s for s in mine if all(_tau_key(t) in s.removed for t in self.taus)]
                areas = [_curve_area(self.taus, [s.removed[_tau_key(t)] for t in self.taus]) for s in full]
                areas_r = [_curve_area(self.taus, [s.removed_random[_tau_key(t)] for t in self.taus]) for s in full]
                table[m] = {
                    "n": len(mine),
                    "spearman": _nan_ci([s.spearman for s in mine]),
                    "auc": _nan_ci([s.auc for s in mine]),
                    "per_tau": per_tau,
                    "deletion_area": _nan_ci(areas),
                    "deletion_area_random": _nan_ci(areas_r),
                    "deletion_area_minus_random": _nan_ci([a - b for a, b in zip(areas, areas_r, strict=True)]),
                }
            out[kind] = table
        return {"images": self.images, "taus": list(self.taus), "methods": list(self.methods), "words": out,
                "settings": self.settings}

    def markdown(self, tau: float = 0.4) -> str:
        s = self.summary()
        k = _tau_key(tau) if tau in self.taus else _tau_key(self.taus[len(self.taus) // 2])
        lines = [
            f"Images: {s['images']}. Counterfactual: the word swapped for another of its kind, same seed. "
            f"Deletion: the word's attention set to zero in the map's region at tau = {k} (and over tau "
            f"{', '.join(map(str, self.taus))} for the area) vs a random region of equal area. Means with 95% "
            "bootstrap intervals.",
            "",
            "| words | map | n | rank corr. with change | AUC of change region | object removed: map region | "
            "random region | paired difference | deletion area minus random |",
            "|---|---|---|---|---|---|---|---|---|",
        ]

        def ci(v: tuple[float, float, float], sign: bool = False) -> str:
            f = "{:+.3f}" if sign else "{:.3f}"
            return "n/a" if v[0] != v[0] else f"{f.format(v[0])} [{f.format(v[1])}, {f.format(v[2])}]"

        for kind, table in s["words"].items():
            for m, r in table.items():
                t = r["per_tau"].get(k, {})
                lines.append(
                    f"| {kind} | {m} | {r['n']} | {ci(r['spearman'])} | {ci(r['auc'])} | "
                    f"{ci(t.get('removed', (float('nan'),) * 3))} | {ci(t.get('removed_random', (float('nan'),) * 3))} | "
                    f"{ci(t.get('removed_minus_random', (float('nan'),) * 3), True)} | "
                    f"{ci(r['deletion_area_minus_random'], True)} |"
                )
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {"summary": self.summary(), "scores": [asdict(s) for s in self.scores]}

    def plot(self, path: str | Path | None = None):
        """Deletion curves: the share of objects removed against tau, one panel per word kind, a solid
        line per map (its region) and a dashed one in the same colour (the random region)."""
        from matplotlib.figure import Figure

        s = self.summary()
        kinds = list(s["words"])
        fig = Figure(figsize=(4.4 * max(1, len(kinds)), 3.4), layout="constrained")
        axes = fig.subplots(1, max(1, len(kinds)), squeeze=False)[0]
        for ax, kind in zip(axes, kinds, strict=False):
            for i, (m, r) in enumerate(s["words"][kind].items()):
                colour = f"C{i}" if m != FLOOR else "0.45"
                ys = [r["per_tau"][_tau_key(t)]["removed"][0] for t in self.taus]
                yr = [r["per_tau"][_tau_key(t)]["removed_random"][0] for t in self.taus]
                ax.plot(self.taus, ys, marker="o", color=colour, label=f"{m}: its region")
                ax.plot(self.taus, yr, ls="--", marker=".", color=colour, label=f"{m}: random region")
            ax.set_title(f"{kind}s: deleting the word's attention", fontsize=9)
            ax.set_xlabel("region: map >= tau")
            ax.set_ylabel("object removed (share)")
            ax.set_ylim(0, 1)
            ax.grid(alpha=0.3)
        if kinds:
            axes[0].legend(fontsize=6)
        if path is not None:
            fig.savefig(path, dpi=150)
        return fig

    def save(self, out_dir: str | Path, tau: float = 0.4) -> dict[str, str]:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "faithfulness.json").write_text(json.dumps(self.to_json(), indent=1))
        (out / "faithfulness.md").write_text(self.markdown(tau))
        self.plot(out / "deletion_curves.png")
        return {"json": str(out / "faithfulness.json"), "markdown": str(out / "faithfulness.md"),
                "plot": str(out / "deletion_curves.png")}


def _still_drawn(image: Any, caption: str, index: int) -> bool:
    """Whether requested object instance ``index`` of ``caption`` is drawn in its colour and shape."""
    from daamkit.world import generation_accuracy

    chk = generation_accuracy(image, caption)
    m = chk.matches[index]
    inst = [r for r in chk.requested for _ in range(r.count)][index]
    return m is not None and m.shape == inst.shape


def _words_of(scene: Any, image: Any) -> list[tuple[str, str, int, int, bool]]:
    """(word, kind, occurrence, object instance, drawn with its shape) for each noun and colour adjective
    of the scene whose object was drawn in its colour; plural nouns and counted objects are left out (one
    word, several objects: a single region and a single verdict do not fit them). Only an object drawn
    with its requested shape can be judged removed by an edit (a wrong shape reads as absent already)."""
    from daamkit.world import COLORS, SHAPES, generation_accuracy

    chk = generation_accuracy(image, scene.caption)
    out, seen, k = [], {}, 0
    for r in chk.requested:
        if r.count == 1 and chk.matches[k] is not None:
            for word, kind in ((r.shape, "noun"), (r.color, "colour")):
                if not word or (kind == "noun" and word not in SHAPES) or (kind == "colour" and word not in COLORS):
                    continue
                occ = seen.get(word, 0)
                out.append((word, kind, occ, k, chk.matches[k].shape == r.shape))
        for word in (r.shape, r.color):
            if word:
                seen[word] = seen.get(word, 0) + 1
        k += r.count
    return out


def _swap(caption: str, word: str, occurrence: int, kind: str, rng: np.random.Generator) -> str:
    """``caption`` with the given occurrence of ``word`` replaced by another word of its kind."""
    from daamkit.world import COLORS, SHAPES

    pool = [c for c in (COLORS if kind == "colour" else SHAPES) if c != word and c not in caption.split()]
    other = str(rng.choice(pool))
    pieces = caption.replace(",", " ,").split()
    seen = 0
    for i, p in enumerate(pieces):
        if p == word:
            if seen == occurrence:
                pieces[i] = other
                break
            seen += 1
    return " ".join(pieces).replace(" ,", ",")


def _generate(pipe: Any, captions: list[str], seeds: list[int], steps: int, guidance_scale: float,
              edits: list[tuple[str, int, np.ndarray] | None] | None = None) -> list[np.ndarray]:
    """One pipeline call: image j from ``captions[j]`` with seed ``seeds[j]``, and, where ``edits[j]``
    is (word, occurrence, region), the word's attention deleted in that region of image j."""
    import torch

    from daamkit.intervene import AttentionEdit, intervene

    gens = [torch.Generator().manual_seed(s) for s in seeds]
    kw = dict(num_inference_steps=steps, guidance_scale=guidance_scale, generator=gens)
    todo = [AttentionEdit(word=w, scale=0.0, region=r, occurrence=o, image=j)
            for j, e in enumerate(edits or []) if e is not None for (w, o, r) in [e]]
    if not todo:
        return [np.asarray(im) for im in pipe(captions, **kw).images]
    with intervene(pipe, captions, todo):
        return [np.asarray(im) for im in pipe(captions, **kw).images]


def evaluate_faithfulness(
    pipe: Any,
    n: int = 40,
    seed: int = 0,
    steps: int = 20,
    guidance_scale: float = 5.0,
    taus: Sequence[float] = DEFAULT_TAUS,
    batch_size: int = 16,
    methods: str | Sequence[str] = ("daam",),
    trace_options: dict | None = None,
    progress: bool = True,
) -> FaithfulnessResult:
    """The causal tests on ``n`` held-out scenes (seeds ``seed .. seed+n-1``) for every method that
    applies (see :func:`~daamkit.evaluate.protocol.select_methods`) and the centre-Gaussian floor."""
    import torch
    from tqdm.auto import tqdm

    from daamkit.capture import detect_capture
    from daamkit.evaluate.protocol import scene_words, select_methods
    from daamkit.faithfulness import change_map, change_region, rank_correlation, region_auc
    from daamkit.jobs.generate import traced_generation_maps
    from daamkit.methods import METHODS
    from daamkit.world import make_heldout_scene

    chosen, _ = select_methods(methods, detect_capture(pipe).family)
    taus = tuple(float(t) for t in taus)
    result = FaithfulnessResult(taus=taus, methods=tuple(chosen), settings={
        "n": n, "seed": seed, "steps": steps, "guidance_scale": guidance_scale, "split": "heldout",
        "edit": "attention on the word's tokens x0 in the region, conditional branch, every step and layer",
        "random_region": "the map's region rolled by a uniform random offset (wrapping)",
        "change_region": "Otsu threshold of the per-pixel change"})
    pipe.set_progress_bar_config(disable=True)
    rng = np.random.default_rng(seed)
    scenes = [make_heldout_scene(seed + i) for i in range(n)]
    bar = tqdm(total=n, desc="faithfulness", disable=not progress)
    for start in range(0, n, batch_size):
        part = scenes[start:start + batch_size]
        captions = [sc.caption for sc in part]
        seeds = [seed + start + j for j in range(len(part))]
        extra = [METHODS[m].for_images([scene_words(sc) for sc in part]) for m in chosen if m != "daam"]
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        pairs = traced_generation_maps(pipe, captions, generator=gens, steps=steps, guidance_scale=guidance_scale,
                                       trace_options={**(trace_options or {}), "methods": extra})
        # one task per (image, word): its counterfactual, and its deletions per map and tau
        tasks = []
        for j, (image, maps) in enumerate(pairs):
            image = np.asarray(image)
            for word, kind, occ, inst, judged in _words_of(part[j], image):
                heat = {}
                for m in chosen:
                    try:
                        heat[m] = maps[m].word(word, occurrence=occ).normalized().numpy()
                    except (KeyError, ValueError):
                        continue
                heat[FLOOR] = centre_gaussian(image.shape[:2])
                tasks.append(dict(j=j, image=image, word=word, kind=kind, occ=occ, inst=inst, heat=heat, judged=judged,
                                  swap=_swap(captions[j], word, occ, kind, rng)))
        # counterfactuals, batched
        for b in range(0, len(tasks), batch_size):
            chunk = tasks[b:b + batch_size]
            cfs = _generate(pipe, [t["swap"] for t in chunk], [seeds[t["j"]] for t in chunk], steps, guidance_scale)
            for t, cf in zip(chunk, cfs, strict=True):
                t["change"] = change_map(t["image"], cf)
                t["region"] = change_region(t["change"])
        # deletions: every (task, map, tau, region kind) is one image of a batch
        jobs = []
        for ti, t in enumerate(tasks):
            if not t["judged"]:
                continue
            for m, heat in t["heat"].items():
                for tau in taus:
                    region = scaled_threshold_mask(heat, tau)
                    if not region.any() or region.all():
                        continue
                    h, w = region.shape
                    rolled = np.roll(region, (int(rng.integers(h)), int(rng.integers(w))), axis=(0, 1))
                    jobs += [(ti, m, tau, "map", region), (ti, m, tau, "random", rolled)]
        done: dict[tuple, tuple[bool, float]] = {}
        for b in range(0, len(jobs), batch_size):
            chunk = jobs[b:b + batch_size]
            ims = _generate(pipe, [captions[tasks[ti]["j"]] for ti, *_ in chunk],
                            [seeds[tasks[ti]["j"]] for ti, *_ in chunk], steps, guidance_scale,
                            [(tasks[ti]["word"], tasks[ti]["occ"], reg) for ti, _m, _t, _k, reg in chunk])
            for (ti, m, tau, which, reg), im in zip(chunk, ims, strict=True):
                t = tasks[ti]
                ch = change_map(t["image"], im)
                total = float(ch.sum())
                inside = float(ch[reg].sum()) / total if total > 0 else float("nan")
                gone = not _still_drawn(im, captions[t["j"]], t["inst"])
                done[(ti, m, tau, which)] = (gone, inside)
        for ti, t in enumerate(tasks):
            for m, heat in t["heat"].items():
                s = CausalScore(image=start + t["j"], caption=captions[t["j"]], word=t["word"], kind=t["kind"],
                                occurrence=t["occ"], method=m, swap=t["swap"],
                                spearman=rank_correlation(heat, t["change"]), auc=region_auc(heat, t["region"]),
                                change_area=float(t["region"].mean()))
                for tau in taus:
                    if (ti, m, tau, "map") not in done:
                        continue
                    k = _tau_key(tau)
                    s.removed[k], s.inside[k] = float(done[(ti, m, tau, "map")][0]), done[(ti, m, tau, "map")][1]
                    s.removed_random[k], s.inside_random[k] = (float(done[(ti, m, tau, "random")][0]),
                                                               done[(ti, m, tau, "random")][1])
                    s.area[k] = float(scaled_threshold_mask(heat, tau).mean())
                result.scores.append(s)
        result.images += len(part)
        bar.update(len(part))
    bar.close()
    return result
