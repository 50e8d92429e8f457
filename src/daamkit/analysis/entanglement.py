"""Feature entanglement (DAAM paper, section 5): co-hyponym pairs and broad adjectives.

**Co-hyponyms.** Prompts "a X and a Y" where X and Y share a hypernym (co-hyponyms, "a giraffe and a
zebra") or not ("a giraffe and a boat"). Per group: how often both objects are generated, and how
much the two nouns' maps overlap (IoU of their masks at tau). The paper finds that co-hyponyms are
generated correctly less often and that both co-hyponymy and failed generations go with more overlap.

* Real models: pairs come from a shipped ontology (``data/ontology.json``: hand-written hypernym
  groups) or from the user; success needs a judge (``judge(image, pair_prompt) -> bool``, e.g. an
  object detector) -- without one only the overlaps are reported.
* Shapes world: every noun is a shape, so the lexicon has one taxonomy level for nouns (shapes) and one
  for attributes (colours). We make the hypernym level visual: :data:`SHAPE_FAMILIES` groups the six
  shapes into three pairs of look-alikes (round: circle/heart; polygon: square/triangle; pointed:
  star/cross), and two shapes of one family count as co-hyponyms, two of different families as not.
  The prompts are the world's own "a C1 S1 and a C2 S2" (two different colours, so each object is
  identifiable). The design is paired: for every index the co-hyponym and non-co-hyponym prompts share
  the colours and the seed (the same initial noise), so the groups differ only in the nouns. Success
  is judged by :func:`daamkit.world.generation_accuracy` (each requested object drawn in its colour
  and shape), exactly and without a learned detector.

**Adjectives.** How far a colour adjective's map spreads beyond its noun's object: the share of the
adjective's mask outside the object its noun names (``adj_outside``; the noun's own ``noun_outside``
for comparison), the IoU of the adjective's mask with its own object vs with the other object, and
with its own noun's map vs the other noun's map. On the shapes world the objects' masks are the drawn
objects (from the generated image); elsewhere the noun's map stands in for its object.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from daamkit.heatmap import GlobalHeatMap
from daamkit.metrics import DEFAULT_THRESHOLD, mask_ioa, mask_iou
from daamkit.stats import bootstrap_mean_ci

__all__ = [
    "CO",
    "NON",
    "SHAPE_FAMILIES",
    "AdjectiveSpread",
    "EntanglementResult",
    "PairPrompt",
    "PairTrial",
    "adjective_spread",
    "analyze_entanglement",
    "load_ontology",
    "ontology_pair_prompts",
    "pair_prompt",
    "run_entanglement",
    "score_pair",
    "world_pair_prompts",
]

CO = "co-hyponym"
NON = "non-co-hyponym"
USER = "user"

#: Visual "hypernyms" of the shapes world (see the module doc): two shapes of one family are co-hyponyms.
SHAPE_FAMILIES: dict[str, tuple[str, ...]] = {
    "round": ("circle", "heart"),
    "polygon": ("square", "triangle"),
    "pointed": ("star", "cross"),
}

ONTOLOGY_PATH = Path(__file__).resolve().parent / "data" / "ontology.json"


def load_ontology(path: str | Path | None = None) -> dict[str, list[str]]:
    """``{hypernym: [nouns]}`` from a JSON file (default: the shipped one). The file holds either that
    mapping or ``{"groups": mapping, ...}``."""
    doc = json.loads(Path(path or ONTOLOGY_PATH).read_text(encoding="utf-8"))
    groups = doc.get("groups", doc) if isinstance(doc, dict) else None
    if not isinstance(groups, dict) or not all(
        isinstance(v, list) and all(isinstance(n, str) for n in v) for v in groups.values()
    ):
        raise ValueError(f"{path or ONTOLOGY_PATH}: an ontology is a JSON object {{hypernym: [noun, ...]}}")
    return {str(k): [n.strip().lower() for n in v] for k, v in groups.items()}


def _hypernym(ontology: dict[str, Sequence[str]], noun: str) -> str | None:
    return next((h for h, ns in ontology.items() if noun in ns), None)


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"


@dataclass
class PairPrompt:
    prompt: str
    group: str  # CO, NON or USER (unknown to the ontology)
    nouns: tuple[str, str]
    colors: tuple[str | None, str | None] = (None, None)
    hypernyms: tuple[str | None, str | None] = (None, None)
    seed: int = 0
    index: int = 0  # the co-hyponym and non-co-hyponym prompts of one index share colours and seed

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PairPrompt:
        return cls(d["prompt"], d["group"], tuple(d["nouns"]), tuple(d.get("colors") or (None, None)),
                   tuple(d.get("hypernyms") or (None, None)), int(d.get("seed", 0)), int(d.get("index", 0)))


def pair_prompt(a: str, b: str, ontology: dict[str, Sequence[str]] | None = None,
                colors: tuple[str | None, str | None] = (None, None), seed: int = 0, index: int = 0) -> PairPrompt:
    """"a X and a Y" (with colour adjectives if given), grouped by ``ontology`` (default: the shipped one)."""
    onto = load_ontology() if ontology is None else ontology
    ha, hb = _hypernym(onto, a), _hypernym(onto, b)
    group = USER if ha is None or hb is None else CO if ha == hb else NON
    pa = f"{colors[0]} {a}" if colors[0] else a
    pb = f"{colors[1]} {b}" if colors[1] else b
    return PairPrompt(f"{_article(pa)} {pa} and {_article(pb)} {pb}", group, (a, b), colors, (ha, hb), seed, index)


def ontology_pair_prompts(n: int, seed: int = 0, ontology: dict[str, Sequence[str]] | None = None) -> list[PairPrompt]:
    """``n`` co-hyponym and ``n`` non-co-hyponym prompts "a X and a Y" from the ontology (2n in all)."""
    onto = load_ontology() if ontology is None else {k: list(v) for k, v in ontology.items()}
    groups = [h for h, ns in onto.items() if len(ns) >= 2]
    if not groups or len(onto) < 2:
        raise ValueError("the ontology needs a group of at least two nouns and at least two groups")
    out = []
    for i in range(n):
        rng = random.Random(f"entangle-onto:{seed}:{i}")
        a, b = rng.sample(onto[rng.choice(groups)], 2)
        ga, gb = rng.sample(list(onto), 2)
        c, d = rng.choice(onto[ga]), rng.choice(onto[gb])
        out.append(pair_prompt(a, b, onto, seed=seed + i, index=i))
        out.append(pair_prompt(c, d, onto, seed=seed + i, index=i))
    return out


def world_pair_prompts(n: int, seed: int = 0, families: dict[str, Sequence[str]] | None = None) -> list[PairPrompt]:
    """``n`` paired shapes-world prompts per group (2n in all): "a C1 S1 and a C2 S2" with S1, S2 of one
    family (co-hyponyms) and, with the same colours and seed, of two families (non-co-hyponyms)."""
    from daamkit.world.scenes import COLORS

    fams = dict(families or SHAPE_FAMILIES)
    names = list(fams)
    out = []
    for i in range(n):
        rng = random.Random(f"entangle-world:{seed}:{i}")
        c1, c2 = rng.sample(list(COLORS), 2)
        s1, s2 = rng.sample(list(fams[rng.choice(names)]), 2)
        fa, fb = rng.sample(names, 2)
        t1, t2 = rng.choice(fams[fa]), rng.choice(fams[fb])
        out.append(pair_prompt(s1, s2, fams, (c1, c2), seed + i, i))
        out.append(pair_prompt(t1, t2, fams, (c1, c2), seed + i, i))
    return out


_PAIR_RE = re.compile(r"^\s*an?\s+((?:\w+\s+)*?)(\w+)\s+and\s+an?\s+((?:\w+\s+)*?)(\w+)\s*$", re.IGNORECASE)


def _parse_pair_prompt(prompt: str, ontology: dict[str, Sequence[str]], world: bool = False) -> PairPrompt | None:
    """The pair of "a [adj ...] X and a [adj ...] Y" (the adjective scored is the last one before each
    noun; on the shapes world only colours count); None for other prompts."""
    m = _PAIR_RE.match(prompt)
    if not m:
        return None
    mods1, a, mods2, b = (g.lower() for g in m.groups())
    if world:
        from daamkit.world.scenes import COLORS

        def adj(mods: str) -> str | None:
            return next((w for w in reversed(mods.split()) if w in COLORS), None)
    else:
        def adj(mods: str) -> str | None:
            return mods.split()[-1] if mods.split() else None
    pp = pair_prompt(a, b, ontology, (adj(mods1), adj(mods2)))
    pp.prompt = prompt
    return pp


# ------------------------------------------------------------------------------------------ scoring
@dataclass
class AdjectiveSpread:
    run: str
    prompt: str
    adjective: str
    noun: str
    adj_area: float  # image share of the adjective's mask
    noun_area: float
    adj_outside_noun_map: float  # share of the adjective's mask outside its noun's mask
    adj_iou_own_noun: float  # IoU of the adjective's mask with its noun's mask
    adj_iou_other_noun: float | None  # ... with the other noun's mask
    adj_outside: float | None = None  # share of the adjective's mask outside its object (drawn mask)
    noun_outside: float | None = None  # share of the noun's mask outside its object
    adj_iou_own_object: float | None = None
    adj_iou_other_object: float | None = None


def adjective_spread(
    heat_maps: GlobalHeatMap,
    adjective: str,
    noun: str,
    own_object: np.ndarray | None = None,
    other_object: np.ndarray | None = None,
    other_noun: str | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    adjective_occurrence: int | None = None,
    noun_occurrence: int | None = None,
    run: str = "",
    prompt: str = "",
) -> AdjectiveSpread:
    """How far ``adjective``'s map spreads beyond ``noun``'s object (see the module doc).

    ``own_object`` / ``other_object``: bool (H, W) masks of the noun's object and of another object
    (e.g. the drawn masks on the shapes world); without them only the map-to-map numbers are filled.
    ``adjective_occurrence`` / ``noun_occurrence`` pick one occurrence of a repeated word (None: all).
    """
    a = heat_maps.word(adjective, adjective_occurrence).mask(threshold)
    n = heat_maps.word(noun, noun_occurrence).mask(threshold)
    o = heat_maps.word(other_noun).mask(threshold) if other_noun else None
    a_area = float(a.mean())
    res = AdjectiveSpread(
        run, prompt, adjective, noun, a_area, float(n.mean()),
        1.0 - mask_ioa(n, a) if a.any() else 0.0,  # |A \ N| / |A|
        mask_iou(a, n),
        None if o is None else mask_iou(a, o),
    )
    if own_object is not None:
        res.adj_outside = 1.0 - mask_ioa(own_object, a) if a.any() else 0.0
        res.noun_outside = 1.0 - mask_ioa(own_object, n) if n.any() else 0.0
        res.adj_iou_own_object = mask_iou(a, own_object)
    if other_object is not None:
        res.adj_iou_other_object = mask_iou(a, other_object)
    return res


@dataclass
class PairTrial:
    run: str
    prompt: str
    group: str
    nouns: tuple[str, str]
    index: int
    seed: int
    noun_iou: float  # IoU of the two nouns' masks at tau
    success: bool | None  # both objects generated (world: right colour and shape); None without a judge
    both_present: bool | None = None  # world: both colours drawn as objects (shape not checked)
    check: dict[str, Any] | None = None


Judge = Callable[[Any, PairPrompt], "bool | None"]


def _occurrences(nouns: Sequence[str]) -> list[int | None]:
    seen: dict[str, int] = {}
    out: list[int | None] = []
    for w in nouns:
        out.append(seen.get(w, 0) if nouns.count(w) > 1 else None)
        seen[w] = seen.get(w, 0) + 1
    return out


def score_pair(
    heat_maps: GlobalHeatMap,
    image: Any,
    pp: PairPrompt,
    world: bool = True,
    judge: Judge | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    run: str = "",
) -> tuple[PairTrial, list[AdjectiveSpread]]:
    """Score one generated pair prompt: noun-map IoU, success, and each colour adjective's spread."""
    occ = _occurrences(pp.nouns)
    adj_occ = _occurrences([c or "" for c in pp.colors])
    maps = [heat_maps.word(nn, o) for nn, o in zip(pp.nouns, occ, strict=True)]
    noun_iou = maps[0].iou(maps[1], threshold)
    success: bool | None = None
    present: bool | None = None
    check_d = None
    masks: list[np.ndarray | None] = [None, None]
    if world and image is not None:
        from daamkit.world import generation_accuracy

        spec = [(c, s) for c, s in zip(pp.colors, pp.nouns, strict=True)]
        chk = generation_accuracy(image, spec)
        success = chk.shapes_correct == 1.0
        present = chk.objects_present == 1.0
        # drawn masks are at the image's size, which is the maps' image size for a traced run
        masks = [m if m is not None and m.shape == heat_maps.image_size else None
                 for m in (chk.mask_for(0), chk.mask_for(1))]
        check_d = chk.to_dict()
    elif judge is not None and image is not None:
        out = judge(image, pp)
        success = None if out is None else bool(out)
    trial = PairTrial(run, pp.prompt, pp.group, tuple(pp.nouns), pp.index, pp.seed, noun_iou, success, present, check_d)
    spreads = []
    for k in (0, 1):
        adj = pp.colors[k]
        if not adj:
            continue
        spreads.append(adjective_spread(
            heat_maps, adj, pp.nouns[k], masks[k], masks[1 - k],
            other_noun=pp.nouns[1 - k] if pp.nouns[0] != pp.nouns[1] else None,
            threshold=threshold, adjective_occurrence=adj_occ[k], noun_occurrence=occ[k], run=run,
            prompt=pp.prompt,
        ))
    return trial, spreads


