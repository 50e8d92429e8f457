"""``daamkit batch``: trace every prompt of a prompt file, on one process or many (Hugging Face accelerate).

Layout of an output folder::

    OUT/records/<id>.safetensors + <id>.json   one RunRecord per prompt (daamkit.io.record, atomic writes)
    OUT/index.jsonl                            one line per prompt, in prompt-file order: id, prompt, seed,
                                               negative_prompt, words, meta, settings, image_size, paths
    OUT/index.parts/process-<r>.jsonl          per-process entries of the run in progress (merged, then removed)

How it runs (the same code on 1 CPU, N GPUs or several machines; ``accelerate launch`` starts the processes):

1. Every process parses the prompt file (deterministic: same items, ids and seeds everywhere).
2. Check: process ``r`` of ``k`` looks at items ``r, r+k, r+2k, ...`` and keeps the ones whose record exists,
   loads (JSON + safetensors present, checksum correct) and was made from the same prompt, seed, size and
   run settings. The lists are gathered on every process (``accelerate.utils.gather_object``).
3. Work: the items still to do are dealt out again by the same index-mod rule (so a resumed run is balanced),
   grouped by image size, and run ``--batch-size`` prompts per pipeline call with one ``torch.Generator`` per
   prompt, which makes each image and its maps independent of the batching.
4. Each record is written with ``RunRecord.save`` (temporary names, then ``os.replace``; JSON last) and its
   index line is appended to the process's part file.
5. Barrier; the main process merges the entries found in step 2 and the part files into ``index.jsonl``
   (written atomically) and removes the part files.

Ctrl-C (or a crash) loses at most the batch in flight: rerun the same command and it continues.

An output folder belongs to one prompt file and one set of run settings (``OUT/batch.json`` names the
prompt file; the index and records carry the settings). Before anything is loaded or written, every
process checks that the command fits the folder and refuses (:class:`BatchError`, nothing changed) if

* the folder was made from another prompt file (by its resolved path),
* its records were made with other run settings (steps, guidance, model, trace options, ...),
* it holds records of ids the prompt file no longer has (they would drop out of the index), or
* records would be replaced by other prompts, seeds or sizes while the prompt file is not known to be
  the one the folder was made from (a folder from an older daamkit, which has no ``batch.json``).

Editing lines of the same prompt file and rerunning regenerates just those records (and says so).
``overwrite=True`` (``--overwrite``) makes the folder this command's: the old index is removed first,
records of ids not in the prompt file are deleted, records that still match their prompt, seed, size and
settings are kept, all others are regenerated; ``index.jsonl`` then lists exactly this prompt file.
The folder, ``records/`` and ``batch.json`` are created only once the pipeline has loaded, so a start that
fails (bad model, bad prompt file, a refusal) leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from daamkit.errors import InputError
from daamkit.io.runs import INDEX_NAME, index_entry, index_line, read_index
from daamkit.jobs.prompts import FORMATS, PromptFileError, PromptItem, parse_prompts, read_prompts

__all__ = [
    "FORMATS",
    "BatchConfig",
    "BatchError",
    "OutPlan",
    "PromptFileError",
    "PromptItem",
    "batches",
    "check_out",
    "parse_prompts",
    "read_prompts",
    "record_status",
    "run_batch",
    "shard",
]

RECORDS_DIR = "records"
PARTS_DIR = "index.parts"
MANIFEST_NAME = "batch.json"
MANIFEST_FORMAT = "daamkit.batch"
# Keys of a record's settings that belong to the item, not to the run (compared separately).
ITEM_SETTINGS = ("seed", "height", "width", "negative_prompt")
REPLACED = "made from another prompt, seed or size"


class BatchError(InputError):
    """The batch cannot run as asked (out folder made with other settings, incomplete merge, ...)."""


# -- sharding and batching ---------------------------------------------------------------------------------
def shard(items: Sequence[Any], process_index: int, num_processes: int) -> list[Any]:
    """Items ``process_index, process_index + num_processes, ...``: the shards of all processes partition
    ``items`` (no overlap, no loss) and their sizes differ by at most one, whatever ``len(items)`` is."""
    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise ValueError(f"process {process_index} of {num_processes} does not exist")
    return list(items[process_index::num_processes])


def batches(items: Sequence[PromptItem], batch_size: int) -> list[list[PromptItem]]:
    """Group items that can share one pipeline call (same size, negative prompt or not), ``batch_size`` each.

    Deterministic; items keep their file order inside each group.
    """
    if batch_size < 1:
        raise ValueError(f"batch size must be at least 1, got {batch_size}")
    groups: dict[tuple[Any, ...], list[PromptItem]] = {}
    for it in sorted(items, key=lambda it: it.index):
        # SDXL zeroes the negative embedding for negative_prompt=None but not for "": never mix the two.
        groups.setdefault((it.height, it.width, it.negative_prompt is not None), []).append(it)
    out = []
    for group in groups.values():
        out.extend(group[i : i + batch_size] for i in range(0, len(group), batch_size))
    return out


# -- settings, records and index entries -------------------------------------------------------------------
@dataclass
class BatchConfig:
    """Run-level settings of a batch (per-item ones live in :class:`PromptItem`)."""

    model: str | None = None  # stored in every record's settings; loaded if no pipeline is passed
    steps: int = 30
    guidance_scale: float = 7.5
    height: int | None = None  # default size for items without one (None: the model's)
    width: int | None = None
    trace: dict[str, Any] = field(default_factory=dict)  # options of daamkit.trace()
    dtype: str | None = None
    device: str | None = None  # None: the process's accelerate device (cuda:<local rank>, or cpu)
    batch_size: int = 1
    save_image: bool = True
    progress: bool = True
    config: str | None = None  # --config for single-file checkpoints
    num_frames: int | None = None  # video pipelines: frames per video (None: the pipeline's default)

    def settings(self, item: PromptItem, height: int, width: int, pipeline: str | None) -> dict[str, Any]:
        """The settings stored in the item's record: the same keys ``daamkit generate`` writes, plus dtype."""
        from daamkit.jobs.generate import GenerateOptions

        opts = GenerateOptions(steps=self.steps, seed=item.seed, height=height, width=width,
                               guidance_scale=self.guidance_scale, negative_prompt=item.negative_prompt,
                               num_images_per_prompt=1, trace=self.trace_options(), progress=False,
                               num_frames=self.num_frames)
        return opts.settings() | {"model": self.model, "pipeline": pipeline, "dtype": self.dtype}

    def trace_options(self) -> dict[str, Any]:
        """Options for :func:`daamkit.trace`, with the mode always spelled out (as the CLI does)."""
        return {"mode": "daam", **self.trace}

    def run_settings(self) -> dict[str, Any]:
        """What must be equal for a finished record to be reused (the pipeline class is not known yet)."""
        s = self.settings(PromptItem(0, "x", "x", 0), 0, 0, None)
        for k in (*ITEM_SETTINGS, "pipeline"):
            s.pop(k)
        return s

    def with_defaults(self, item: PromptItem) -> PromptItem:
        if item.height is None and self.height is not None:
            return replace(item, height=self.height, width=self.width)
        return item


