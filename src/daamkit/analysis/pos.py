"""Attention per part of speech (DAAM paper, section 3.2 / appendix: attribution by POS).

For each word of each run (matched to the tagger's tokens as in :mod:`daamkit.analysis.syntax`):

* ``mass``      -- the sum of the word's DAAM map on the aggregation grid (before any normalisation, so
  the words of one prompt compare on the same scale);
* ``share``     -- ``mass`` over the summed mass of all the prompt's words (BOS, EOS and padding
  excluded): the share of the prompt's attention the word drew;
* ``relative``  -- ``share * number of words``: 1.0 is a fair share, 2.0 twice as much as the average
  word of its prompt (comparable across prompts of different lengths);
* ``area``      -- the share of the image its mask covers at tau (the paper's "attribution intensity",
  its figure of intensity by POS).

Per POS tag, the means over all its words come with 95% bootstrap intervals. The tagger is injectable:
a spaCy pipeline (default), :func:`daamkit.analysis.syntax.world_parser` (shapes-world vocabulary) or
any callable ``text -> tokens`` with ``.text``, ``.pos_`` (and ``.idx``, ``.i``, ``.head``, ``.dep_``
where available).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from daamkit.analysis.syntax import (
    Parser,
    group_map,
    load_parser,
    match_tokens,
    parse,
    world_parser,
)
from daamkit.metrics import DEFAULT_THRESHOLD
from daamkit.stats import bootstrap_mean_ci

__all__ = ["PosResult", "WordMass", "analyze_pos", "pos_masses"]


@dataclass
class WordMass:
    run: str
    word: str
    pos: str
    mass: float
    share: float
    relative: float
    area: float


def _resolve(tagger: Parser | str | None) -> Parser:
    if tagger is None or isinstance(tagger, str):
        return world_parser if tagger == "world" else load_parser(tagger)
    return tagger


def pos_masses(run: Any, tagger: Parser | str | None = None, threshold: float = DEFAULT_THRESHOLD) -> list[WordMass]:
    """Per-word mass, share, relative share and area (see the module doc) of one run."""
    from daamkit.analysis import as_run

    r = as_run(run)
    tokens = parse(r.prompt, _resolve(tagger))
    groups = match_tokens(r.prompt, r.heat_maps, tokens)
    rows = []
    for tok, words in zip(tokens, groups, strict=True):
        if not words:
            continue
        m = group_map(r.heat_maps, words, tok.text)
        rows.append((tok, float(m.value.clamp(min=0).sum()), float(m.mask(threshold).mean())))
    total = sum(mass for _, mass, _ in rows)
    n = len(rows)
    out = []
    for tok, mass, area in rows:
        share = mass / total if total > 0 else 0.0
        out.append(WordMass(r.id, tok.text, tok.pos or "X", mass, share, share * n, area))
    return out


@dataclass
class PosResult:
    words: list[WordMass] = field(default_factory=list)
    threshold: float = DEFAULT_THRESHOLD
    n_runs: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        tags = sorted({w.pos for w in self.words})
        rows = []
        for tag in tags:
            ws = [w for w in self.words if w.pos == tag]
            rows.append({
                "pos": tag,
                "n": len(ws),
                "share": bootstrap_mean_ci([w.share for w in ws]),
                "relative": bootstrap_mean_ci([w.relative for w in ws]),
                "area": bootstrap_mean_ci([w.area for w in ws]),
                "examples": sorted({w.word.lower() for w in ws})[:6],
            })
        rows.sort(key=lambda r: -r["relative"][0])
        return rows

    def markdown(self) -> str:
        def f(ci) -> str:
            return f"{ci[0]:.3f} [{ci[1]:.3f}, {ci[2]:.3f}]"

        lines = [
            f"Runs: {self.n_runs}, words: {len(self.words)}. Means per word with 95% bootstrap intervals. "
            "share = the word's map mass / the prompt's total; relative = share x words in the prompt "
            f"(1 = fair share); area = image share of the mask at tau = {self.threshold}.",
            "",
            "| POS | n | share | relative mass | area at tau | examples |",
            "|---|---|---|---|---|---|",
        ]
        for r in self.rows():
            lines.append(f"| {r['pos']} | {r['n']} | {f(r['share'])} | {f(r['relative'])} | {f(r['area'])} | "
                         f"{', '.join(r['examples'])} |")
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {"n_runs": self.n_runs, "threshold": self.threshold, "rows": self.rows(), "settings": self.settings,
                "words": [asdict(w) for w in self.words]}

    def plot(self, path: str | Path | None = None):
        """Bars per POS: relative mass and area at tau, with 95% intervals (a matplotlib Figure)."""
        from matplotlib.figure import Figure

        rows = self.rows()
        fig = Figure(figsize=(max(5.0, 0.6 * len(rows) + 2), 4.6), layout="constrained")
        ax1, ax2 = fig.subplots(2, 1, sharex=True)
        x = np.arange(len(rows))
        for ax, key, label, ref in ((ax1, "relative", "relative mass\n(1 = fair share)", 1.0),
                                    (ax2, "area", f"area at tau={self.threshold}", None)):
            m = np.array([r[key][0] for r in rows])
            err = np.array([[r[key][0] - r[key][1] for r in rows], [r[key][2] - r[key][0] for r in rows]])
            ax.bar(x, m, 0.6, yerr=err, capsize=2, color="tab:blue" if key == "relative" else "tab:orange")
            if ref is not None:
                ax.axhline(ref, color="grey", lw=0.8, ls="--")
            ax.set_ylabel(label, fontsize=8)
            ax.grid(axis="y", alpha=0.3)
        ax2.set_xticks(x, [f"{r['pos']}\n(n={r['n']})" for r in rows], fontsize=7)
        ax1.set_title("DAAM attention by part of speech", fontsize=10)
        if path is not None:
            fig.savefig(path, dpi=150)
        return fig

    def save(self, out_dir: str | Path) -> dict[str, str]:
        from daamkit.analysis import save_report

        return save_report(self, out_dir, "pos")


def analyze_pos(runs: Iterable[Any] | str, tagger: Parser | str | None = None,
                threshold: float = DEFAULT_THRESHOLD) -> PosResult:
    """Mass per part of speech over ``runs`` (records, ``(prompt, GlobalHeatMap)`` pairs, or a folder).

    ``tagger``: a spaCy-like callable, ``"world"`` (shapes-world vocabulary), a spaCy package name, or
    None for the first installed English spaCy pipeline.
    """
    from daamkit.analysis import iter_runs

    tag = _resolve(tagger)
    result = PosResult(threshold=threshold)
    for run in iter_runs(runs):
        result.words += pos_masses(run, tag, threshold)
        result.n_runs += 1
    return result