# ------------------------------------------------------------------------------------------ results
def _ci(values: Iterable[float | None]) -> tuple[float, float, float]:
    """:func:`~daamkit.stats.bootstrap_mean_ci` of the values that are known (None: not measured)."""
    return bootstrap_mean_ci([float(v) for v in values if v is not None])


def _f(ci: tuple[float, float, float]) -> str:
    return "–" if np.isnan(ci[0]) else f"{ci[0]:.3f} [{ci[1]:.3f}, {ci[2]:.3f}]"


@dataclass
class EntanglementResult:
    trials: list[PairTrial] = field(default_factory=list)
    adjectives: list[AdjectiveSpread] = field(default_factory=list)
    threshold: float = DEFAULT_THRESHOLD
    settings: dict[str, Any] = field(default_factory=dict)

    def groups(self) -> list[str]:
        order = [CO, NON, USER]
        return [g for g in order if any(t.group == g for t in self.trials)]

    def group_rows(self) -> list[dict[str, Any]]:
        rows = []
        for g in self.groups():
            ts = [t for t in self.trials if t.group == g]
            rows.append({
                "group": g,
                "n": len(ts),
                "success": _ci(None if t.success is None else float(t.success) for t in ts),
                "both_present": _ci(None if t.both_present is None else float(t.both_present) for t in ts),
                "noun_iou": _ci(t.noun_iou for t in ts),
                "noun_iou_success": _ci(t.noun_iou for t in ts if t.success is True),
                "noun_iou_failure": _ci(t.noun_iou for t in ts if t.success is False),
            })
        return rows

    def outcome_rows(self) -> list[dict[str, Any]]:
        rows = []
        for label, val in (("success", True), ("failure", False)):
            ts = [t for t in self.trials if t.success is val]
            rows.append({"outcome": label, "n": len(ts), "noun_iou": _ci(t.noun_iou for t in ts)})
        return rows

    def paired_difference(self) -> dict[str, Any]:
        """Co-hyponym minus non-co-hyponym, over indices that have both (same colours and seed)."""
        by: dict[int, dict[str, PairTrial]] = {}
        for t in self.trials:
            by.setdefault(t.index, {})[t.group] = t
        pairs = [(d[CO], d[NON]) for d in by.values() if CO in d and NON in d]
        return {
            "n": len(pairs),
            "success": _ci(float(a.success) - float(b.success) for a, b in pairs
                           if a.success is not None and b.success is not None),
            "noun_iou": _ci(a.noun_iou - b.noun_iou for a, b in pairs),
        }

    def adjective_row(self) -> dict[str, Any]:
        a = self.adjectives
        return {
            "n": len(a),
            "adj_area": _ci(x.adj_area for x in a),
            "noun_area": _ci(x.noun_area for x in a),
            "adj_outside": _ci(x.adj_outside for x in a),
            "noun_outside": _ci(x.noun_outside for x in a),
            "adj_outside_noun_map": _ci(x.adj_outside_noun_map for x in a),
            "adj_iou_own_object": _ci(x.adj_iou_own_object for x in a),
            "adj_iou_other_object": _ci(x.adj_iou_other_object for x in a),
            "adj_iou_own_noun": _ci(x.adj_iou_own_noun for x in a),
            "adj_iou_other_noun": _ci(x.adj_iou_other_noun for x in a),
        }

    def markdown(self) -> str:
        lines = [f"Runs: {len(self.trials)}. Masks at tau = {self.threshold}; means with 95% bootstrap intervals.", ""]
        lines += ["**Co-hyponym pairs** (success: both objects generated; noun IoU: the two nouns' masks)", "",
                  "| group | n | success | both present | noun IoU | noun IoU, success | noun IoU, failure |",
                  "|---|---|---|---|---|---|---|"]
        for r in self.group_rows():
            lines.append(f"| {r['group']} | {r['n']} | {_f(r['success'])} | {_f(r['both_present'])} | "
                         f"{_f(r['noun_iou'])} | {_f(r['noun_iou_success'])} | {_f(r['noun_iou_failure'])} |")
        pdiff = self.paired_difference()
        if pdiff["n"]:
            lines += ["", f"Paired (same colours and seed, n = {pdiff['n']}): co-hyponym minus non-co-hyponym "
                          f"success {_f(pdiff['success'])}, noun IoU {_f(pdiff['noun_iou'])}."]
        lines += ["", "| outcome | n | noun IoU |", "|---|---|---|"]
        for r in self.outcome_rows():
            lines.append(f"| {r['outcome']} | {r['n']} | {_f(r['noun_iou'])} |")
        if self.adjectives:
            a = self.adjective_row()
            lines += ["", f"**Adjectives** (n = {a['n']} colour adjectives)", "", "| measure | adjective | noun |",
                      "|---|---|---|",
                      f"| mask area (image share) | {_f(a['adj_area'])} | {_f(a['noun_area'])} |",
                      f"| share of the mask outside the noun's object | {_f(a['adj_outside'])} | {_f(a['noun_outside'])} |",
                      f"| share of the mask outside the noun's mask | {_f(a['adj_outside_noun_map'])} | – |",
                      "", "| adjective mask IoU with | own | other |", "|---|---|---|",
                      f"| object (drawn mask) | {_f(a['adj_iou_own_object'])} | {_f(a['adj_iou_other_object'])} |",
                      f"| noun's map mask | {_f(a['adj_iou_own_noun'])} | {_f(a['adj_iou_other_noun'])} |"]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "settings": self.settings,
            "groups": self.group_rows(),
            "outcomes": self.outcome_rows(),
            "paired_difference": self.paired_difference(),
            "adjectives_summary": self.adjective_row(),
            "trials": [asdict(t) for t in self.trials],
            "adjectives": [asdict(a) for a in self.adjectives],
        }

    def plot(self, path: str | Path | None = None):
        """Two panels: success and noun-map IoU per group; the adjective's spread vs the noun's."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(8.0, 3.4), layout="constrained")
        ax1, ax2 = fig.subplots(1, 2)
        rows = self.group_rows()
        x = np.arange(len(rows))
        for j, (key, label) in enumerate((("success", "success"), ("noun_iou", "noun-map IoU"))):
            m = np.array([np.nan_to_num(r[key][0]) for r in rows])
            err = np.nan_to_num(np.array([[r[key][0] - r[key][1] for r in rows], [r[key][2] - r[key][0] for r in rows]]))
            ax1.bar(x + (j - 0.5) * 0.38, m, 0.38, yerr=err, capsize=2, label=label)
        ax1.set_xticks(x, [f"{r['group']}\n(n={r['n']})" for r in rows], fontsize=7)
        ax1.set_ylim(0, 1)
        ax1.set_title("Co-hyponym pairs", fontsize=9)
        ax1.legend(fontsize=7)
        ax1.grid(axis="y", alpha=0.3)
        a = self.adjective_row()
        keys = [("adj_outside", "adj. outside\nobject"), ("noun_outside", "noun outside\nobject"),
                ("adj_iou_own_object", "adj. IoU\nown object"), ("adj_iou_other_object", "adj. IoU\nother object"),
                ("adj_iou_own_noun", "adj. IoU\nown noun"), ("adj_iou_other_noun", "adj. IoU\nother noun")]
        keys = [(k, lab) for k, lab in keys if not np.isnan(a[k][0])]
        if keys:
            x2 = np.arange(len(keys))
            m = np.array([a[k][0] for k, _ in keys])
            err = np.array([[a[k][0] - a[k][1] for k, _ in keys], [a[k][2] - a[k][0] for k, _ in keys]])
            ax2.bar(x2, m, 0.6, yerr=err, capsize=2, color="tab:green")
            ax2.set_xticks(x2, [lab for _, lab in keys], fontsize=6)
        ax2.set_ylim(0, 1)
        ax2.set_title(f"Colour adjectives (n={a['n']})", fontsize=9)
        ax2.grid(axis="y", alpha=0.3)
        if path is not None:
            fig.savefig(path, dpi=150)
        return fig

    def save(self, out_dir: str | Path) -> dict[str, str]:
        from daamkit.analysis import save_report

        return save_report(self, out_dir, "entangle")


def analyze_entanglement(
    runs: Iterable[Any] | str,
    world: bool = True,
    judge: Judge | None = None,
    ontology: dict[str, Sequence[str]] | None = None,
    threshold: float = DEFAULT_THRESHOLD,
) -> EntanglementResult:
    """Score saved pair runs (records written by :func:`run_entanglement` with ``save_dir``, or any
    records whose prompt reads "a [adj] X and a [adj] Y"; others are skipped)."""
    from daamkit.analysis import iter_runs

    onto = ontology if ontology is not None else (SHAPE_FAMILIES if world else load_ontology())
    res = EntanglementResult(threshold=threshold)
    for run in iter_runs(runs):
        meta = run.meta.get("entangle")
        pp = PairPrompt.from_dict(meta) if isinstance(meta, dict) else _parse_pair_prompt(run.prompt, onto, world)
        if pp is None:
            continue
        t, s = score_pair(run.heat_maps, run.image, pp, world, judge, threshold, run.id)
        res.trials.append(t)
        res.adjectives += s
    return res


def run_entanglement(
    pipe: Any,
    prompts: Sequence[PairPrompt] | None = None,
    n: int = 100,
    seed: int = 0,
    world: bool = True,
    ontology: dict[str, Sequence[str]] | None = None,
    steps: int = 20,
    guidance_scale: float = 5.0,
    batch_size: int = 16,
    judge: Judge | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    trace_options: dict[str, Any] | None = None,
    save_dir: str | Path | None = None,
    progress: bool = True,
) -> EntanglementResult:
    """Generate the pair prompts with ``pipe`` (traced) and score them.

    ``prompts`` default: :func:`world_pair_prompts` (``world=True``) or :func:`ontology_pair_prompts`,
    ``n`` per group. Each prompt's generator is seeded with its ``seed``. ``save_dir`` also writes one
    :class:`~daamkit.io.record.RunRecord` per image (``meta["entangle"]`` holds the pair), which
    :func:`analyze_entanglement` can score again.
    """
    from tqdm.auto import tqdm

    from daamkit.jobs.generate import make_generators, traced_generation
    from daamkit.methods.base import jsonable

    if prompts is None:
        prompts = world_pair_prompts(n, seed) if world else ontology_pair_prompts(n, seed, ontology)
    prompts = list(prompts)
    res = EntanglementResult(threshold=threshold, settings={
        "n_prompts": len(prompts), "seed": seed, "world": world, "steps": steps, "guidance_scale": guidance_scale,
        "trace": jsonable(trace_options or {}),
    })
    pipe.set_progress_bar_config(disable=True)
    bar = tqdm(total=len(prompts), desc="entangle", disable=not progress)
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        gens = make_generators(pipe, [p.seed for p in batch])
        pairs = traced_generation(pipe, [p.prompt for p in batch], generator=gens,
                                  steps=steps, guidance_scale=guidance_scale, trace_options=trace_options)
        for j, (pp, (image, hm)) in enumerate(zip(batch, pairs, strict=True)):
            rid = f"{start + j:05d}"
            t, s = score_pair(hm, image, pp, world, judge, threshold, rid)
            res.trials.append(t)
            res.adjectives += s
            if save_dir is not None:
                from daamkit.io.record import RunRecord

                RunRecord(pp.prompt, image, hm, seed=pp.seed,
                          settings={"steps": steps, "guidance_scale": guidance_scale},
                          meta={"entangle": pp.to_dict(), "id": rid}).save(Path(save_dir) / rid)
        bar.update(len(batch))
    bar.close()
    return res


# -------------------------------------------------------------------------------------------- CLI