def record_stem(out: Path, item_id: str) -> Path:
    return out / RECORDS_DIR / item_id


def _words(item: PromptItem) -> list[str] | None:
    return list(item.words) if item.words else None


def _entry(item: PromptItem, settings: dict[str, Any], image_size: Sequence[int],
           num_frames: int | None = None) -> dict[str, Any]:
    return index_entry(item.id, item.index, f"{RECORDS_DIR}/{item.id}", prompt=item.prompt, seed=item.seed,
                       negative_prompt=item.negative_prompt, words=_words(item), meta=item.meta,
                       settings=settings, image_size=list(image_size), num_frames=num_frames)


def _num_frames(record: Any) -> int | None:
    return record.heat_maps.num_frames if record.heat_maps.is_video else None


def _record_meta(item: PromptItem) -> dict[str, Any]:
    return {"batch_id": item.id, "batch_index": item.index, "words": _words(item), "item": item.meta}


def record_status(out: Path, item: PromptItem, config: BatchConfig) -> tuple[str, Any]:
    """Is ``item`` finished in ``out``?

    Returns ``("done", entry)``; ``("todo", reason)`` if the record is missing, half-written, damaged or made
    from another prompt/seed/size; ``("conflict", message)`` if it was made with other run settings (steps,
    guidance, model, trace options): a resumed run must not mix those silently.
    """
    from daamkit.io.record import RecordError, RunRecord

    stem = record_stem(out, item.id)
    try:
        rec = RunRecord.load(stem)  # checks JSON + safetensors present and the checksum
    except FileNotFoundError:
        return "todo", "missing"
    except RecordError as e:
        return "todo", f"unreadable ({e})"
    run = config.run_settings()
    have = {k: rec.settings.get(k) for k in run}
    if have != run:
        diff = ", ".join(f"{k}: {have[k]!r} in the record, {run[k]!r} now" for k in run if have[k] != run[k])
        return "conflict", f"{stem}.json was made with other settings ({diff})"
    h, w = rec.heat_maps.image_size
    if (rec.prompt != item.prompt or rec.seed != item.seed or rec.negative_prompt != item.negative_prompt
            or (item.height is not None and (item.height, item.width) != (h, w))):
        return "todo", REPLACED
    if rec.meta != _record_meta(item):  # only the words/meta of the prompt file changed: no need to regenerate
        rec.meta = _record_meta(item)
        rec.save(stem)
    return "done", _entry(item, rec.settings, (h, w), _num_frames(rec))


