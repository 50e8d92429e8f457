"""Phase ``unet``: the UNet and the text encoder trained jointly on the cached latents (epsilon
prediction, min-SNR weighting, caption dropout for classifier-free guidance, the grounding loss and
an EMA of the weights), in one process or as one of several data-parallel workers."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import numpy as np

from .autoencoder import sample_latents
from .common import lr_at, mark, save
from .data import ground_targets, scene_sampler
from .grounding import capture_cross_attention, grounded_tokens, grounding_loss
from .recipe import SCHEDULER_KW, Recipe, text_config, timestep_focus, unet_config


def bf16_native(device: str = "cpu", cpu_flags: str | None = None) -> bool:
    """Whether ``device`` computes bfloat16 natively: CUDA devices that report it, CPUs whose
    /proc/cpuinfo flags list avx512_bf16 or amx_bf16. Elsewhere bf16 autocast is emulated, which is
    slower than float32, so the training default follows this."""
    import torch

    kind = torch.device(device).type
    if kind == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if kind != "cpu":
        return False
    if cpu_flags is None:
        try:
            cpu_flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", cpu_flags))


def build_unet_and_text(r: Recipe):
    """A fresh UNet and CLIP text encoder of the recipe's architecture (seed torch first)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    return UNet2DConditionModel(**unet_config(r)), CLIPTextModel(CLIPTextConfig(**text_config(r)))


def unet_optimizer(unet, te, r: Recipe, fused: bool):
    """The UNet phase's AdamW over the UNet (group 0) and the text encoder (group 1, ``text_lr_mult``).

    ``fused``: one kernel per tensor instead of a dozen small ops. PyTorch's default on a CPU is the
    per-tensor loop, about 8% of a one-thread worker's step (benchmarks/optimizer_step.py, which times
    both through this function)."""
    import torch

    params = [
        {"params": list(unet.parameters()), "lr": r.lr},
        {"params": list(te.parameters()), "lr": r.lr * r.text_lr_mult},
    ]
    return torch.optim.AdamW(params, lr=r.lr, weight_decay=0.0, betas=(0.9, 0.99), fused=fused)


def timestep_sampler(spec: str):
    """The ``timestep_focus`` option (``LO,HI,SHARE`` or empty) as a function drawing a batch's
    timesteps. Empty is the plain uniform draw, from the same random stream as without the option."""
    import torch

    focus = timestep_focus(spec)
    if focus is None:
        return lambda b: torch.randint(0, 1000, (b,))
    lo, hi, share = focus

    def draw(b: int) -> torch.Tensor:
        t = torch.randint(0, 1000, (b,))
        focus = torch.rand(b) < share
        return torch.where(focus, torch.randint(lo, hi, (b,)), t)

    return draw


