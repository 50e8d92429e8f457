"""Time of the UNet phase's AdamW step: PyTorch's default per-tensor loop against the fused kernel.

Builds the shapes-world UNet and text encoder with today's `daamkit world train` defaults (or
``--unet-channels``), gives every parameter a random gradient and times ``opt.step()`` of both
implementations as the phase builds it (`daamkit.world.train.unet_optimizer`), in
ABAB order on one thread, as one data-parallel worker runs it. Prints the median milliseconds a step
and the ratio against the per-tensor loop measured in the same run.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/optimizer_step.py
    OMP_WAIT_POLICY=PASSIVE python benchmarks/optimizer_step.py --unet-channels 32,64,64 --unet-groups 8

Target: the fused step must be faster (the UNet phase uses it on a CPU or CUDA device). The step's
fixed costs matter most for a small UNet, whose forward and backward are cheap.
"""

from __future__ import annotations

import argparse
import statistics
import time


def _ms_per_step(opt, params: list, steps: int) -> float:
    import torch

    for p in (p for group in params for p in group):
        p.grad = torch.randn_like(p)
    opt.step()  # the first step allocates the moments
    t = time.perf_counter()
    for _ in range(steps):
        opt.step()
    return (time.perf_counter() - t) / steps * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--unet-channels", default=None)
    p.add_argument("--unet-groups", type=int, default=None)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)

    import torch

    from daamkit.world.train import Recipe, build_unet_and_text, unet_optimizer

    torch.set_num_threads(a.threads)
    args = Recipe()
    args = args.replace(unet_channels=a.unet_channels or args.unet_channels, unet_groups=a.unet_groups or args.unet_groups)
    torch.manual_seed(0)
    unet, te = build_unet_and_text(args)
    params = [list(unet.parameters()), list(te.parameters())]
    n = sum(p.numel() for group in params for p in group)
    opts = {fused: unet_optimizer(unet, te, args, fused=fused) for fused in (False, True)}
    times: dict[bool, list[float]] = {False: [], True: []}
    for rep in range(a.repeats):
        for fused in (False, True) if rep % 2 == 0 else (True, False):
            times[fused].append(_ms_per_step(opts[fused], params, a.steps))
    loop, fused = statistics.median(times[False]), statistics.median(times[True])
    print(
        f"AdamW step, UNet {args.unet_channels} + text encoder: {n / 1e6:.2f} M parameters in "
        f"{sum(len(g) for g in params)} tensors, {a.threads} thread(s), median of {a.repeats}"
    )
    print("| implementation | ms/step | ratio |")
    print("|---|---|---|")
    print(f"| per-tensor loop (baseline) | {loop:.1f} | 1.00 |")
    print(f"| fused | {fused:.1f} | {loop / fused:.2f}x faster |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