def _generate_batch(pipe: Any, items: Sequence[PromptItem], config: BatchConfig) -> list[Any]:
    """One traced pipeline call for ``items`` (same size); one RunRecord per item."""
    from daamkit.io.record import RunRecord
    from daamkit.jobs.generate import make_generators, record_media, traced_generation

    first = items[0]
    # One generator per item: diffusers draws each image's noise from its own generator, so an item's
    # latents (and ancestral-sampler noise) do not depend on which batch it is in.
    pairs = traced_generation(
        pipe, [it.prompt for it in items], generator=make_generators(pipe, [it.seed for it in items]),
        steps=config.steps, guidance_scale=config.guidance_scale, num_images_per_prompt=1,
        height=first.height, width=first.width if first.height is not None else None,
        negative_prompt=[it.negative_prompt for it in items] if first.negative_prompt is not None else None,
        trace_options=config.trace_options(), num_frames=config.num_frames,
    )
    if len(pairs) != len(items):
        raise BatchError(f"the pipeline made {len(pairs)} images for {len(items)} prompts")
    records = []
    for it, (image, hm) in zip(items, pairs, strict=True):
        h, w = hm.image_size
        media = record_media(image, hm) if config.save_image else {}
        records.append(RunRecord(prompt=it.prompt, heat_maps=hm, **{"image": None, **media},
                                 seed=it.seed, settings=config.settings(it, h, w, type(pipe).__name__),
                                 negative_prompt=it.negative_prompt, meta=_record_meta(it)))
    return records


def _unknown_words(record: Any, words: Sequence[str] | None) -> list[str]:
    from daamkit.tokens import WordNotFoundError

    bad = []
    for w in words or ():
        try:
            record.heat_maps.word(w)
        except WordNotFoundError:
            bad.append(w)
    return bad


# -- is this output folder ours? ---------------------------------------------------------------------------
@dataclass
class OutPlan:
    """What a run will do to an existing output folder (see the module docstring)."""

    previous_source: str | None = None  # the prompt file named in OUT/batch.json
    orphans: list[str] = field(default_factory=list)  # ids with records in OUT but not in the prompt file
    overwrite: bool = False
    foreign: bool = False  # made from another prompt file or other settings (allowed with overwrite only)


def read_manifest(out: Path) -> dict[str, Any] | None:
    """``OUT/batch.json`` as a dict, None if absent; BatchError if it is not one of ours."""
    path = out / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise BatchError(f"{path} is damaged ({type(e).__name__}); remove it or use another --out") from None
    if not isinstance(doc, dict) or doc.get("format") != MANIFEST_FORMAT or not isinstance(
            doc.get("prompts"), (str, type(None))):
        raise BatchError(f"{path} is not a daamkit batch manifest; use another --out")
    return doc


