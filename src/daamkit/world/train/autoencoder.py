"""The autoencoder: phase ``vae`` trains an ``AutoencoderKL`` (or takes a trained one whole), phase
``latents`` encodes the training set once, and phase ``decoder`` fine-tunes the decoder alone on
those cached latents. Both training phases run the one loop of :func:`fit`."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .common import done, lr_at, mark, psnr, save
from .recipe import Recipe, flag, vae_config

VAE_ARCHITECTURE = {  # AutoencoderKL config key -> the option that sets it
    "block_out_channels": "vae_channels",
    "layers_per_block": "vae_layers",
    "norm_num_groups": "vae_groups",
    "latent_channels": "latent_channels",
}


def vae_source(value: str) -> Path:
    """The ``AutoencoderKL`` folder that ``vae_from`` names: ``shipped`` (the shipped model's), a
    pipeline folder (its ``vae/``) or a ``vae`` folder itself."""
    if value == "shipped":
        from daamkit.world import default_model_path

        path = default_model_path() / "vae"
    else:
        path = Path(value)
        if (path / "vae" / "config.json").exists():
            path = path / "vae"
    cfg = path / "config.json"
    if not cfg.exists() or json.loads(cfg.read_text()).get("_class_name") != "AutoencoderKL":
        raise ValueError(
            f"--vae-from {value}: no AutoencoderKL there (looked for {cfg}); give `shipped`, a diffusers "
            "pipeline folder with a vae/ subfolder, or an AutoencoderKL folder"
        )
    return path


def check_vae_source(r: Recipe) -> None:
    """Refuse a ``vae_from`` autoencoder whose shape differs from the recipe's VAE options, naming the
    options that would match it."""
    if not r.vae_from:
        return
    path = vae_source(r.vae_from)
    theirs = json.loads((path / "config.json").read_text())
    ours = vae_config(r)
    wrong = [k for k in VAE_ARCHITECTURE if list(np.atleast_1d(theirs.get(k))) != list(np.atleast_1d(ours[k]))]
    if wrong:
        def flag_value(k):
            v = theirs.get(k)
            return ",".join(map(str, v)) if isinstance(v, list) else v

        fix = " ".join(f"{flag(VAE_ARCHITECTURE[k])} {flag_value(k)}" for k in wrong)
        raise ValueError(f"--vae-from {r.vae_from}: its autoencoder differs from this run's in {', '.join(wrong)}; pass {fix}")


def images(batch: np.ndarray):
    """uint8 (B, 64, 64, 3) images as a float tensor (B, 3, 64, 64) in [-1, 1]."""
    import torch

    return torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 127.5 - 1


def sample_latents(lmean: np.ndarray, lstd: np.ndarray, idx):
    """A posterior sample of the cached latents ``idx`` (float32 tensor, shaped like the cache)."""
    import torch

    mean = torch.from_numpy(lmean[idx]).float()
    return mean + torch.from_numpy(lstd[idx]).float() * torch.randn_like(mean)


def _sobel(x):
    import torch.nn.functional as F

    dx = x[..., :, 1:] - x[..., :, :-1]
    dy = x[..., 1:, :] - x[..., :-1, :]
    return F.pad(dx, (0, 1)), F.pad(dy, (0, 0, 0, 1))


def reconstruction_loss(rec, x, edge_weight: float):
    """L1 + MSE + ``edge_weight`` x the L1 distance of the image gradients, and those terms."""
    import torch.nn.functional as F

    l1 = (rec - x).abs().mean()
    mse = F.mse_loss(rec, x)
    gx, gy = _sobel(rec)
    tx, ty = _sobel(x)
    edge = (gx - tx).abs().mean() + (gy - ty).abs().mean()
    return l1 + mse + edge_weight * edge, {"l1": l1, "mse": mse, "edge": edge}


@dataclass
class Fit:
    """What differs between the two autoencoder phases; :func:`fit` runs either."""

    phase: str  # "vae" or "decoder": the log's phase, the checkpoint ckpt_<phase>.pt, the marker
    vae: object  # the AutoencoderKL being trained
    params: list  # its trained parameters
    lr: float
    warm: float  # share of the phase spent warming up the learning rate
    steps: int
    minutes: float
    seed: int  # of the index stream; the step reached is added on resume
    batch_loss: Callable  # training-set indices -> (loss, {term: tensor})
    reconstruct: Callable  # (a, b) -> the validation reconstructions of scenes a..b
    keep_rng: bool  # whether the checkpoint carries torch's RNG state (the vae phase's does)


def fit(f: Fit, r: Recipe, out: Path, log, imgs: np.ndarray) -> None:
    """Train ``f.vae``'s ``f.params`` on the training images ``imgs`` but the last ``n_val`` for
    ``f.steps`` steps or ``f.minutes``, whichever ends first (resuming from its checkpoint), then
    score PSNR on those ``n_val`` and mark the phase done."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    n = len(imgs)
    n_val = min(256, n // 10)
    opt = torch.optim.AdamW(f.params, lr=f.lr, weight_decay=0.0)
    ck = out / f"ckpt_{f.phase}.pt"
    step, elapsed = 0, 0.0
    if ck.exists():
        st = torch.load(ck, weights_only=False)
        f.vae.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step, elapsed = st["step"], st["elapsed"]
        if f.keep_rng:
            torch.set_rng_state(st["rng"])
        print(f"resumed {f.phase} at step {step} ({elapsed / 60:.1f} min)", file=sys.stderr)
    budget = f.minutes * 60
    gen = np.random.default_rng(f.seed + step)
    t0 = time.time() - elapsed
    last_ck = time.time()

    def checkpoint():
        state = {"model": f.vae.state_dict(), "opt": opt.state_dict(), "step": step, "elapsed": time.time() - t0}
        if f.keep_rng:
            state["rng"] = torch.get_rng_state()
        save(state, ck)

    bar = tqdm(total=f.steps, initial=step, desc=f.phase, mininterval=10, file=sys.stderr)
    f.vae.train()
    while step < f.steps and time.time() - t0 < budget:
        frac = max(step / f.steps, (time.time() - t0) / budget)
        lr = lr_at(frac, f.lr, f.warm)
        for g in opt.param_groups:
            g["lr"] = lr
        loss, terms = f.batch_loss(gen.integers(0, n - n_val, r.vae_batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(f.params, 1.0)
        opt.step()
        step += 1
        bar.update(1)
        if step % 20 == 0:
            p = psnr(terms["mse"].item())
            bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{p:.1f}")
            values = {k: v.item() for k, v in terms.items()}
            log(phase=f.phase, step=step, loss=loss.item(), **values, psnr=p, lr=lr, elapsed=time.time() - t0)
        if time.time() - last_ck > r.ckpt_minutes * 60:
            checkpoint()
            last_ck = time.time()
    bar.close()
    checkpoint()
    f.vae.eval()
    with torch.no_grad():
        val = torch.cat([f.reconstruct(a, min(a + 64, n)) for a in range(n - n_val, n, 64)])
    vpsnr = psnr(F.mse_loss(val.clamp(-1, 1), images(imgs[n - n_val :])).item())
    elapsed = time.time() - t0
    log(phase=f"{f.phase}_done", step=step, val_psnr=vpsnr, elapsed=elapsed)
    print(f"{f.phase}: {step} steps, {elapsed / 60:.1f} min, val PSNR {vpsnr:.2f} dB", file=sys.stderr)
    mark(out, f.phase, {"steps": step, "minutes": elapsed / 60, "val_psnr": vpsnr})


def phase_vae(r: Recipe, out: Path, log) -> None:
    import torch
    from diffusers import AutoencoderKL

    if r.vae_from:  # a trained autoencoder, taken whole (encoder and decoder) instead of trained
        src = vae_source(r.vae_from)
        vae = AutoencoderKL.from_pretrained(str(src), torch_dtype=torch.float32)
        save({"model": vae.state_dict(), "from": str(src)}, out / "ckpt_vae.pt")
        sf = float(vae.config.scaling_factor)
        log(phase="vae_done", source=str(src), scaling_factor=sf)
        mark(out, "vae", {"from": str(src), "scaling_factor": sf})
        return
    imgs = np.load(out / "data.npz")["images"]
    torch.manual_seed(r.seed)
    vae = AutoencoderKL(**vae_config(r)).to(memory_format=torch.channels_last)
    with torch.no_grad():  # start with a nearly deterministic posterior (std ~ 0.02): much faster start
        vae.quant_conv.weight[r.latent_channels :] *= 0.1
        vae.quant_conv.bias[r.latent_channels :] = -8.0

    def batch_loss(idx):
        x = images(imgs[idx]).contiguous(memory_format=torch.channels_last)
        post = vae.encode(x).latent_dist
        loss, terms = reconstruction_loss(vae.decode(post.sample()).sample, x, r.vae_edge)
        terms["kl"] = post.kl().mean() / (r.latent_channels * 16 * 16)
        return loss + r.vae_kl * terms["kl"], terms

    def reconstruct(a, b):
        return vae(images(imgs[a:b]), sample_posterior=False).sample

    f = Fit("vae", vae, list(vae.parameters()), r.vae_lr, 0.03, r.vae_steps, r.vae_minutes, r.seed,
            batch_loss, reconstruct, keep_rng=True)
    fit(f, r, out, log, imgs)


def load_vae(r: Recipe, out: Path, decoder: bool = True):
    """The trained VAE; with ``decoder``, the fine-tuned decoder (phase ``decoder``) if there is one."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**vae_config(r))
    vae.load_state_dict(torch.load(out / "ckpt_vae.pt", weights_only=False)["model"])
    if decoder and (out / "ckpt_decoder.pt").exists():
        vae.load_state_dict(torch.load(out / "ckpt_decoder.pt", weights_only=False)["model"])
    return vae.eval()


def phase_decoder(r: Recipe, out: Path, log) -> None:
    """Fine-tune the VAE decoder alone on the cached latents (the encoder, hence the latents the UNet
    learns, stay fixed), so it can run after, or alongside, the UNet phase."""
    import torch

    if r.decoder_minutes <= 0:
        mark(out, "decoder", {"skipped": True})
        return
    if r.vae_from:  # its decoder is part of the autoencoder taken whole
        mark(out, "decoder", {"skipped": True, "from": r.vae_from})
        return
    while not done(out, "latents"):  # when started alongside the main run
        time.sleep(10)
    vae = load_vae(r, out).to(memory_format=torch.channels_last)
    vae.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for q in params:
        q.requires_grad_(True)
    imgs = np.load(out / "data.npz")["images"]
    lat = np.load(out / "latents.npz")
    lmean, lstd = lat["mean"], lat["std"]

    def batch_loss(idx):
        z = sample_latents(lmean, lstd, idx)
        rec = vae.decode(z.contiguous(memory_format=torch.channels_last)).sample
        return reconstruction_loss(rec, images(imgs[idx]), r.vae_edge)

    def reconstruct(a, b):
        return vae.decode(torch.from_numpy(lmean[a:b]).float()).sample

    f = Fit("decoder", vae, params, r.decoder_lr, 0.02, r.decoder_steps, r.decoder_minutes, r.seed + 2000,
            batch_loss, reconstruct, keep_rng=False)
    fit(f, r, out, log, imgs)


def phase_latents(r: Recipe, out: Path, log) -> None:
    import torch
    from tqdm import tqdm

    dev = torch.device(r.device)
    vae = load_vae(r, out, decoder=False).to(dev)
    imgs = np.load(out / "data.npz")["images"]
    mean = np.empty((len(imgs), r.latent_channels, 16, 16), np.float16)
    std = np.empty((len(imgs), r.latent_channels, 16, 16), np.float16)
    t0 = time.time()
    with torch.no_grad():
        for i in tqdm(range(0, len(imgs), 256), desc="encode", mininterval=10, file=sys.stderr):
            d = vae.encode(images(imgs[i : i + 256]).to(dev)).latent_dist
            mean[i : i + 256] = d.mean.cpu().numpy()
            std[i : i + 256] = d.std.cpu().numpy()
    if r.vae_from:  # keep the autoencoder's own scale: a model trained on it then pairs with it as is
        scale = json.loads((out / "vae.done").read_text())["scaling_factor"]
    else:
        rng = np.random.default_rng(0)
        sub = rng.choice(len(imgs), min(4096, len(imgs)), replace=False)
        z = mean[sub].astype(np.float32) + std[sub].astype(np.float32) * rng.standard_normal(mean[sub].shape)
        scale = float(1.0 / z.std())
    np.savez(out / "latents.npz", mean=mean, std=std)
    log(phase="latents", scaling_factor=scale, seconds=time.time() - t0)
    mark(out, "latents", {"scaling_factor": scale, "seconds": time.time() - t0})
