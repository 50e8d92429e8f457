"""Train the shapes-world latent diffusion model from scratch on CPU.

Phases (each resumable; a finished phase is skipped on ``--resume``):

1. ``data``    render a fixed training set of scenes (train split only: no held-out pair or template;
               in ``--data-workers`` processes) and tokenise its captions with the real CLIP BPE ids;
2. ``vae``     train an ``AutoencoderKL`` (64 px RGB -> 4 x 16 x 16 latents, ``--latent-channels``), or
               take a trained one whole with ``--vae-from`` (then phase ``decoder`` is skipped too);
3. ``latents`` encode the training set once (posterior mean and std cached);
4. ``unet``    train ``UNet2DConditionModel`` + ``CLIPTextModel`` (0 layers by default: embeddings
               only) jointly on the cached latents (epsilon prediction, min-SNR weighting, 10% caption
               dropout for classifier-free guidance, a cross-attention grounding loss, an EMA of the
               weights); on a CPU split over ``--unet-workers`` single-threaded data-parallel processes
               (by default one per thread), which give more steps per minute than threads do;
5. ``decoder`` fine-tune the VAE decoder alone on the cached latents; by default (2+ threads) in a
               second process alongside ``unet``, which lends it one thread until it ends;
6. ``export``  write a standard diffusers ``StableDiffusionPipeline`` folder (fp16 safetensors) and
               generate a sample grid through ``StableDiffusionPipeline.from_pretrained``.

Everything goes under ``--out`` (checkpoints, ``log.jsonl``, samples); the pipeline folder is
``<out>/model`` unless ``--export-to`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

PHASES = ("data", "vae", "latents", "unet", "decoder", "export")


# ------------------------------------------------------------------------------------------ configs


def vae_config(args) -> dict:
    ch = tuple(int(c) for c in args.vae_channels.split(","))
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(ch),
        up_block_types=("UpDecoderBlock2D",) * len(ch),
        block_out_channels=ch,
        layers_per_block=args.vae_layers,
        act_fn="silu",
        latent_channels=args.latent_channels,
        # few channels per group would make GroupNorm an instance norm that erases each image's
        # absolute colour levels (the first recipe decoded green as brown): use few, wide groups
        norm_num_groups=args.vae_groups,
        sample_size=64,
        scaling_factor=1.0,
    )


def unet_config(args) -> dict:
    ch = tuple(int(c) for c in args.unet_channels.split(","))
    n = len(ch)
    down = ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"]
    up = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1)
    return dict(
        sample_size=16,
        in_channels=args.latent_channels,
        out_channels=args.latent_channels,
        down_block_types=tuple(down),
        up_block_types=tuple(up),
        block_out_channels=ch,
        layers_per_block=args.unet_layers,
        cross_attention_dim=args.text_width,
        attention_head_dim=args.heads,  # diffusers' legacy name: this is the number of heads
        norm_num_groups=args.unet_groups,
        # "scale_shift": the timestep scales and shifts each ResNet's normalised features (AdaGN, as in
        # Dhariwal & Nichol's guided diffusion) instead of being added to them
        resnet_time_scale_shift=args.unet_time_norm,
    )


def text_config(args) -> dict:
    return dict(
        vocab_size=49408,
        hidden_size=args.text_width,
        intermediate_size=args.text_width * 4,
        num_hidden_layers=args.text_layers,
        num_attention_heads=max(1, args.text_width // 32),
        max_position_embeddings=77,
        projection_dim=args.text_width,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


SCHEDULER_KW = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
)


# ------------------------------------------------------------------------------------------ helpers


class Logger:
    def __init__(self, out: Path):
        self.path = out / "log.jsonl"

    def __call__(self, **rec):
        rec["time"] = round(time.time(), 1)
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")


def _save(obj, path: Path):
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _done(out: Path, phase: str) -> bool:
    return (out / f"{phase}.done").exists()


def _mark(out: Path, phase: str, info: dict | None = None):
    (out / f"{phase}.done").write_text(json.dumps(info or {}))


def _tokenizer(out: Path):
    from transformers import CLIPTokenizer

    from daamkit.testing.tokenizers import clip_tokenizer

    tdir = out / "tokenizer"
    if not (tdir / "vocab.json").exists():
        clip_tokenizer(tdir)
    return CLIPTokenizer.from_pretrained(str(tdir))


def _lr_at(frac: float, base: float, warm_frac: float, final_ratio: float = 0.1) -> float:
    if frac < warm_frac:
        return base * max(frac / warm_frac, 0.02)
    p = min(1.0, (frac - warm_frac) / max(1e-8, 1 - warm_frac))
    return base * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


# ------------------------------------------------------------------------------------------ phases


def data_workers(args) -> int:
    """Processes that render the training scenes (phase ``data`` and the grounding targets):
    ``--data-workers``, or by default one per ``--threads``."""
    return max(1, args.data_workers if args.data_workers is not None else args.threads)


def _chunks(n: int, workers: int) -> list[tuple[int, int]]:
    size = max(1, min(2000, -(-n // workers)))
    return [(a, min(a + size, n)) for a in range(0, n, size)]


def _map_chunks(func, jobs: list, workers: int, desc: str) -> list:
    """``func`` over ``jobs`` in order, in ``workers`` spawned processes (spawn, not fork: this process
    may already hold torch's thread pools). Each scene comes from its own seed, so the result does not
    depend on the worker count."""
    from tqdm import tqdm

    def bar(it):
        return tqdm(it, total=len(jobs), desc=desc, unit="chunk", mininterval=5, file=sys.stderr)

    if workers <= 1 or len(jobs) <= 1:
        return [func(j) for j in bar(jobs)]
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(min(workers, len(jobs))) as pool:
        return list(bar(pool.imap(func, jobs)))


def _cell_coverage(mask: np.ndarray) -> np.ndarray:
    """A 64 x 64 boolean mask as the share of each 4 x 4 latent cell it covers, in 0..255."""
    return (mask.reshape(16, 4, 16, 4).mean((1, 3)) * 255).astype(np.uint8)


def _render_chunk(job: tuple[int, int, int, str]):
    """Render scenes ``a..b`` once for everything the training reads from them: the images, their
    object coverage, the token ids, and the grounding targets (each object's mask and, per token,
    which objects its word names)."""
    from daamkit.world.scenes import make_scene

    a, b, data_seed, out = job
    tok = _tokenizer(Path(out))
    imgs = np.empty((b - a, 64, 64, 3), np.uint8)
    objmask = np.empty((b - a, 16, 16), np.uint8)
    caps, scenes = [], []
    for k, i in enumerate(range(a, b)):
        s = make_scene(data_seed + i, "train")
        imgs[k] = np.asarray(s.image)
        m = s.masks.any(0) if len(s.masks) else np.zeros((64, 64), bool)
        objmask[k] = _cell_coverage(m)
        caps.append(s.caption)
        scenes.append(s)
    ids = _token_ids(tok, caps)
    return imgs, objmask, caps, ids, _object_targets(scenes, tok, ids)


def _token_ids(tok, captions: list[str]) -> np.ndarray:
    return tok(
        captions, padding="max_length", max_length=77, truncation=True, return_tensors="np"
    ).input_ids.astype(np.int32)


def phase_data(args, out: Path, log):
    tok = _tokenizer(out)  # written once, before the workers read it
    n = args.dataset_size
    workers = data_workers(args)
    jobs = [(a, b, args.data_seed, str(out)) for a, b in _chunks(n, workers)]
    t0 = time.time()
    parts = _map_chunks(_render_chunk, jobs, workers, "render")
    imgs = np.concatenate([q[0] for q in parts])
    objmask = np.concatenate([q[1] for q in parts])
    caps = [c for q in parts for c in q[2]]
    ids = np.concatenate([q[3] for q in parts])
    print(f"data: {n} scenes rendered in {time.time() - t0:.0f} s", file=sys.stderr)
    np.savez(out / "data.npz", images=imgs, objmask=objmask, input_ids=ids)
    (out / "captions.txt").write_text("\n".join(caps) + "\n")
    np.save(out / "empty_ids.npy", _token_ids(tok, [""])[0])
    # the grounding targets come from the very scenes just rendered, so they are written here rather
    # than by rendering all of them a second time when the UNet phase first needs them
    _save_ground_targets(out, [q[4] for q in parts], time.time() - t0)
    log(phase="data", n=n)
    _mark(out, "data", {"n": n})


def _sobel(x):
    import torch.nn.functional as F

    dx = x[..., :, 1:] - x[..., :, :-1]
    dy = x[..., 1:, :] - x[..., :-1, :]
    return F.pad(dx, (0, 1)), F.pad(dy, (0, 0, 0, 1))


VAE_ARCHITECTURE = {  # AutoencoderKL config key -> the option that sets it
    "block_out_channels": "vae_channels",
    "layers_per_block": "vae_layers",
    "norm_num_groups": "vae_groups",
    "latent_channels": "latent_channels",
}


def vae_source(value: str) -> Path:
    """The ``AutoencoderKL`` folder that ``--vae-from VALUE`` names: ``shipped`` (the shipped model's),
    a pipeline folder (its ``vae/``) or a ``vae`` folder itself."""
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


def check_vae_source(args) -> None:
    """Refuse a ``--vae-from`` autoencoder whose shape differs from this run's VAE options, naming the
    options that would match it."""
    if not args.vae_from:
        return
    path = vae_source(args.vae_from)
    theirs = json.loads((path / "config.json").read_text())
    ours = vae_config(args)
    wrong = [k for k in VAE_ARCHITECTURE if list(np.atleast_1d(theirs.get(k))) != list(np.atleast_1d(ours[k]))]
    if wrong:
        def flag_value(k):
            v = theirs.get(k)
            return ",".join(map(str, v)) if isinstance(v, list) else v

        fix = " ".join(f"{_flag(VAE_ARCHITECTURE[k])} {flag_value(k)}" for k in wrong)
        raise ValueError(f"--vae-from {args.vae_from}: its autoencoder differs from this run's in {', '.join(wrong)}; pass {fix}")


def phase_vae(args, out: Path, log):
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL
    from tqdm import tqdm

    if args.vae_from:  # a trained autoencoder, taken whole (encoder and decoder) instead of trained
        src = vae_source(args.vae_from)
        vae = AutoencoderKL.from_pretrained(str(src), torch_dtype=torch.float32)
        _save({"model": vae.state_dict(), "from": str(src)}, out / "ckpt_vae.pt")
        sf = float(vae.config.scaling_factor)
        log(phase="vae_done", source=str(src), scaling_factor=sf)
        _mark(out, "vae", {"from": str(src), "scaling_factor": sf})
        return
    data = np.load(out / "data.npz")
    imgs = data["images"]
    n = len(imgs)
    n_val = min(256, n // 10)
    torch.manual_seed(args.seed)
    vae = AutoencoderKL(**vae_config(args)).to(memory_format=torch.channels_last)
    with torch.no_grad():  # start with a nearly deterministic posterior (std ~ 0.02): much faster start
        vae.quant_conv.weight[args.latent_channels :] *= 0.1
        vae.quant_conv.bias[args.latent_channels :] = -8.0
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    ck = out / "ckpt_vae.pt"
    step, elapsed = 0, 0.0
    if ck.exists():
        st = torch.load(ck, weights_only=False)
        vae.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step, elapsed = st["step"], st["elapsed"]
        torch.set_rng_state(st["rng"])
        print(f"resumed vae at step {step} ({elapsed / 60:.1f} min)", file=sys.stderr)
    budget = args.vae_minutes * 60
    gen = np.random.default_rng(args.seed + step)
    val = torch.from_numpy(imgs[n - n_val :]).permute(0, 3, 1, 2).float() / 127.5 - 1
    t0 = time.time() - elapsed
    last_ck = time.time()
    bar = tqdm(total=args.vae_steps, initial=step, desc="vae", mininterval=10, file=sys.stderr)
    vae.train()
    while step < args.vae_steps and time.time() - t0 < budget:
        frac = max(step / args.vae_steps, (time.time() - t0) / budget)
        lr = _lr_at(frac, args.vae_lr, 0.03)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = gen.integers(0, n - n_val, args.vae_batch)
        x = torch.from_numpy(imgs[idx]).permute(0, 3, 1, 2).float() / 127.5 - 1
        x = x.contiguous(memory_format=torch.channels_last)
        post = vae.encode(x).latent_dist
        z = post.sample()
        rec = vae.decode(z).sample
        l1 = (rec - x).abs().mean()
        mse = F.mse_loss(rec, x)
        gx, gy = _sobel(rec)
        tx, ty = _sobel(x)
        edge = (gx - tx).abs().mean() + (gy - ty).abs().mean()
        kl = post.kl().mean() / (args.latent_channels * 16 * 16)
        loss = l1 + mse + args.vae_edge * edge + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        step += 1
        bar.update(1)
        if step % 20 == 0:
            psnr = -10 * math.log10(max(mse.item() / 4, 1e-10))
            bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{psnr:.1f}")
            log(
                phase="vae",
                step=step,
                loss=loss.item(),
                l1=l1.item(),
                mse=mse.item(),
                edge=edge.item(),
                kl=kl.item(),
                psnr=psnr,
                lr=lr,
                elapsed=time.time() - t0,
            )
        if time.time() - last_ck > args.ckpt_minutes * 60:
            _save(
                {
                    "model": vae.state_dict(),
                    "opt": opt.state_dict(),
                    "step": step,
                    "elapsed": time.time() - t0,
                    "rng": torch.get_rng_state(),
                },
                ck,
            )
            last_ck = time.time()
    bar.close()
    vae.eval()
    with torch.no_grad():
        rec = torch.cat([vae(val[i : i + 64], sample_posterior=False).sample for i in range(0, n_val, 64)])
        vmse = F.mse_loss(rec.clamp(-1, 1), val).item()
    vpsnr = -10 * math.log10(max(vmse / 4, 1e-10))
    elapsed = time.time() - t0
    _save(
        {
            "model": vae.state_dict(),
            "opt": opt.state_dict(),
            "step": step,
            "elapsed": elapsed,
            "rng": torch.get_rng_state(),
        },
        ck,
    )
    log(phase="vae_done", step=step, val_psnr=vpsnr, elapsed=elapsed)
    print(f"vae: {step} steps, {elapsed / 60:.1f} min, val PSNR {vpsnr:.2f} dB", file=sys.stderr)
    _mark(out, "vae", {"steps": step, "minutes": elapsed / 60, "val_psnr": vpsnr})


def _load_vae(args, out: Path, decoder: bool = True):
    """The trained VAE; with ``decoder``, the fine-tuned decoder (phase ``decoder``) if there is one."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(**vae_config(args))
    vae.load_state_dict(torch.load(out / "ckpt_vae.pt", weights_only=False)["model"])
    if decoder and (out / "ckpt_decoder.pt").exists():
        vae.load_state_dict(torch.load(out / "ckpt_decoder.pt", weights_only=False)["model"])
    return vae.eval()


def phase_decoder(args, out: Path, log):
    """Fine-tune the VAE decoder alone on the cached latents (the encoder, hence the latents the UNet
    learns, stay fixed), so it can run after, or alongside, the UNet phase."""
    import torch
    import torch.nn.functional as F
    from tqdm import tqdm

    if args.decoder_minutes <= 0:
        _mark(out, "decoder", {"skipped": True})
        return
    if args.vae_from:  # its decoder is part of the autoencoder taken whole
        _mark(out, "decoder", {"skipped": True, "from": args.vae_from})
        return
    while not _done(out, "latents"):  # when started alongside the main run
        time.sleep(10)
    vae = _load_vae(args, out).to(memory_format=torch.channels_last)
    vae.requires_grad_(False)
    params = list(vae.decoder.parameters()) + list(vae.post_quant_conv.parameters())
    for q in params:
        q.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=args.decoder_lr, weight_decay=0.0)
    imgs = np.load(out / "data.npz")["images"]
    lat = np.load(out / "latents.npz")
    lmean, lstd = lat["mean"], lat["std"]
    n = len(imgs)
    n_val = min(256, n // 10)
    ck = out / "ckpt_decoder.pt"
    step, elapsed = 0, 0.0
    if ck.exists():
        st = torch.load(ck, weights_only=False)
        vae.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        step, elapsed = st["step"], st["elapsed"]
    budget = args.decoder_minutes * 60
    gen = np.random.default_rng(args.seed + 2000 + step)
    t0 = time.time() - elapsed
    last_ck = time.time()
    bar = tqdm(desc="decoder", initial=step, mininterval=10, file=sys.stderr)
    vae.decoder.train()

    def save():
        _save(
            {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step, "elapsed": time.time() - t0},
            ck,
        )

    while step < args.decoder_steps and time.time() - t0 < budget:
        frac = max(step / args.decoder_steps, (time.time() - t0) / budget)
        lr = _lr_at(frac, args.decoder_lr, 0.02)
        for g in opt.param_groups:
            g["lr"] = lr
        idx = gen.integers(0, n - n_val, args.vae_batch)
        z = _sample_latents(lmean, lstd, idx)
        x = torch.from_numpy(imgs[idx]).permute(0, 3, 1, 2).float() / 127.5 - 1
        rec = vae.decode(z.contiguous(memory_format=torch.channels_last)).sample
        l1 = (rec - x).abs().mean()
        mse = F.mse_loss(rec, x)
        gx, gy = _sobel(rec)
        tx, ty = _sobel(x)
        edge = (gx - tx).abs().mean() + (gy - ty).abs().mean()
        loss = l1 + mse + args.vae_edge * edge
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        bar.update(1)
        if step % 20 == 0:
            psnr = -10 * math.log10(max(mse.item() / 4, 1e-10))
            bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{psnr:.1f}")
            log(
                phase="decoder",
                step=step,
                loss=loss.item(),
                l1=l1.item(),
                mse=mse.item(),
                psnr=psnr,
                lr=lr,
                elapsed=time.time() - t0,
            )
        if time.time() - last_ck > args.ckpt_minutes * 60:
            save()
            last_ck = time.time()
    bar.close()
    save()
    vae.eval()
    val = torch.from_numpy(imgs[n - n_val :]).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        rec = torch.cat(
            [
                vae.decode(torch.from_numpy(lmean[n - n_val + i : n - n_val + i + 64]).float()).sample
                for i in range(0, n_val, 64)
            ]
        )
    vpsnr = -10 * math.log10(max(F.mse_loss(rec.clamp(-1, 1), val).item() / 4, 1e-10))
    log(phase="decoder_done", step=step, val_psnr=vpsnr, elapsed=time.time() - t0)
    print(f"decoder: {step} steps, val PSNR {vpsnr:.2f} dB", file=sys.stderr)
    _mark(out, "decoder", {"steps": step, "minutes": (time.time() - t0) / 60, "val_psnr": vpsnr})


def phase_latents(args, out: Path, log):
    import torch
    from tqdm import tqdm

    dev = torch.device(args.device)
    vae = _load_vae(args, out, decoder=False).to(dev)
    imgs = np.load(out / "data.npz")["images"]
    mean = np.empty((len(imgs), args.latent_channels, 16, 16), np.float16)
    std = np.empty((len(imgs), args.latent_channels, 16, 16), np.float16)
    t0 = time.time()
    with torch.no_grad():
        for i in tqdm(range(0, len(imgs), 256), desc="encode", mininterval=10, file=sys.stderr):
            x = torch.from_numpy(imgs[i : i + 256]).to(dev).permute(0, 3, 1, 2).float() / 127.5 - 1
            d = vae.encode(x).latent_dist
            mean[i : i + 256] = d.mean.cpu().numpy()
            std[i : i + 256] = d.std.cpu().numpy()
    if args.vae_from:  # keep the autoencoder's own scale: a model trained on it then pairs with it as is
        scale = json.loads((out / "vae.done").read_text())["scaling_factor"]
    else:
        rng = np.random.default_rng(0)
        sub = rng.choice(len(imgs), min(4096, len(imgs)), replace=False)
        z = mean[sub].astype(np.float32) + std[sub].astype(np.float32) * rng.standard_normal(mean[sub].shape)
        scale = float(1.0 / z.std())
    np.savez(out / "latents.npz", mean=mean, std=std)
    log(phase="latents", scaling_factor=scale, seconds=time.time() - t0)
    _mark(out, "latents", {"scaling_factor": scale, "seconds": time.time() - t0})


def _sample_latents(lmean: np.ndarray, lstd: np.ndarray, idx):
    """A posterior sample of the cached latents ``idx`` (float32 tensor, shaped like the cache)."""
    import torch

    mean = torch.from_numpy(lmean[idx]).float()
    return mean + torch.from_numpy(lstd[idx]).float() * torch.randn_like(mean)


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


def _build_unet_and_text(args):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(**unet_config(args))
    te = CLIPTextModel(CLIPTextConfig(**text_config(args)))
    if args.text_identity_init:
        _identity_init(te)
    return unet, te


def _identity_init(te) -> None:
    """Zero the last projection of each encoder layer's attention and MLP branch, so that a fresh
    encoder with layers computes exactly what the 0-layer one does (embeddings + final LayerNorm).

    A jointly trained layer merged the six shape nouns within a few hundred steps when it started
    random (run 2 in the model card); starting from the 0-layer encoder, which keeps them apart, the
    layer only mixes in a neighbour's word where the denoising loss pays for it."""
    import torch
    from transformers.models.clip.modeling_clip import CLIPEncoderLayer

    with torch.no_grad():
        for layer in (m for m in te.modules() if isinstance(m, CLIPEncoderLayer)):
            for lin in (layer.self_attn.out_proj, layer.mlp.fc2):
                lin.weight.zero_()
                lin.bias.zero_()


def _own_args(args) -> dict:
    """This script's options only: `daamkit world train` parses into a namespace that also holds the
    CLI's dispatch function, which cannot be pickled for the decoder process."""
    known = _default_args()
    return {k: v for k, v in vars(args).items() if k in known}


def _decoder_process(ns: dict, out: str) -> None:
    """Entry point of the second process that runs the ``decoder`` phase beside the UNet phase."""
    import torch

    _exit_with_parent()
    torch.set_num_threads(1)
    out_p = Path(out)
    with open(out_p / "decoder.log", "a") as err:
        sys.stderr = err  # two tqdm bars on one terminal garble each other
        phase_decoder(argparse.Namespace(**ns), out_p, Logger(out_p))


class _DecoderAlongside:
    """The ``decoder`` phase in a second process while the UNet phase trains.

    The decoder fine-tune only needs the cached latents and never touches the UNet, so the two can
    share the machine: on 2 cores the UNet gives one thread to the decoder while it runs and takes it
    back when it ends. Sequentially the decoder's 30 minutes would push a run past about 2 hours."""

    def __init__(self, args, out: Path):
        import multiprocessing as mp

        # spawn, not fork: a forked child would inherit torch's thread pools and OpenMP state
        self.proc = mp.get_context("spawn").Process(
            target=_decoder_process, args=(_own_args(args), str(out)), name="daamkit-decoder"
        )
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


def unet_workers(args) -> int:
    """Data-parallel processes of the UNet phase: ``--unet-workers``, or by default one per ``--threads``
    on a CPU, reduced to the largest count that divides ``--batch``; always 1 on another device."""
    if args.device != "cpu":
        return 1
    want = args.unet_workers if args.unet_workers is not None else args.threads
    want = max(1, min(want, args.threads))
    return max(w for w in range(1, want + 1) if args.batch % w == 0)


def phase_unet(args, out: Path, log, alongside: _DecoderAlongside | None = None):
    """The UNet phase. On a CPU with more than one worker (:func:`unet_workers`) the batch is split over
    that many single-threaded processes that average their gradients (``torch.distributed``, gloo):
    the UNet's small convolutions scale badly over threads (2 threads: 1.2-1.3x one; 2 processes of one
    thread: about 1.7x), and each worker computes its share of the very batch a single process would
    draw, so the recipe is the same at any worker count. While the decoder runs alongside, the UNet
    trains in this process on the threads the decoder leaves; when it ends, the workers take over from
    a checkpoint."""
    workers = unet_workers(args)
    if workers == 1 or alongside is not None:
        if _train_unet(args, out, log, alongside=alongside, hand_over=workers > 1) != "handed over":
            return
    _unet_data_parallel(args, out, workers)


def _unet_data_parallel(args, out: Path, workers: int) -> None:
    import torch.multiprocessing as mp

    if _needs_ground_targets(args):
        _ground_targets(args, out)  # once, here: workers that each built them raced on one file
    rendezvous = out / f".unet_workers_{os.getpid()}"  # gloo's file rendezvous: must not exist yet
    rendezvous.unlink(missing_ok=True)
    print(f"unet: {workers} data-parallel workers", file=sys.stderr)
    try:  # spawn: a forked child would inherit torch's thread pools; a failed worker stops the others
        mp.spawn(_unet_worker, args=(workers, _own_args(args), str(out), str(rendezvous), time.time()), nprocs=workers)
    finally:
        rendezvous.unlink(missing_ok=True)


def _unet_worker(rank: int, world: int, ns: dict, out: str, rendezvous: str, spawned_at: float) -> None:
    import torch
    import torch.distributed as dist

    args = argparse.Namespace(**ns)
    _exit_with_parent()
    torch.set_num_threads(max(1, args.threads // world))
    dist.init_process_group("gloo", init_method=Path(rendezvous).resolve().as_uri(), rank=rank, world_size=world)
    try:
        out_p = Path(out)
        log = Logger(out_p) if rank == 0 else (lambda **rec: None)
        _train_unet(args, out_p, log, rank=rank, world=world, spawned_at=spawned_at)
    finally:
        dist.destroy_process_group()


def _exit_with_parent(every: float = 2.0) -> None:
    """End this worker when the process that spawned it is gone (killed, say): orphaned workers would
    otherwise go on training and writing the run's checkpoints."""
    import threading

    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(every)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="daamkit-parent-watch").start()


def _denoiser(unet, te):
    """UNet and text encoder as one module, so that one DistributedDataParallel wrapper reduces the
    gradients of both."""
    import torch

    class Denoiser(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet, self.te = unet, te

        def forward(self, zt, t, ids, pos=None):
            return self.unet(zt, t, encoder_hidden_states=self.te(ids, position_ids=pos)[0]).sample

    return Denoiser()


def _shared(values: list[float], world: int) -> list[float]:
    """Sum ``values`` over the workers (each passes its own; a worker passes 0 where only rank 0's
    value counts)."""
    if world == 1:
        return values
    import torch
    import torch.distributed as dist

    buf = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(buf)
    return buf.tolist()


def unet_optimizer(unet, te, args, fused: bool):
    """The UNet phase's AdamW over the UNet (group 0) and the text encoder (group 1, ``--text-lr-mult``).

    ``fused``: one kernel per tensor instead of a dozen small ops. PyTorch's default on a CPU is the
    per-tensor loop, about 8% of a one-thread worker's step (benchmarks/optimizer_step.py, which times
    both through this function)."""
    import torch

    params = [
        {"params": list(unet.parameters()), "lr": args.lr},
        {"params": list(te.parameters()), "lr": args.lr * args.text_lr_mult},
    ]
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99), fused=fused)


def _train_unet(
    args,
    out: Path,
    log,
    alongside: _DecoderAlongside | None = None,
    hand_over: bool = False,
    rank: int = 0,
    world: int = 1,
    spawned_at: float | None = None,
) -> str:
    """Train (or go on training) the UNet and text encoder; returns "done", or "handed over" when
    ``hand_over`` is set and the decoder ``alongside`` has ended (the state is then in the checkpoint,
    for the data-parallel workers). ``rank``/``world``: this worker among ``world`` in an initialised
    process group; rank 0 alone logs, keeps the EMA and writes checkpoints."""
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
    ground = args.ground_weight > 0
    if ground or args.small_object_power:
        gt = np.load(_ground_targets(args, out))
        g_bits, g_masks = gt["bits"], gt["masks"]
    obj_masks = g_masks if args.small_object_power else None  # per object, for object_loss_weights

    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    unet, te = _build_unet_and_text(args)
    unet, te = unet.to(dev), te.to(dev)
    ema_u, ema_t = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(te).requires_grad_(False)
    store: list = []
    if ground:  # after the EMA copy: the exported weights never carry the training processor
        for name, mod in unet.named_modules():
            if name.endswith("attn2"):
                mod.set_processor(_CaptureCrossAttention(store, detach_text=args.ground_detach_text))
    opt = unet_optimizer(unet, te, args, fused=dev.type in ("cpu", "cuda"))
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
    net = _denoiser(unet, te)
    if world > 1:
        # one clock for all: the learning rate and the stop follow rank 0's elapsed time
        elapsed = _shared([elapsed if rank == 0 else 0.0], world)[0]
        net = torch.nn.parallel.DistributedDataParallel(net)
    n_u = sum(p.numel() for p in unet.parameters())
    n_t = sum(p.numel() for p in te.parameters())
    say(f"unet {n_u / 1e6:.2f}M params, text encoder {n_t / 1e6:.2f}M params")
    budget = args.unet_minutes * 60
    say(f"bf16 autocast {'on' if args.bf16 else 'off'}")
    gen = np.random.default_rng(args.seed + 1000 + step)
    pick = _scene_sampler(args, out, n)
    draw_t = _timestep_sampler(args)
    part = slice(rank * args.batch // world, (rank + 1) * args.batch // world)
    t0 = time.time() - elapsed
    last_ck = time.time()
    # one foreach call per step instead of a lerp per tensor (the per-op overhead dominates on a GPU)
    ema_params = [e for m_e in (ema_u, ema_t) for e in m_e.parameters()]
    live_params = [p for m in (unet, te) for p in m.parameters()]

    def save():
        _save(
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

    bar = tqdm(
        total=args.unet_steps, initial=step, desc="unet", mininterval=10, file=sys.stderr, disable=rank > 0
    )
    unet.train()
    te.train()
    run_loss = run_g = None
    if alongside is not None and dev.type == "cpu":
        torch.set_num_threads(max(1, args.threads - 1))
    while step < args.unet_steps and elapsed < budget:
        if alongside is not None and not alongside.running():
            alongside = None  # run() still holds it, to join it and check its exit code
            if hand_over:
                save()
                log(phase="unet_handover", step=step, workers=unet_workers(args))
                bar.close()
                return "handed over"
            torch.set_num_threads(args.threads)  # the decoder is done: take its core back
            log(phase="unet_threads", step=step, threads=args.threads)
        frac = max(step / args.unet_steps, elapsed / budget)
        lr = _lr_at(frac, args.lr, 0.04, args.final_lr_ratio)
        opt.param_groups[0]["lr"] = lr
        opt.param_groups[1]["lr"] = lr * args.text_lr_mult
        # every worker draws the whole batch and keeps its part: the same random stream at any worker count
        idx = pick(gen, args.batch)
        z0 = _sample_latents(lmean, lstd, idx).to(dev) * scale
        ids = torch.from_numpy(ids_all[idx])
        drop = torch.from_numpy(gen.random(len(idx)) < args.uncond_prob)
        ids[drop] = empty
        ids, drop = ids.to(dev), drop.to(dev)
        noise = torch.randn_like(z0)
        t = draw_t(len(idx)).to(dev)
        zt = sched.add_noise(z0, noise, t)
        shift = args.position_shift if frac >= args.position_shift_from else 0
        pos = _shifted_positions(gen, len(idx), ids.shape[1], shift)
        idx, ids, drop, noise, t, zt = idx[part], ids[part], drop[part], noise[part], t[part], zt[part]
        pos = None if pos is None else pos[part].to(dev)
        store.clear()
        # bf16 autocast: about 1.25x the steps per minute on a CPU with AVX512-BF16; the weights, the
        # optimiser and the losses stay float32
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=args.bf16):
            pred = net(zt, t, ids, pos)
        err = (pred.float() - noise).pow(2)
        if obj_masks is None:
            w_obj = 1 + args.object_weight * torch.from_numpy(objmask[idx]).to(dev).float().div(255).unsqueeze(1)
        else:
            w_obj = object_loss_weights(
                torch.from_numpy(obj_masks[idx]).to(dev).float().div(255), args.object_weight, args.small_object_power
            )
        per = (err * w_obj).mean((1, 2, 3)) / w_obj.mean((1, 2, 3))
        w = torch.clamp(snr[t], max=args.min_snr) / snr[t]  # min-SNR-gamma weighting (epsilon)
        loss = (per * w).mean()
        g_val = 0.0
        if ground:
            bits = torch.from_numpy(g_bits[idx].astype(np.int64)).to(dev)
            norm = None
            if world > 1:  # divide by the whole batch's grounded tokens, as one process would
                norm = _shared([float(grounded_tokens(bits, ~drop))], world)[0] / world
            loss_g = grounding_loss(store, bits, torch.from_numpy(g_masks[idx]).to(dev).float().div(255), ~drop, norm)
            loss = loss + args.ground_weight * loss_g
            g_val = loss_g.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        step += 1
        if rank == 0:
            decay = min(args.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, live_params, 1 - decay)
        loss_v, mse, g_val, elapsed = _shared(
            [loss.item() / world, err.mean().item() / world, g_val / world, time.time() - t0 if rank == 0 else 0.0],
            world,
        )
        if ground:
            run_g = g_val if run_g is None else 0.98 * run_g + 0.02 * g_val
        bar.update(1)
        run_loss = mse if run_loss is None else 0.98 * run_loss + 0.02 * mse
        if step % 10 == 0:
            bar.set_postfix(mse=f"{run_loss:.4f}", ground=f"{run_g or 0:.3f}", lr=f"{lr:.1e}")
            log(
                phase="unet",
                step=step,
                loss=loss_v,
                mse=mse,
                mse_avg=run_loss,
                ground_avg=run_g,
                lr=lr,
                elapsed=elapsed,
            )
        if rank == 0 and time.time() - last_ck > args.ckpt_minutes * 60:
            save()
            last_ck = time.time()
    bar.close()
    if rank > 0:
        return "done"
    elapsed = time.time() - t0
    save()
    log(phase="unet_done", step=step, mse_avg=run_loss, ground_avg=run_g, elapsed=elapsed, workers=world)
    say(f"unet: {step} steps, {elapsed / 60:.1f} min, mse {run_loss}")
    _mark(
        out,
        "unet",
        {
            "steps": step,
            "minutes": elapsed / 60,
            "mse_avg": run_loss,
            "ground_avg": run_g,
            "bf16": args.bf16,
            "device": str(dev),
            "workers": world,
            "unet_params": n_u,
            "text_params": n_t,
        },
    )
    return "done"


SMALL_OBJECT_REF_CELLS = 16.0  # a medium object (radius ~9 px) covers about 16 cells of the 16 x 16 grid
SMALL_OBJECT_MAX_BOOST = 4.0


def object_loss_weights(masks, object_weight: float, power: float = 0.0):
    """Per-cell weights (B, 1, 16, 16) of the UNet's noise loss from per-object coverage masks
    ``masks`` (B, O, 16, 16) in [0, 1]: 1 on the background plus ``object_weight`` on objects.

    ``power`` > 0 raises the extra weight of each object smaller than a medium one (16 cells) by
    (16 cells / its area) ** power, capped at 4x, so a small object, whose shape rests on a handful of
    latent cells, is not outweighed by a large one (power 1: each object up to medium size gets the
    same total extra weight as a medium one). Larger objects keep the plain weight: they are drawn
    with the right shape already. Where objects overlap a cell takes the largest weight. ``power`` 0 weighs all object cells alike, as the shipped model was
    trained (union of the objects' coverage, since coverage never exceeds one cell in total)."""
    import torch

    if power == 0:
        return 1 + object_weight * masks.sum(1, keepdim=True).clamp(max=1)
    area = masks.flatten(2).sum(-1).clamp_min(1e-6)  # (B, O) in cells; empty slots get no weight
    boost = (SMALL_OBJECT_REF_CELLS / area).pow(power).clamp(1.0, SMALL_OBJECT_MAX_BOOST)
    per = masks * boost[..., None, None]
    return 1 + object_weight * torch.amax(per, dim=1, keepdim=True)


class _CaptureCrossAttention:
    """Attention processor for ``attn2`` (text-image) that computes the attention explicitly and keeps
    the probabilities (with gradients) for the grounding loss. Same output as diffusers' AttnProcessor.
    Used only while training: the exported pipeline has diffusers' default processors."""

    def __init__(self, store: list, detach_text: bool = False):
        self.store = store
        self.detach_text = detach_text

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        import torch

        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        v = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        probs = attn.get_attention_scores(q, k, None)  # (batch * heads, pixels, tokens)
        if self.detach_text:
            # The grounding loss then trains the UNet's queries and keys, not the keys' text. It asks
            # every noun for the same kind of key ("this object"), which an encoder layer can give by
            # making the nouns alike (run 2 in the model card). Its gradient still reaches the text
            # through the earlier layers' outputs, a small share (about 13% in a random tiny model).
            k_g = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states.detach()))
            self.store.append((attn.heads, attn.get_attention_scores(q, k_g, None)))
        else:
            self.store.append((attn.heads, probs))
        out = attn.batch_to_head_dim(torch.bmm(probs, v))
        return attn.to_out[1](attn.to_out[0](out))


GROUNDED_ROLES = ("noun", "color", "size")
MAX_OBJECTS = 3


def _token_object_bits(scene, tok, ids: np.ndarray) -> np.ndarray | None:
    """(77,) uint8: bit o set where the token belongs to a noun, colour or size word of object o.
    Words come from :func:`daamkit.tokens.align`, the alignment DAAM itself reads maps through; None
    if its words do not match the scene's caption words (then the sample is not grounded)."""
    from daamkit.tokens import align

    try:
        al = align(tok, ids.tolist(), prompt=scene.caption)
    except ValueError:
        return None
    seen = [w for w in al.words if not w.is_punctuation]
    if [w.text for w in seen] != [w.text for w in scene.words]:
        return None
    bits = np.zeros(len(ids), np.uint8)
    for w, cw in zip(seen, scene.words, strict=True):
        if cw.role in GROUNDED_ROLES and cw.objects:
            bits[list(w.positions)] = sum(1 << o for o in cw.objects)
    return bits


def _object_count_weights(args) -> tuple[float, float, float] | None:
    """``--object-count-weights`` as (w1, w2, w3), or None for uniform sampling of scenes."""
    try:
        w = tuple(float(x) for x in str(args.object_count_weights).split(","))
    except ValueError:
        w = ()
    if len(w) != 3 or min(w) < 0 or max(w) <= 0:
        raise ValueError(
            f"--object-count-weights {args.object_count_weights!r}: give three non-negative weights for "
            "scenes of 1, 2 and 3 objects, not all zero, e.g. 1,2,3"
        )
    return None if w[0] == w[1] == w[2] else w


def _timestep_sampler(args):
    """``--timestep-focus`` as a function drawing a batch's timesteps. Without the option it is the
    plain uniform draw, so runs without it keep their random stream."""
    import torch

    spec = str(args.timestep_focus or "").strip()
    if not spec:
        return lambda b: torch.randint(0, 1000, (b,))
    try:
        lo_s, hi_s, share_s = spec.split(",")
        lo, hi, share = int(lo_s), int(hi_s), float(share_s)
    except ValueError:
        lo, hi, share = 0, 0, -1.0
    if not (0 <= lo < hi <= 1000 and 0 <= share <= 1):
        raise ValueError(
            f"--timestep-focus {spec!r}: give LO,HI,SHARE with 0 <= LO < HI <= 1000 and 0 <= SHARE <= 1, "
            "e.g. 100,450,0.5"
        )

    def draw(b: int) -> torch.Tensor:
        t = torch.randint(0, 1000, (b,))
        focus = torch.rand(b) < share
        return torch.where(focus, torch.randint(lo, hi, (b,)), t)

    return draw


def _shifted_positions(gen: np.random.Generator, k: int, n_pos: int, shift: int) -> torch.Tensor | None:
    """Position ids for a batch of k captions, each moved along by its own random 0..shift places
    (clamped at the last position), or None for the plain 0..n_pos-1.

    The 0-layer text encoder tells words apart only by token + position embedding, so it learns a
    colour's binding at the absolute places where training captions put it; a held-out sentence that
    puts the colour later then loses it. Shifting breaks that tie to absolute places, but from scratch
    it also broke the noun-to-object binding those places carry (run 15 in the model card), hence off
    by default. Nothing is drawn when shift is 0, so runs without the option keep their random stream."""
    import torch

    if shift <= 0:
        return None
    sh = torch.from_numpy(gen.integers(0, shift + 1, k))
    return (torch.arange(n_pos)[None] + sh[:, None]).clamp(max=n_pos - 1)


def _needs_ground_targets(args) -> bool:
    """Whether the UNet phase reads ``ground.npz``: the grounding loss, the small-object weights and
    the object-count sampler all take their object masks from it. One rule, so that the data-parallel
    launcher builds the file before its workers need it."""
    return args.ground_weight > 0 or bool(args.small_object_power) or _object_count_weights(args) is not None


def _scene_sampler(args, out: Path, n: int):
    """Draws the training scenes of a batch: uniformly, or weighted by how many objects each scene
    has (the multi-object scenes are where shapes go wrong). Uniform keeps the original random
    stream, so runs without the option are unchanged."""
    w = _object_count_weights(args)
    if w is None:
        return lambda gen, k: gen.integers(0, n, k)
    masks = np.load(_ground_targets(args, out))["masks"]  # (n, 3, 16, 16): one slot per object
    count = (masks.reshape(len(masks), masks.shape[1], -1).max(axis=2) > 0).sum(axis=1).clip(1, 3)
    p = np.asarray(w)[count - 1]
    p = p / p.sum()
    return lambda gen, k: gen.choice(n, size=k, p=p)


def _object_targets(scenes: list, tok, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """The grounding targets of ``scenes`` (token ids ``ids``): each object's mask at the latent grid
    (coverage in 0..255), per token the bits of the objects its word names, and how many captions
    could not be aligned (their bits stay 0: not grounded)."""
    masks = np.zeros((len(scenes), MAX_OBJECTS, 16, 16), np.uint8)
    bits = np.zeros((len(scenes), ids.shape[1]), np.uint8)
    skipped = 0
    for k, s in enumerate(scenes):
        for o, m in enumerate(s.masks[:MAX_OBJECTS]):
            masks[k, o] = _cell_coverage(m)
        bb = _token_object_bits(s, tok, ids[k])
        if bb is None:
            skipped += 1
        else:
            bits[k] = bb
    return masks, bits, skipped


def _ground_chunk(job: tuple[int, int, int, np.ndarray, str]):
    from daamkit.world.scenes import make_scene

    a, b, data_seed, ids, out = job
    scenes = [make_scene(data_seed + i, "train") for i in range(a, b)]
    return _object_targets(scenes, _tokenizer(Path(out)), ids)


def _save_ground_targets(out: Path, parts: list, seconds: float) -> Path:
    path = out / "ground.npz"
    masks = np.concatenate([q[0] for q in parts])
    bits = np.concatenate([q[1] for q in parts])
    skipped = sum(q[2] for q in parts)
    # written whole, then renamed: a reader never sees a half-written file
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, masks=masks, bits=bits)
    os.replace(tmp, path)
    print(f"grounding targets: {len(bits) - skipped} of {len(bits)} captions aligned ({seconds:.0f} s)", file=sys.stderr)
    return path


def _ground_targets(args, out: Path) -> Path:
    """``ground.npz``, what the grounding loss needs. The data phase writes it; this renders the
    scenes again only for a data folder made before it did (or with the file removed)."""
    path = out / "ground.npz"
    if path.exists():
        return path
    ids = np.load(out / "data.npz")["input_ids"]
    _tokenizer(out)  # written once, before the workers read it
    workers = data_workers(args)
    jobs = [(a, b, args.data_seed, ids[a:b], str(out)) for a, b in _chunks(len(ids), workers)]
    t0 = time.time()
    parts = _map_chunks(_ground_chunk, jobs, workers, "grounding targets")
    return _save_ground_targets(out, parts, time.time() - t0)


def _scored_tokens(bits, keep, n_objects: int = MAX_OBJECTS):
    """(B, 77) mask of the tokens the grounding loss scores: tokens bound to one of the first
    ``n_objects`` objects (noun, colour and size words) in kept captions."""
    return ((bits & ((1 << n_objects) - 1)) > 0) & keep.unsqueeze(1)


def grounded_tokens(bits, keep) -> int:
    """How many tokens of a batch the grounding loss scores (noun, colour and size tokens of kept
    captions)."""
    return int(_scored_tokens(bits, keep).sum())


def grounding_loss(store: list, bits, masks, keep, norm: float | None = None):
    """Cross-attention grounding loss (in the spirit of TokenCompose, Wang et al. 2024).

    For every noun, colour and size token of a kept sample, in every cross-attention layer (mean over
    heads), two terms: the share of the token's attention mass that falls outside its object(s), and
    one minus the soft Dice overlap of its max-normalised map with the object mask. The first alone
    lets a map collapse onto one pixel of its object; the second asks it to cover the object, which is
    what a thresholded DAAM map is scored on.

    ``bits`` (B, 77) int64 object bits per token, ``masks`` (B, O, 16, 16) in [0, 1], ``keep`` (B,).
    ``norm``: divide each layer's summed terms by this instead of by the batch's own number of scored
    tokens (a data-parallel worker passes the whole batch's count over the number of workers)."""
    import torch
    import torch.nn.functional as F

    obj = (bits.unsqueeze(-1) >> torch.arange(masks.shape[1], device=bits.device)) & 1  # (B, 77, O)
    sel = _scored_tokens(bits, keep, masks.shape[1])  # (B, 77)
    if not sel.any():
        return torch.zeros((), device=bits.device)
    obj = obj.float()
    terms = []
    for heads, probs in store:
        n = probs.shape[1]
        res = int(round(math.sqrt(n)))
        p = probs.float().reshape(len(bits), heads, n, -1).mean(1).transpose(1, 2)  # (B, tokens, pixels)
        m = masks if res == masks.shape[-1] else F.adaptive_avg_pool2d(masks, res)
        target = (obj @ m.flatten(2)).clamp(max=1)  # (B, 77, pixels)
        a, t = p[sel], target[sel]
        inside = (a * t).sum(-1) / a.sum(-1).clamp_min(1e-8)
        ahat = a / a.amax(-1, keepdim=True).detach().clamp_min(1e-8)
        dice = 2 * (ahat * t).sum(-1) / (ahat.sum(-1) + t.sum(-1)).clamp_min(1e-8)
        scored = (1 - inside) + (1 - dice)
        terms.append((scored.mean() if norm is None else scored.sum() / norm) / 2)
    return torch.stack(terms).mean()


def _recorded_args(args, out: Path) -> tuple[dict, list]:
    """The options the run recorded in ``args.json`` (this call's for a run without one), and the
    record's ``changed_on_resume`` history."""
    path = out / "args.json"
    recorded = json.loads(path.read_text()) if path.exists() else vars(args)
    # The record is filtered too: runs started before args.json held only these options recorded the
    # CLI's dispatch function as a string.
    known = _default_args()
    return {k: v for k, v in recorded.items() if k in known}, recorded.get("changed_on_resume", [])


def export(args, out: Path, dest: Path, log=None, use_ema: bool = True) -> Path:
    """Write the diffusers pipeline folder (fp16 safetensors) from the checkpoints under ``out``."""
    import shutil

    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    scale = json.loads((out / "latents.done").read_text())["scaling_factor"]
    vae = _load_vae(args, out)
    vae.register_to_config(scaling_factor=scale)
    unet, te = _build_unet_and_text(args)
    st = torch.load(out / "ckpt_unet.pt", weights_only=False)
    unet.load_state_dict(st["ema_unet" if use_ema else "unet"])
    te.load_state_dict(st["ema_text" if use_ema else "text"])
    sched = DPMSolverMultistepScheduler(**SCHEDULER_KW, steps_offset=1)
    tok = _tokenizer(out)
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=te,
        tokenizer=tok,
        unet=unet,
        scheduler=sched,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16)
    # the arguments the run was trained with, not those of this (possibly later) export call
    config, history = _recorded_args(args, out)
    tmp = dest.with_name(dest.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    # transformers loads a text encoder in its config's dtype when none is asked for, while diffusers
    # loads its models in float32: record float32 so a plain from_pretrained() gives one dtype (the
    # weights stay fp16 on disk and are upcast on load).
    te_cfg = tmp / "text_encoder" / "config.json"
    cfg = json.loads(te_cfg.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in cfg:
            cfg[key] = "float32"
    te_cfg.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    info = {
        "unet_steps": st["step"],
        "unet_minutes": st["elapsed"] / 60,
        "ema": use_ema,
        "config": config,
    }
    if history:
        info["changed_on_resume"] = history
    (tmp / "daamkit_world.json").write_text(json.dumps(info, indent=1, default=str))
    if dest.exists():
        shutil.rmtree(dest)
    os.replace(tmp, dest)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    if log:
        log(phase="export", dest=str(dest), bytes=size)
    print(f"exported {dest} ({size / 1e6:.1f} MB)", file=sys.stderr)
    return dest


def sample_grid(
    model_dir: Path, path: Path, prompts: list[str], steps: int = 20, guidance: float = 5.0, seed: int = 0
):
    import torch
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    pipe = StableDiffusionPipeline.from_pretrained(
        str(model_dir), local_files_only=True, torch_dtype=torch.float32
    )
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(seed)
    images = pipe(
        prompts, num_inference_steps=steps, guidance_scale=guidance, generator=g, height=64, width=64
    ).images
    cols = min(8, len(images))
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (64 * cols, 64 * rows), "white")
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * 64, (i // cols) * 64))
    grid.resize((128 * cols, 128 * rows), Image.Resampling.NEAREST).save(path)
    return images


SAMPLE_PROMPTS = [
    "a red circle",
    "a blue square",
    "a green triangle",
    "a yellow star",
    "a purple heart",
    "an orange cross",
    "a red circle above a blue star",
    "a green square to the left of a yellow heart",
    "two purple triangles",
    "a small blue heart on a grey background",
    "a yellow circle and a red cross",
    "a large green cross on a striped background",
    "a red heart",  # held-out pair
    "a purple circle and a blue triangle",  # held-out pairs
    "there is an orange star below a green circle",  # held-out template
    "a red star, a blue circle and a yellow square",
]


def phase_export(args, out: Path, log):
    dest = Path(args.export_to) if args.export_to else out / "model"
    export(args, out, dest, log)
    if args.sample_steps > 0:
        t0 = time.time()
        sample_grid(dest, out / "samples.png", SAMPLE_PROMPTS, steps=args.sample_steps)
        log(phase="samples", seconds=time.time() - t0)
    _mark(out, "export", {"dest": str(dest)})


# ------------------------------------------------------------------------------------------- CLI


# Where the parser notes which options were given on the command line (see _NotedStore).
GIVEN = "given_options"


def _note_given(namespace, dest: str) -> None:
    setattr(namespace, GIVEN, sorted({*getattr(namespace, GIVEN, ()), dest}))


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


class _NotedStore(argparse.Action):
    """argparse's plain store, which also notes the option under ``args.given_options``: on --resume
    an option given again replaces the recorded one, while one left out keeps it, even where the
    recorded value is not today's default (a default can change between a run's start and its
    resume, as --object-count-weights did)."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, values)
        _note_given(namespace, self.dest)


class _NotedBool(argparse.BooleanOptionalAction):
    def __call__(self, parser, namespace, values, option_string=None):
        super().__call__(parser, namespace, values, option_string)
        _note_given(namespace, self.dest)


def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.register("action", None, _NotedStore)
    p.register("action", "store", _NotedStore)
    p.add_argument("--out", default="runs/world_train", help="working folder (checkpoints, logs, samples)")
    p.add_argument("--export-to", default=None, help="pipeline folder to write (default OUT/model)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue from the checkpoints in --out with the options recorded in its args.json; an "
        "option given again replaces the recorded one from then on (noted in args.json under "
        "changed_on_resume), except the architecture's, which cannot change. "
        + ", ".join(_flag(k) for k in SESSION_OPTIONS if k != "resume")
        + " are this call's own",
    )
    p.add_argument("--only", choices=PHASES, default=None, help="run a single phase (with --resume)")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2)), help="torch CPU threads")
    p.add_argument(
        "--unet-workers",
        type=int,
        default=None,
        help="data-parallel processes of the UNet phase on a CPU, each with --threads / N threads (they "
        "compute parts of the same batch, so the recipe does not change). Default: one per thread, as "
        "many as divide --batch; about 1.4x the steps per minute of one process on 2 cores",
    )
    p.add_argument(
        "--data-workers",
        type=int,
        default=None,
        help="processes that render the training scenes and their grounding targets (the same data at "
        "any count). Default: one per --threads",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--device",
        default="cpu",
        help="torch device of the latents and UNet phases (e.g. cuda); the recipe's budgets and timings "
        "are for 2 CPU cores",
    )
    p.add_argument("--data-seed", type=int, default=0, help="first scene seed of the training set")
    p.add_argument("--dataset-size", type=int, default=40000)
    p.add_argument("--ckpt-minutes", type=float, default=4.0)
    p.add_argument(
        "--sample-steps", type=int, default=20, help="steps of the sample grid after export (0: none)"
    )
    # VAE
    p.add_argument(
        "--latent-channels",
        type=int,
        default=4,
        help="channels of the 16 x 16 latent (more: a sharper autoencoder at little UNet cost)",
    )
    p.add_argument(
        "--vae-from",
        default=None,
        metavar="MODEL",
        help="take a trained autoencoder (encoder, decoder and scaling factor) instead of training one: "
        "`shipped` (the shipped model's), a diffusers pipeline folder or an AutoencoderKL folder. The "
        "vae and decoder phases are then skipped; a UNet trained so pairs with that autoencoder as is. "
        "With no decoder beside it the UNet has every thread from its first step, so in the same "
        "--unet-minutes it makes more steps than a default run: to compare step for step, cap them with "
        "--unet-steps",
    )
    p.add_argument("--vae-channels", default="16,32,64")
    p.add_argument("--vae-layers", type=int, default=1)
    p.add_argument("--vae-groups", type=int, default=4, help="GroupNorm groups in the VAE")
    p.add_argument("--vae-steps", type=int, default=100000)
    p.add_argument("--vae-minutes", type=float, default=12.0)
    p.add_argument("--vae-batch", type=int, default=8)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-kl", type=float, default=3e-5, help="KL weight (per latent element)")
    p.add_argument("--vae-edge", type=float, default=1.0, help="weight of the image-gradient L1 term")
    p.add_argument(
        "--decoder-minutes",
        type=float,
        default=30.0,
        help="fine-tune the decoder alone on the cached latents (0: skip); see --decoder-alongside",
    )
    p.add_argument(
        "--decoder-alongside",
        action=_NotedBool,
        default=None,
        help="run the decoder phase in a second process while the UNet phase trains (the UNet lends it "
        "one of its --threads until it ends). Default: on with --threads 2 or more, or a non-CPU "
        "--device; that is how a complete run fits about 2 hours on 2 cores",
    )
    p.add_argument("--decoder-lr", type=float, default=5e-4)
    p.add_argument("--decoder-steps", type=int, default=1000000)
    # UNet + text encoder
    p.add_argument("--unet-channels", default="64,128,128")
    p.add_argument("--unet-layers", type=int, default=1)
    p.add_argument("--unet-groups", type=int, default=16, help="GroupNorm groups in the UNet")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument(
        "--unet-time-norm",
        choices=("default", "scale_shift"),
        default="default",
        help="how the timestep enters each UNet ResNet block: added to its features (default, as in "
        "Stable Diffusion) or as a scale and shift of its normalised features (scale_shift, AdaGN)",
    )
    p.add_argument("--text-width", type=int, default=64)
    p.add_argument(
        "--text-layers",
        type=int,
        default=0,
        help="CLIP encoder layers (0 = token + position embeddings only; a jointly trained layer merged "
        "the shape nouns, one started with --text-identity-init --ground-detach-text did not, see the "
        "model card)",
    )
    p.add_argument(
        "--text-identity-init",
        action=_NotedBool,
        default=False,
        help="start each text-encoder layer as the identity (its attention and MLP output projections "
        "zeroed), so that a fresh encoder with --text-layers N computes what the 0-layer one does and "
        "learns from there to let words see the words before them",
    )
    p.add_argument("--unet-steps", type=int, default=1000000)
    p.add_argument(
        "--unet-minutes",
        type=float,
        default=95.0,
        help="UNet phase time budget (the shipped model: 95, with bf16 autocast; the whole run then fits "
        "about 2 hours on 2 cores, see the model card)",
    )
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--final-lr-ratio", type=float, default=0.05)
    p.add_argument("--text-lr-mult", type=float, default=1.0)
    p.add_argument("--uncond-prob", type=float, default=0.1)
    p.add_argument("--min-snr", type=float, default=5.0)
    p.add_argument(
        "--object-weight",
        type=float,
        default=2.0,
        help="extra loss weight on latent cells covered by objects",
    )
    p.add_argument(
        "--small-object-power",
        type=float,
        default=0.0,
        help="raise the extra loss weight of objects smaller than 16 latent cells by (16 / area) ** "
        "POWER, capped at 4x (0: every object cell alike; 1: each small object as much total weight as a "
        "medium one). Tried once, as a fine-tune, it drew no more right shapes (see the model card)",
    )
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument(
        "--bf16",
        action=_NotedBool,
        default=None,
        help="bfloat16 autocast for the UNet phase's forward pass (weights and optimiser stay float32); "
        "about 1.25x the steps per minute on a CPU with AVX512-BF16 or AMX. Default: on where the "
        "device has native bfloat16 (see bf16_native), off elsewhere, where emulation would be slower",
    )
    p.add_argument(
        "--ground-weight",
        type=float,
        default=0.2,
        help="weight of the cross-attention grounding loss (0: plain denoising loss)",
    )
    p.add_argument(
        "--ground-detach-text",
        action=_NotedBool,
        default=False,
        help="keep the grounding loss off the text encoder's output: it scores attention maps computed "
        "a second time from detached text states, so it trains the UNet's queries and keys (and reaches the "
        "text only through earlier layers' outputs); the denoising loss still trains the encoder",
    )
    p.add_argument(
        "--object-count-weights",
        default="1,2,3",
        help="relative sampling weights of training scenes with 1, 2 and 3 objects (UNet phase); "
        "the default favours crowded scenes, where shapes go wrong; 1,1,1 draws uniformly",
    )
    p.add_argument(
        "--position-shift",
        type=int,
        default=0,
        help="move each training caption's text-encoder position ids along by a random 0..N places "
        "(UNet phase), so that a word is not bound to the absolute place where training captions put it "
        "(see the model card: a held-out sentence with its first colour word later loses that colour); "
        "0: plain positions. From scratch, 3 ruined the noun maps (run 15 in the model card): off by default",
    )
    p.add_argument(
        "--position-shift-from",
        type=float,
        default=0.0,
        help="fraction of the UNet phase (its step or time budget, whichever is further on) after which "
        "--position-shift applies; before it positions are plain. 0.9: the last tenth, as the 1 000-step "
        "fine-tune of run 12 that drew more right shapes (see the model card)",
    )
    p.add_argument(
        "--timestep-focus",
        default="100,450,0.5",
        help="LO,HI,SHARE: draw SHARE of each UNet batch's timesteps uniformly from [LO, HI) and the "
        "rest from [0, 1000). The default puts 67%% of the samples at the moderate noise levels where "
        "small objects' shapes are decided (see the model card); an empty value draws all from [0, 1000)",
    )
    return p


def _default_args() -> dict:
    """Every option of this script with its default value."""
    return vars(add_arguments(argparse.ArgumentParser()).parse_args([]))


ARCHITECTURE = (
    "latent_channels",
    "vae_channels",
    "vae_layers",
    "vae_groups",
    "unet_channels",
    "unet_layers",
    "unet_groups",
    "heads",
    "unet_time_norm",
    "text_width",
    "text_layers",
)


# Options about this call and this machine, not about the model being trained: --resume always takes
# them from the command line (or their defaults), never from the record.
SESSION_OPTIONS = (
    "out",
    "export_to",
    "resume",
    "only",
    "threads",
    "unet_workers",
    "data_workers",
    "device",
    "ckpt_minutes",
    "sample_steps",
    "decoder_alongside",
)

# What a run whose args.json predates an option did, where that is not the option's default today.
LEGACY_VALUES = {"object_count_weights": "1,1,1", "bf16": False, "timestep_focus": ""}


def _adopt_record(args, recorded: dict) -> dict:
    """On ``--resume`` a run goes on with the options it recorded in ``args.json``: each recipe option
    not given on the command line is set from the record. One given again and different from the
    record is a change, returned as ``{option: [recorded, now]}``, except for the architecture's:
    checkpoints only load into the shapes they were trained with, so that is an error, raised before
    anything changes."""
    given = set(getattr(args, GIVEN, ()))
    adopt, changes = {}, {}
    for key, default in _default_args().items():
        if key in SESSION_OPTIONS:
            continue
        before = recorded.get(key, LEGACY_VALUES.get(key, default))
        now = getattr(args, key)
        if key not in given:
            adopt[key] = before
        elif now != before:
            if key in ARCHITECTURE:
                flag = _flag(key)
                raise ValueError(
                    f"{flag} {now} contradicts this run's args.json ({flag} {before}); "
                    "the architecture of a run cannot change on --resume: start a new --out instead"
                )
            changes[key] = [before, now]
    for key, value in adopt.items():
        setattr(args, key, value)
    return changes


def _write_record(path: Path, record: dict) -> None:
    # A new file, not a rewrite: runs share their first phases' files as hard links (the model card's
    # runs do), and a rewrite in place would change every linked run's record.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str))
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="daamkit world train", description=__doc__.split("\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    return run(args)


def run(args) -> int:
    """Run the phases for parsed ``args`` (from :func:`add_arguments`); returns an exit status."""
    import torch

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    try:
        _object_count_weights(args)
        _timestep_sampler(args)
        if not 0 <= args.position_shift <= 16:
            raise ValueError(f"--position-shift {args.position_shift}: give a number of places from 0 to 16, e.g. 3")
        if not 0 <= args.position_shift_from < 1:
            raise ValueError(
                f"--position-shift-from {args.position_shift_from}: give a fraction of the UNet phase from 0 "
                "(from the start) to below 1, e.g. 0.9"
            )
    except ValueError as e:  # before anything is written or trained
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.resume:
        print(f"{out} is not empty: pass --resume to continue it, or choose another --out", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    cfg_path = out / "args.json"
    recorded = json.loads(cfg_path.read_text()) if cfg_path.exists() else None
    changes = {}
    if recorded is not None:
        try:
            changes = _adopt_record(args, recorded)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        check_vae_source(args)
    except ValueError as e:
        if recorded is None and not any(out.iterdir()):
            out.rmdir()  # this call made it: leave nothing behind
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.bf16 is None:  # resolved before args.json is written, so the run records what it used
        args.bf16 = bf16_native(args.device)
    if recorded is None:
        _write_record(cfg_path, _own_args(args))
    elif changes:
        for key, (before, now) in changes.items():
            print(f"--resume: {_flag(key)} {before} -> {now}", file=sys.stderr)
        record = {**recorded, **{k: now for k, (_, now) in changes.items()}}
        record["changed_on_resume"] = [
            *recorded.get("changed_on_resume", []),
            {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "only": args.only, "options": changes},
        ]
        _write_record(cfg_path, record)
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
            if args.only and ph != args.only:
                continue
            if alongside is not None and ph == "decoder":
                alongside.wait()  # it ran beside the UNet and wrote decoder.done
                continue
            if _done(out, ph) and not args.only:
                continue
            print(f"== phase {ph}", file=sys.stderr)
            t1 = time.time()
            if ph == "unet" and not args.only and _decoder_alongside(args, out):
                print(f"== phase decoder runs alongside (log: {out / 'decoder.log'})", file=sys.stderr)
                alongside = _DecoderAlongside(args, out)
                phase_unet(args, out, log, alongside)
                torch.set_num_threads(args.threads)
            else:
                funcs[ph](args, out, log)
            print(f"== phase {ph} took {(time.time() - t1) / 60:.1f} min", file=sys.stderr)
    except BaseException:
        if alongside is not None:
            alongside.stop()
        raise
    log(phase="all_done", seconds=time.time() - t0)
    return 0


def _decoder_alongside(args, out: Path) -> bool:
    """Whether the decoder phase should run in a second process beside the UNet phase."""
    if args.decoder_alongside is not None:
        want = args.decoder_alongside
    else:  # by default when there is a core to spare for it, or the UNet trains on another device
        want = args.threads >= 2 or args.device != "cpu"
    return want and args.decoder_minutes > 0 and not args.vae_from and not _done(out, "decoder")


main_from_args = run  # for `daamkit world train` (the CLI parses with add_arguments)


if __name__ == "__main__":
    raise SystemExit(main())