def _existing_ids(out: Path) -> set[str]:
    ids: set[str] = set()
    records = out / RECORDS_DIR
    if records.is_dir():
        for p in records.iterdir():
            if not p.name.startswith(".") and p.suffix in (".json", ".safetensors"):
                ids.add(p.name.removesuffix(p.suffix))
    return ids


def check_out(out: Path, items: Sequence[PromptItem], config: BatchConfig, source: str | None = None,
              overwrite: bool = False) -> OutPlan:
    """Whether the run may write into ``out``; reads only (every process runs it, so all refuse alike).

    Raises :class:`BatchError` naming what differs unless ``overwrite``; returns the plan.
    """
    plan = OutPlan(overwrite=overwrite)
    if out.exists() and not out.is_dir():
        raise BatchError(f"--out {str(out)!r} exists and is not a folder")
    if not out.is_dir():
        return plan
    hint = "use another --out, or --overwrite to replace its run with this one"
    manifest = read_manifest(out)
    plan.previous_source = manifest.get("prompts") if manifest else None
    problems: list[str] = []
    if source is not None and plan.previous_source is not None and plan.previous_source != source:
        problems.append(f"it was made from the prompt file {plan.previous_source}, not {source}")
    index = out / INDEX_NAME
    if index.is_file():
        from daamkit.io.runs import RunsError

        run = config.run_settings()
        try:
            entries = read_index(index)
        except RunsError as e:
            if not overwrite:
                raise BatchError(f"{out} has a damaged index ({e}); {hint}") from None
            entries = []
        for e in entries:
            have = e.get("settings") or {}
            if any(have.get(k) != run[k] for k in run):
                diff = ", ".join(f"{k}: {have.get(k)!r} in the record, {run[k]!r} now"
                                 for k in run if have.get(k) != run[k])
                problems.append(f"{e['paths']['json']} was made with other settings ({diff})")
                break
    wanted = {it.id for it in items}
    plan.orphans = sorted(_existing_ids(out) - wanted)
    if plan.orphans:
        shown = ", ".join(plan.orphans[:5]) + (", ..." if len(plan.orphans) > 5 else "")
        problems.append(f"it holds records of {len(plan.orphans)} id(s) not in "
                        f"{source or 'the prompt list'} ({shown}), which would drop out of the index")
    plan.foreign = bool(problems)
    if problems and not overwrite:
        raise BatchError(f"{out} belongs to another batch: {'; '.join(problems)}; {hint}")
    return plan


def _take_over(out: Path, plan: OutPlan, source: str | None, say: Callable[[str], None]) -> None:
    """Make ``out`` this run's (main process, after the pipeline loaded, before anything is generated)."""
    records = out / RECORDS_DIR
    if plan.overwrite and (plan.foreign or plan.orphans):
        # The old index goes first: if the run stops halfway, no index lists records that are gone.
        with contextlib.suppress(FileNotFoundError):
            (out / INDEX_NAME).unlink()
        for run_id in plan.orphans:
            for suffix in (".json", ".safetensors"):
                with contextlib.suppress(FileNotFoundError):
                    (records / f"{run_id}{suffix}").unlink()
        say(f"daamkit batch: --overwrite: {out} now belongs to {source or 'this prompt list'}: deleted the "
            f"records of {len(plan.orphans)} id(s) not in it; records that match their prompt, seed, size and "
            "settings are kept, the others are regenerated")
    if source is not None:
        _write_text_atomic(out / MANIFEST_NAME, json.dumps({"format": MANIFEST_FORMAT, "prompts": source}) + "\n")


# -- the runner --------------------------------------------------------------------------------------------
def _state(device: str | None) -> Any:
    import torch
    from accelerate import PartialState

    cpu = device == "cpu" or (device is None and not torch.cuda.is_available())
    return PartialState(cpu=cpu)


