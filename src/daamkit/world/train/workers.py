"""The processes of the UNet phase: data-parallel UNet workers on a CPU, and the decoder phase
running in a second process beside the UNet."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from .autoencoder import phase_decoder
from .common import Logger, exit_with_parent, no_log
from .data import ground_targets, needs_ground_targets
from .recipe import Recipe
from .unet import train_unet


def unet_workers(r: Recipe) -> int:
    """Data-parallel processes of the UNet phase: ``unet_workers``, or by default one per thread on a
    CPU, reduced to the largest count that divides the batch; always 1 on another device."""
    if r.device != "cpu":
        return 1
    want = r.unet_workers if r.unet_workers is not None else r.threads
    want = max(1, min(want, r.threads))
    return max(w for w in range(1, want + 1) if r.batch % w == 0)


def _decoder_process(r: Recipe, out: str) -> None:
    """Entry point of the second process that runs the ``decoder`` phase beside the UNet phase."""
    import torch

    exit_with_parent()
    torch.set_num_threads(1)
    out_p = Path(out)
    with open(out_p / "decoder.log", "a") as err:
        sys.stderr = err  # two tqdm bars on one terminal garble each other
        phase_decoder(r, out_p, Logger(out_p))


class DecoderAlongside:
    """The ``decoder`` phase in a second process while the UNet phase trains.

    The decoder fine-tune only needs the cached latents and never touches the UNet, so the two can
    share the machine: on 2 cores the UNet gives one thread to the decoder while it runs and takes it
    back when it ends, instead of the decoder's budget coming on top of the UNet's."""

    def __init__(self, r: Recipe, out: Path):
        import multiprocessing as mp

        # spawn, not fork: a forked child would inherit torch's thread pools and OpenMP state
        self.proc = mp.get_context("spawn").Process(target=_decoder_process, args=(r, str(out)), name="daamkit-decoder")
        self.proc.start()
        self.out = out

    def running(self) -> bool:
        return self.proc.is_alive()

    def wait(self) -> None:
        self.proc.join()
        if self.proc.exitcode != 0:
            raise RuntimeError(
                f"the decoder phase running alongside the UNet failed (exit code {self.proc.exitcode}); "
                f"see {self.out / 'decoder.log'}. `--resume` continues it"
            )

    def stop(self) -> None:
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join()


def phase_unet(r: Recipe, out: Path, log, alongside: DecoderAlongside | None = None) -> None:
    """The UNet phase. On a CPU with more than one worker (:func:`unet_workers`) the batch is split over
    that many single-threaded processes that average their gradients (``torch.distributed``, gloo):
    the UNet's small convolutions scale badly over threads (2 threads: 1.2-1.3x one; 2 processes of one
    thread: about 1.7x), and each worker computes its share of the very batch a single process would
    draw, so the recipe is the same at any worker count. While the decoder runs alongside, the UNet
    trains in this process on the threads the decoder leaves; when it ends, the workers take over from
    a checkpoint."""
    workers = unet_workers(r)
    if workers == 1 or alongside is not None:
        hand_over = workers if workers > 1 else 0
        if train_unet(r, out, log, alongside=alongside, hand_over=hand_over) != "handed over":
            return
    _unet_data_parallel(r, out, workers)


def _unet_data_parallel(r: Recipe, out: Path, workers: int) -> None:
    import torch.multiprocessing as mp

    if needs_ground_targets(r):
        ground_targets(r, out)  # once, here: workers that each built them raced on one file
    rendezvous = out / f".unet_workers_{os.getpid()}"  # gloo's file rendezvous: must not exist yet
    rendezvous.unlink(missing_ok=True)
    print(f"unet: {workers} data-parallel workers", file=sys.stderr)
    try:  # spawn: a forked child would inherit torch's thread pools; a failed worker stops the others
        mp.spawn(_unet_worker, args=(workers, r, str(out), str(rendezvous), time.time()), nprocs=workers)
    finally:
        rendezvous.unlink(missing_ok=True)


def _unet_worker(rank: int, world: int, r: Recipe, out: str, rendezvous: str, spawned_at: float) -> None:
    import torch
    import torch.distributed as dist

    exit_with_parent()
    torch.set_num_threads(max(1, r.threads // world))
    dist.init_process_group("gloo", init_method=Path(rendezvous).resolve().as_uri(), rank=rank, world_size=world)
    try:
        out_p = Path(out)
        train_unet(r, out_p, Logger(out_p) if rank == 0 else no_log, rank=rank, world=world, spawned_at=spawned_at)
    finally:
        dist.destroy_process_group()
