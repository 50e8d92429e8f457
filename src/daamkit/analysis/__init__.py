"""The DAAM paper's analyses, on a traced run or on saved records.

* :mod:`daamkit.analysis.syntax` -- head/dependent map interactions per dependency relation
  (mIoU, intersection over the head's and over the dependent's area, 95% intervals);
* :mod:`daamkit.analysis.entanglement` -- co-hyponym pairs ("a X and a Y": generation success and
  the overlap of the two nouns' maps) and how far a colour adjective's map spreads beyond its noun;
* :mod:`daamkit.analysis.pos` -- attention mass per part of speech.

Every analysis takes *runs*: any iterable of :class:`daamkit.io.record.RunRecord` (e.g.
``daamkit.io.runs.load_runs(dir)``), of ``(prompt, GlobalHeatMap)`` pairs, or of ``GlobalHeatMap``s that
know their prompt. :func:`open_runs` turns a folder into such an iterable. Importing this package is
cheap: spaCy, matplotlib and diffusers are imported only by the functions that need them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daamkit.heatmap import GlobalHeatMap

__all__ = [
    "Run",
    "as_run",
    "iter_runs",
    "open_runs",
    # re-exported lazily from the submodules
    "analyze_syntax",
    "dependency_pairs",
    "load_parser",
    "world_parser",
    "analyze_pos",
    "pos_masses",
    "analyze_entanglement",
    "run_entanglement",
    "adjective_spread",
    "load_ontology",
]

_LAZY = {
    "analyze_syntax": "syntax",
    "dependency_pairs": "syntax",
    "load_parser": "syntax",
    "world_parser": "syntax",
    "SyntaxResult": "syntax",
    "ParserNotFoundError": "syntax",
    "analyze_pos": "pos",
    "pos_masses": "pos",
    "PosResult": "pos",
    "analyze_entanglement": "entanglement",
    "run_entanglement": "entanglement",
    "adjective_spread": "entanglement",
    "load_ontology": "entanglement",
    "EntanglementResult": "entanglement",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class Run:
    """What the analyses need from one generated image."""

    prompt: str
    heat_maps: GlobalHeatMap
    image: Any = None  # PIL image or None
    id: str = ""
    meta: dict[str, Any] = field(default_factory=dict)  # the record's meta, if any


def as_run(item: Any, index: int = 0) -> Run:
    """A :class:`Run` from a RunRecord, a ``(prompt, GlobalHeatMap[, image])`` tuple, a GlobalHeatMap
    whose alignment knows its prompt, or a Run."""
    if isinstance(item, Run):
        return item
    if isinstance(item, GlobalHeatMap):
        if item.prompt is None:
            raise ValueError(
                "this GlobalHeatMap does not know its prompt (alignment.prompt is None); pass "
                "(prompt, heat_maps) or a RunRecord instead"
            )
        return Run(item.prompt, item, None, str(index))
    if isinstance(item, tuple) and 2 <= len(item) <= 3:
        prompt, hm = item[0], item[1]
        if not isinstance(prompt, str) or not isinstance(hm, GlobalHeatMap):
            raise TypeError("a run tuple must be (prompt: str, heat_maps: GlobalHeatMap[, image])")
        return Run(prompt, hm, item[2] if len(item) == 3 else None, str(index))
    hm = getattr(item, "heat_maps", None)
    prompt = getattr(item, "prompt", None)
    if isinstance(hm, GlobalHeatMap) and isinstance(prompt, str):
        meta = getattr(item, "meta", None)
        meta = meta if isinstance(meta, dict) else {}
        return Run(prompt, hm, getattr(item, "image", None), str(meta.get("id", index)), meta)
    raise TypeError(
        f"cannot analyse a {type(item).__name__}: give RunRecords, (prompt, GlobalHeatMap) pairs or "
        "GlobalHeatMaps with a prompt"
    )


def iter_runs(runs: Iterable[Any] | str | os.PathLike[str]) -> Iterator[Run]:
    """Iterate ``runs`` (an iterable of records/pairs/maps, or a folder / record path) as Runs."""
    if isinstance(runs, (str, os.PathLike)):
        runs = open_runs(runs)
    for i, item in enumerate(runs):
        yield as_run(item, i)


def save_report(report: Any, out_dir: str | os.PathLike[str], name: str) -> dict[str, str]:
    """Write ``<name>.json``, ``<name>.md`` and ``<name>.png`` of an analysis result into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(report.to_json(), indent=1, ensure_ascii=False))
    (out / f"{name}.md").write_text(report.markdown())
    report.plot(out / f"{name}.png")
    return {"json": str(out / f"{name}.json"), "markdown": str(out / f"{name}.md"), "plot": str(out / f"{name}.png")}


def open_runs(path: str | os.PathLike[str]) -> Iterable[Any]:
    """The records under ``path``, loaded lazily.

    A folder written by ``daamkit batch`` (or any folder of records) goes through
    :func:`daamkit.io.runs.load_runs`. A single record (stem, ``.json`` or ``.safetensors``) gives a
    one-element list.
    """
    p = Path(path)
    if p.is_dir():
        from daamkit.io.runs import load_runs

        return load_runs(p)
    from daamkit.io.record import RunRecord, record_paths

    if any(q.exists() for q in record_paths(p)):
        return [RunRecord.load(p)]
    from daamkit.errors import DaamkitError

    class RunsNotFoundError(DaamkitError, FileNotFoundError):
        pass

    if not p.exists():
        raise RunsNotFoundError(f"{str(p)!r} does not exist: give a runs folder or a run record")
    raise RunsNotFoundError(f"{str(p)!r} is neither a runs folder nor a run record (.json/.safetensors)")
