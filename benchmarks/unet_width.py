"""Cost of one shapes-world UNet training step for other architectures, against the default one.

The UNet phase is budgeted in minutes, so a bigger UNet trains for fewer steps in the same two
hours; this prints how many fewer. Each architecture is built with `daamkit.world.train.unet_config`
(everything else at its default) and timed on the same random batch: forward pass (under bf16
autocast with ``--bf16``), noise-style MSE, backward, AdamW step. The batch defaults to 16, one
data-parallel worker's half of the recipe's 32, on one thread, as each worker runs. The first
architecture is the baseline; each row prints its median time per step and the ratio to it.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/unet_width.py --bf16
    OMP_WAIT_POLICY=PASSIVE python benchmarks/unet_width.py --arch 64,128,128:1 --arch 64,128,128:2

Target: none; it sizes experiments (a UNet that costs 1.27x per step gets 1 / 1.27 of the steps).
"""

from __future__ import annotations

import argparse
import statistics
import time

DEFAULT_ARCHS = ["64,128,128:1", "96,128,128:1", "128,128,128:1", "64,128,128:2", "96,192,192:1"]


def _step_seconds(arch: str, batch: int, steps: int, bf16: bool) -> tuple[float, int]:
    import torch
    from diffusers import UNet2DConditionModel

    from daamkit.world.train import Recipe, unet_config

    channels, _, layers = arch.partition(":")
    args = Recipe(unet_channels=channels, unet_layers=int(layers or 1))
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**unet_config(args)).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    size = unet.config.sample_size
    x = torch.randn(batch, unet.config.in_channels, size, size)
    t = torch.randint(0, 1000, (batch,))
    text = torch.randn(batch, 77, args.text_width)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = unet(x, t, encoder_hidden_states=text).sample
        (out.float() ** 2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:]), sum(p.numel() for p in unet.parameters())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arch", action="append", help="CHANNELS:LAYERS, e.g. 128,128,128:1 (repeatable; first is the baseline)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=8, help="timed steps per architecture (the first 2 are dropped)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=False)
    a = p.parse_args(argv)

    import torch

    torch.set_num_threads(a.threads)
    archs = a.arch or DEFAULT_ARCHS
    print(f"UNet training step, batch {a.batch}, {a.threads} thread(s), bf16 {'on' if a.bf16 else 'off'}")
    print("| unet channels : layers per block | parameters | fp16 MB | ms/step | ratio |")
    print("|---|---|---|---|---|")
    base = None
    for arch in archs:
        sec, n = _step_seconds(arch, a.batch, max(3, a.steps), a.bf16)
        base = base or sec
        print(f"| {arch} | {n / 1e6:.2f} M | {2 * n / 2**20:.1f} | {1000 * sec:.0f} | {sec / base:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