def _process_device(device: str | None, state: Any) -> str:
    if device is None:
        return "cpu" if state.device.type == "cpu" else str(state.device)
    if device == "cuda" and state.num_processes > 1:
        return f"cuda:{state.local_process_index}"
    return device


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class _Progress:
    """tqdm on the main process, counting the lines every process has appended to its part file."""

    def __init__(self, parts: Path, total: int, enabled: bool, desc: str):
        self.parts, self.offsets, self.count = parts, {}, 0
        self.bar = None
        if enabled and total:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="prompt", file=sys.stderr, dynamic_ncols=True)

    def poll(self) -> None:
        if self.bar is None:
            return
        new = 0
        for p in sorted(self.parts.glob("process-*.jsonl")):
            with contextlib.suppress(OSError), open(p, "rb") as f:
                f.seek(self.offsets.get(p, 0))
                data = f.read()
                self.offsets[p] = self.offsets.get(p, 0) + len(data)
                new += data.count(b"\n")
        if new:
            self.bar.update(min(new, self.bar.total - self.bar.n))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_batch(items: Sequence[PromptItem], out: str | os.PathLike[str], config: BatchConfig,
              pipe: Any = None, log: Callable[[str], None] | None = None, *, source: str | None = None,
              overwrite: bool = False) -> dict[str, Any]:
    """Generate and trace every item not finished in ``out``; returns a summary (on every process).

    Runs as one process of ``accelerate launch`` (or alone). ``pipe``: an already loaded pipeline; if None,
    each process that has work loads ``config.model`` on its device. ``source``: the prompt file's resolved
    path, recorded in ``OUT/batch.json``; ``overwrite``: replace a run from another prompt file or with other
    settings instead of refusing (see the module docstring).
    Summary: total, skipped (already done), generated (by all processes), this_process, processes,
    seconds (from the barrier after every process has loaded its pipeline to the merged index), index (path).
    """
    from accelerate.utils import gather_object

    state = _state(config.device)
    rank, nproc, main = state.process_index, state.num_processes, state.is_main_process
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = Path(out)
    records, parts = out / RECORDS_DIR, out / PARTS_DIR
    items = [config.with_defaults(it) for it in items]
    if len({it.id for it in items}) != len(items):
        raise BatchError("item ids are not unique")

    # 1. may this run write here at all? (read-only, on every process)
    plan = check_out(out, items, config, source, overwrite)

    # 2. which records are finished? (each process checks its share, everyone gets the answer)
    done: dict[int, dict[str, Any]] = {}
    todo: list[int] = []
    conflicts: list[str] = []
    to_check = shard(items, rank, nproc)
    if main and config.progress and len(items) >= 1000:
        from tqdm.auto import tqdm

        to_check = tqdm(to_check, desc="checking records", unit="record", file=sys.stderr, leave=False)
    replaced: list[str] = []
    for it in to_check:
        status, info = record_status(out, it, config)
        if status == "done":
            done[it.index] = info
        elif status == "todo" or overwrite:
            todo.append(it.index)
            if info == REPLACED or status == "conflict":
                replaced.append(it.id)
        else:
            conflicts.append(info)
    gathered = gather_object([{"done": done, "todo": todo, "conflicts": conflicts[:5], "replaced": replaced}])
    all_done: dict[int, dict[str, Any]] = {}
    pending: list[int] = []
    conflicts, replaced = [], []
    for g in gathered:
        all_done.update(g["done"])
        pending += g["todo"]
        conflicts += g["conflicts"]
        replaced += g["replaced"]
    if replaced and not overwrite and source is not None and plan.previous_source != source:
        # Without batch.json (an older daamkit's folder) nothing says these prompts are edits of the same
        # file rather than a different file's: replacing its records needs --overwrite.
        raise BatchError(f"{out} holds records of other prompts, seeds or sizes under the same ids "
                         f"({', '.join(sorted(replaced)[:5])}{', ...' if len(replaced) > 5 else ''}) and nothing "
                         f"says it was made from {source}; use another --out, or --overwrite to replace them")
    if conflicts:
        raise BatchError(
            f"{out} holds records made with other run settings; resume with the same settings or use a new --out. "
            + "; ".join(conflicts[:3])
        )
    pending.sort()
    if main:
        say(f"daamkit batch: {len(items)} prompts, {len(all_done)} already done, {len(pending)} to generate "
            f"on {nproc} process{'es' if nproc > 1 else ''} (batch size {config.batch_size}) -> {out}")
        if replaced:
            say(f"daamkit batch: {len(replaced)} record(s) made from other prompts, seeds, sizes or settings are "
                f"regenerated: {', '.join(sorted(replaced)[:10])}{', ...' if len(replaced) > 10 else ''}")

    # 3. generate this process's share of what is left
    by_index = {it.index: it for it in items}
    mine = [by_index[i] for i in shard(pending, rank, nproc)]
    if mine and pipe is None:
        if config.model is None:
            raise BatchError("no model: pass --model PATH")
        from daamkit.jobs.pipeline import load_pipeline

        if not (config.progress and main):  # one set of loading bars at most
            import diffusers
            import transformers

            diffusers.utils.logging.disable_progress_bar()
            transformers.utils.logging.disable_progress_bar()
        pipe = load_pipeline(config.model, device=_process_device(config.device, state), dtype=config.dtype,
                             config=config.config)
    # fresh part files; temporary files left by a killed run are removed before anyone writes again.
    # Only now, with every check passed and the pipeline loaded, is anything created or deleted.
    if main:
        records.mkdir(parents=True, exist_ok=True)
        parts.mkdir(parents=True, exist_ok=True)
        for stale in [*records.glob(".*.tmp"), *parts.glob("*"), *out.glob(f".{INDEX_NAME}.*.tmp")]:
            with contextlib.suppress(OSError):
                stale.unlink()
        _take_over(out, plan, source, say)
    state.wait_for_everyone()  # the timing starts when every process has its pipeline
    progress = _Progress(parts, len(pending), config.progress and main, "daamkit batch")
    t0 = time.perf_counter()
    made = 0
    try:
        if mine:
            pipe.set_progress_bar_config(disable=True)
            with open(parts / f"process-{rank}.jsonl", "a", encoding="utf-8") as part:
                for group in batches(mine, config.batch_size):
                    for it, rec in zip(group, _generate_batch(pipe, group, config), strict=True):
                        rec.save(record_stem(out, it.id))
                        if bad := _unknown_words(rec, it.words):
                            say(f"daamkit batch: warning: {it.id}: word(s) {', '.join(map(repr, bad))} not in the "
                                f"prompt's words {rec.heat_maps.words}")
                        part.write(index_line(_entry(it, rec.settings, rec.heat_maps.image_size, _num_frames(rec))))
                        part.flush()
                        made += 1
                    progress.poll()
    except KeyboardInterrupt:
        progress.close()
        say(f"daamkit batch: interrupted on process {rank} after {made} new record(s); "
            "finished records are kept: rerun the same command to continue")
        raise
    state.wait_for_everyone()
    progress.poll()
    progress.close()

    # 4. merge (main process), then let everyone return with the index in place (or with the same error)
    index = out / INDEX_NAME
    generated, problem = 0, None
    if main:
        try:
            entries = dict(all_done)
            for p in sorted(parts.glob("process-*.jsonl")):
                # a last line cut short by a crash is ignored (its record is checked again next run)
                for e in read_index(p, partial=True):
                    entries[e["index"]] = e
                    generated += 1
            missing = [it.id for it in items if it.index not in entries]
            if missing:
                problem = f"{len(missing)} prompt(s) have no record after the run: {', '.join(missing[:10])}"
            else:
                _write_text_atomic(index, "".join(index_line(entries[it.index]) for it in items))
                for p in parts.glob("*"):
                    p.unlink()
                with contextlib.suppress(OSError):
                    parts.rmdir()
        except (OSError, ValueError) as e:
            problem = f"could not merge the index: {e}"
    seconds = time.perf_counter() - t0
    result = gather_object([(generated, problem)])
    state.wait_for_everyone()
    problems = [p for _, p in result if p]
    if problems:
        raise BatchError(problems[0])
    generated = sum(g for g, _ in result)
    summary = {"total": len(items), "skipped": len(all_done), "generated": generated, "this_process": made,
               "processes": nproc, "process_index": rank, "seconds": seconds, "index": str(index)}
    if main:
        rate = summary["generated"] / seconds if seconds > 0 and summary["generated"] else 0.0
        say(f"daamkit batch: wrote {summary['generated']} record(s) in {seconds:.1f} s ({rate:.2f} prompts/s), "
            f"index {index}")
    return summary
