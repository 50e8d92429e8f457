"""The phase driver: :func:`train` runs (or resumes) every phase of a run for a :class:`Recipe`."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Collection
from pathlib import Path

from .autoencoder import check_vae_source, phase_decoder, phase_latents, phase_vae
from .common import Logger, done
from .data import phase_data
from .export import phase_export
from .recipe import ARCHITECTURE, PHASES, RETIRED_OPTIONS, SESSION_OPTIONS, Recipe, flag, option_names
from .unet import bf16_native
from .workers import DecoderAlongside, phase_unet


def adopt_record(r: Recipe, recorded: dict, given: Collection[str]) -> tuple[Recipe, dict]:
    """On resume a run goes on with the options it recorded in ``args.json``: each recipe option not
    in ``given`` is taken from the record (today's default where the record lacks it). One given and
    different from the record is a change, returned as ``{option: [recorded, now]}`` beside the
    recipe to go on with.

    Raises ValueError, before anything changes, where the run cannot go on: for a change of the
    architecture (checkpoints only load into the shapes they were trained with), and for a record
    that used an option this version no longer has at a value other than the one it now always has."""
    retired = {k: v for k, v in recorded.items() if k in RETIRED_OPTIONS and v != RETIRED_OPTIONS[k]}
    if retired:
        used = ", ".join(f"{flag(k)} {v}" for k, v in retired.items())
        raise ValueError(
            f"this run's args.json has {used}: {'that option is' if len(retired) == 1 else 'those options are'} "
            "gone, so it cannot go on the same way; start a new --out instead"
        )
    default = Recipe()
    adopt, changes = {}, {}
    for key in option_names():
        if key in SESSION_OPTIONS:
            continue
        before = recorded.get(key, getattr(default, key))
        now = getattr(r, key)
        if key not in given:
            adopt[key] = before
        elif now != before:
            if key in ARCHITECTURE:
                raise ValueError(
                    f"{flag(key)} {now} contradicts this run's args.json ({flag(key)} {before}); "
                    "the architecture of a run cannot change on --resume: start a new --out instead"
                )
            changes[key] = [before, now]
    return r.replace(**adopt), changes


def _write_record(path: Path, record: dict) -> None:
    # A new file, not a rewrite: runs may share their first phases' files as hard links, and a rewrite
    # in place would change every linked run's record.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    os.replace(tmp, path)


def decoder_runs_alongside(r: Recipe, out: Path) -> bool:
    """Whether the decoder phase should run in a second process beside the UNet phase."""
    if r.decoder_alongside is not None:
        want = r.decoder_alongside
    else:  # by default when there is a core to spare for it, or the UNet trains on another device
        want = r.threads >= 2 or r.device != "cpu"
    return want and r.decoder_minutes > 0 and not r.vae_from and not done(out, "decoder")


def _error(msg) -> int:
    print(f"daamkit: error: {msg}", file=sys.stderr)
    return 2


def train(r: Recipe, given: Collection[str] | None = None) -> int:
    """Run the phases of ``r`` under ``r.out``; returns an exit status (2, with a message, for options
    that cannot be used, before anything is trained).

    With ``r.resume`` the run goes on with the options its ``args.json`` recorded, except the session
    options and those in ``given`` (the ones the caller set; by default those that differ from their
    defaults), which replace the recorded ones from then on."""
    import torch

    if given is None:
        default = Recipe()
        given = {k for k in option_names() if getattr(r, k) != getattr(default, k)}
    try:
        r.check()
    except ValueError as e:  # before anything is written or trained
        return _error(e)
    torch.set_num_threads(r.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    out = Path(r.out)
    if out.exists() and any(out.iterdir()) and not r.resume:
        return _error(f"{out} is not empty: pass --resume to continue it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "args.json"
    recorded = json.loads(cfg_path.read_text()) if cfg_path.exists() else None
    changes = {}
    if recorded is not None:
        try:
            r, changes = adopt_record(r, recorded, given)
        except ValueError as e:
            return _error(e)
    try:
        check_vae_source(r)
    except ValueError as e:
        if recorded is None and not any(out.iterdir()):
            out.rmdir()  # this call made it: leave nothing behind
        return _error(e)
    if r.bf16 is None:  # resolved before args.json is written, so the run records what it used
        r = r.replace(bf16=bf16_native(r.device))
    if recorded is None:
        _write_record(cfg_path, r.as_dict())
    elif changes:
        for key, (before, now) in changes.items():
            print(f"--resume: {flag(key)} {before} -> {now}", file=sys.stderr)
        record = {**recorded, **{k: now for k, (_, now) in changes.items()}}
        record["changed_on_resume"] = [
            *recorded.get("changed_on_resume", []),
            {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "only": r.only, "options": changes},
        ]
        _write_record(cfg_path, record)
    return _run_phases(r, out)


def _run_phases(r: Recipe, out: Path) -> int:
    import torch

    log = Logger(out)
    funcs = {
        "data": phase_data,
        "vae": phase_vae,
        "latents": phase_latents,
        "unet": phase_unet,
        "decoder": phase_decoder,
        "export": phase_export,
    }
    t0 = time.time()
    alongside = None
    try:
        for ph in PHASES:
            if r.only and ph != r.only:
                continue
            if alongside is not None and ph == "decoder":
                alongside.wait()  # it ran beside the UNet and wrote decoder.done
                continue
            if done(out, ph) and not r.only:
                continue
            print(f"== phase {ph}", file=sys.stderr)
            t1 = time.time()
            if ph == "unet" and not r.only and decoder_runs_alongside(r, out):
                print(f"== phase decoder runs alongside (log: {out / 'decoder.log'})", file=sys.stderr)
                alongside = DecoderAlongside(r, out)
                phase_unet(r, out, log, alongside)
                torch.set_num_threads(r.threads)
            else:
                funcs[ph](r, out, log)
            print(f"== phase {ph} took {(time.time() - t1) / 60:.1f} min", file=sys.stderr)
    except BaseException:
        if alongside is not None:
            alongside.stop()
        raise
    log(phase="all_done", seconds=time.time() - t0)
    return 0