def denoiser(unet, te):
    """UNet and text encoder as one module, so that one DistributedDataParallel wrapper reduces the
    gradients of both."""
    import torch

    class Denoiser(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet, self.te = unet, te

        def forward(self, zt, t, ids):
            return self.unet(zt, t, encoder_hidden_states=self.te(ids)[0]).sample

    return Denoiser()


def shared(values: list[float], world: int) -> list[float]:
    """Sum ``values`` over the workers (each passes its own; a worker passes 0 where only rank 0's
    value counts)."""
    if world == 1:
        return values
    import torch
    import torch.distributed as dist

    buf = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(buf)
    return buf.tolist()


def train_unet(
    r: Recipe,
    out: Path,
    log,
    alongside=None,
    hand_over: int = 0,
    rank: int = 0,
    world: int = 1,
    spawned_at: float | None = None,
) -> str:
    """Train (or go on training) the UNet and text encoder; returns "done", or "handed over" when the
    decoder running ``alongside`` (a :class:`~daamkit.world.train.workers.DecoderAlongside`) has ended
    and ``hand_over`` data-parallel workers are to take over: the state is then in the checkpoint.
    ``rank``/``world``: this worker among ``world`` in an initialised process group; rank 0 alone
    logs, keeps the EMA and writes checkpoints."""
    import copy

    import torch
    from diffusers import DDPMScheduler
    from tqdm import tqdm

    def say(msg: str) -> None:
        if rank == 0:
            print(msg, file=sys.stderr)

    scale = json.loads((out / "latents.done").read_text())["scaling_factor"]
    lat = np.load(out / "latents.npz")
    lmean, lstd = lat["mean"], lat["std"]
    data = np.load(out / "data.npz")
    ids_all = data["input_ids"].astype(np.int64)
    objmask = data["objmask"]
    empty = torch.from_numpy(np.load(out / "empty_ids.npy").astype(np.int64))
    n = len(lmean)
    ground = r.ground_weight > 0
    if ground:
        gt = np.load(ground_targets(r, out))
        g_bits, g_masks = gt["bits"], gt["masks"]

    torch.manual_seed(r.seed)
    dev = torch.device(r.device)
    unet, te = build_unet_and_text(r)
    unet, te = unet.to(dev), te.to(dev)
    ema_u, ema_t = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(te).requires_grad_(False)
    store: list = []
    if ground:  # after the EMA copy: the exported weights never carry the training processor
        capture_cross_attention(unet, store)
    opt = unet_optimizer(unet, te, r, fused=dev.type in ("cpu", "cuda"))
    sched = DDPMScheduler(**SCHEDULER_KW)
    acp = sched.alphas_cumprod.float()
    snr = (acp / (1 - acp)).to(dev)
    ck = out / "ckpt_unet.pt"
    step, elapsed = 0, 0.0
    if ck.exists():
        st = torch.load(ck, weights_only=False, map_location="cpu")
        unet.load_state_dict(st["unet"])
        te.load_state_dict(st["text"])
        ema_u.load_state_dict(st["ema_unet"])
        ema_t.load_state_dict(st["ema_text"])
        opt.load_state_dict(st["opt"])
        step, elapsed = st["step"], st["elapsed"]
        torch.set_rng_state(st["rng"])
        say(f"resumed unet at step {step} ({elapsed / 60:.1f} min)")
    if spawned_at is not None:  # the workers' start-up counts against the budget
        elapsed += time.time() - spawned_at
    net = denoiser(unet, te)
    if world > 1:
        # one clock for all: the learning rate and the stop follow rank 0's elapsed time
        elapsed = shared([elapsed if rank == 0 else 0.0], world)[0]
        net = torch.nn.parallel.DistributedDataParallel(net)
    n_u = sum(p.numel() for p in unet.parameters())
    n_t = sum(p.numel() for p in te.parameters())
    say(f"unet {n_u / 1e6:.2f}M params, text encoder {n_t / 1e6:.2f}M params")
    budget = r.unet_minutes * 60
    say(f"bf16 autocast {'on' if r.bf16 else 'off'}")
    gen = np.random.default_rng(r.seed + 1000 + step)
    pick = scene_sampler(r, out, n)
    draw_t = timestep_sampler(r.timestep_focus)
    part = slice(rank * r.batch // world, (rank + 1) * r.batch // world)
    t0 = time.time() - elapsed
    last_ck = time.time()
    # one foreach call per step instead of a lerp per tensor (the per-op overhead dominates on a GPU)
    ema_params = [e for m_e in (ema_u, ema_t) for e in m_e.parameters()]
    live_params = [p for m in (unet, te) for p in m.parameters()]

    def checkpoint():
        save(
            {
                "unet": unet.state_dict(),
                "text": te.state_dict(),
                "ema_unet": ema_u.state_dict(),
                "ema_text": ema_t.state_dict(),
                "opt": opt.state_dict(),
                "step": step,
                "elapsed": time.time() - t0,
                "rng": torch.get_rng_state(),
            },
            ck,
        )

    bar = tqdm(total=r.unet_steps, initial=step, desc="unet", mininterval=10, file=sys.stderr, disable=rank > 0)
    unet.train()
    te.train()
    run_loss = run_g = None
    if alongside is not None and dev.type == "cpu":
        torch.set_num_threads(max(1, r.threads - 1))
    while step < r.unet_steps and elapsed < budget:
        if alongside is not None and not alongside.running():
            alongside = None  # the driver still holds it, to join it and check its exit code
            if hand_over:
                checkpoint()
                log(phase="unet_handover", step=step, workers=hand_over)
                bar.close()
                return "handed over"
            torch.set_num_threads(r.threads)  # the decoder is done: take its core back
            log(phase="unet_threads", step=step, threads=r.threads)
        frac = max(step / r.unet_steps, elapsed / budget)
        lr = lr_at(frac, r.lr, 0.04, r.final_lr_ratio)
        opt.param_groups[0]["lr"] = lr
        opt.param_groups[1]["lr"] = lr * r.text_lr_mult
        # every worker draws the whole batch and keeps its part: the same random stream at any worker count
        idx = pick(gen, r.batch)
        z0 = sample_latents(lmean, lstd, idx).to(dev) * scale
        ids = torch.from_numpy(ids_all[idx])
        drop = torch.from_numpy(gen.random(len(idx)) < r.uncond_prob)
        ids[drop] = empty
        ids, drop = ids.to(dev), drop.to(dev)
        noise = torch.randn_like(z0)
        t = draw_t(len(idx)).to(dev)
        zt = sched.add_noise(z0, noise, t)
        idx, ids, drop, noise, t, zt = idx[part], ids[part], drop[part], noise[part], t[part], zt[part]
        store.clear()
        # bf16 autocast: about 1.25x the steps per minute on a CPU with AVX512-BF16; the weights, the
        # optimiser and the losses stay float32
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bool(r.bf16)):
            pred = net(zt, t, ids)
        err = (pred.float() - noise).pow(2)
        w_obj = 1 + r.object_weight * torch.from_numpy(objmask[idx]).to(dev).float().div(255).unsqueeze(1)
        per = (err * w_obj).mean((1, 2, 3)) / w_obj.mean((1, 2, 3))
        w = torch.clamp(snr[t], max=r.min_snr) / snr[t]  # min-SNR-gamma weighting (epsilon)
        loss = (per * w).mean()
        g_val = 0.0
        if ground:
            bits = torch.from_numpy(g_bits[idx].astype(np.int64)).to(dev)
            norm = None
            if world > 1:  # divide by the whole batch's grounded tokens, as one process would
                norm = shared([float(grounded_tokens(bits, ~drop))], world)[0] / world
            loss_g = grounding_loss(store, bits, torch.from_numpy(g_masks[idx]).to(dev).float().div(255), ~drop, norm)
            loss = loss + r.ground_weight * loss_g
            g_val = loss_g.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        step += 1
        if rank == 0:
            decay = min(r.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, live_params, 1 - decay)
        loss_v, mse, g_val, elapsed = shared(
            [loss.item() / world, err.mean().item() / world, g_val / world, time.time() - t0 if rank == 0 else 0.0],
            world,
        )
        if ground:
            run_g = g_val if run_g is None else 0.98 * run_g + 0.02 * g_val
        bar.update(1)
        run_loss = mse if run_loss is None else 0.98 * run_loss + 0.02 * mse
        if step % 10 == 0:
            bar.set_postfix(mse=f"{run_loss:.4f}", ground=f"{run_g or 0:.3f}", lr=f"{lr:.1e}")
            log(phase="unet", step=step, loss=loss_v, mse=mse, mse_avg=run_loss, ground_avg=run_g, lr=lr, elapsed=elapsed)
        if rank == 0 and time.time() - last_ck > r.ckpt_minutes * 60:
            checkpoint()
            last_ck = time.time()
    bar.close()
    if rank > 0:
        return "done"
    elapsed = time.time() - t0
    checkpoint()
    log(phase="unet_done", step=step, mse_avg=run_loss, ground_avg=run_g, elapsed=elapsed, workers=world)
    say(f"unet: {step} steps, {elapsed / 60:.1f} min, mse {run_loss}")
    info = {"steps": step, "minutes": elapsed / 60, "mse_avg": run_loss, "ground_avg": run_g, "bf16": r.bf16}
    info.update(device=str(dev), workers=world, unet_params=n_u, text_params=n_t)
    mark(out, "unet", info)
    return "done"
