"""daamkit against a peer tool on one pipeline: cost of each against the untraced call, and whether their maps agree.

The peer is ``attention-map-diffusers`` 1.0.0 (``AttentionCapture``). What it does, read from its source:

* capture: it **replaces the attention processor** of every attention module of ``pipe.unet`` /
  ``pipe.transformer`` with its own re-implementation of that processor (``set_processor``; SD's
  ``AttnProcessor2_0``, SD3's ``JointAttnProcessor2_0``, Flux's ``FluxAttnProcessor``, Flux.2, Sana,
  Z-Image, PRX and some video processors; any other processor makes it refuse the whole pipeline), plus a
  forward pre-/post-hook on the denoiser that records the timestep and the latent grid. ``restore()``
  (on leaving the ``with`` block) puts the original processor objects back and removes the hooks.
* what it stores: in its default ``mode="fast"`` each attention call's full q and k (the joint [text,
  image] sequence for MM-DiTs) are kept, moved to ``offload`` (``"cpu"`` by default; on a CPU pipeline
  that is no copy: the call's own tensors stay alive), and ``compute()`` forms the maps after the
  generation; ``mode="exact"`` forms them inside the attention call. By default it keeps only the last
  timestep (``timesteps="last"``) and the head mean (``heads="mean"``); records are per layer and per
  timestep, with the whole CFG batch.
* which probabilities: ``softmax(q k^T * scale)`` over **every key the model attends to** (with the
  model's mask), then the text-key columns are kept, in fp32 and cast back to the query's dtype. On
  joint attention that is daamkit's ``probabilities="model"``; daamkit's default ``"text"`` softmaxes
  over the text keys only. On cross-attention (SD 1.5) all keys are text and the two are the same.
* layers: on Flux.1 it records image->text only in the double-stream blocks (the single-stream
  blocks' processor is called without ``encoder_hidden_states``, so it finds no text there); daamkit
  also reads the single-stream blocks.

The benchmark builds ONE pipeline (``overhead.MODELS``: random weights at full width, nothing
downloaded), warms up, then runs the arms interleaved in ABBA order at the same seed:

* ``untraced``: the pipeline alone.
* ``daamkit``: ``with trace(pipe, layers=COMMON, probabilities=P) as tc: pipe(...); tc.heat_maps(0)``.
* ``peer``: ``with AttentionCapture(pipe, relations="image->text", timesteps="all", heads="mean",
  mode=..., max_capture_bytes=None) as cap: pipe(...); cap.compute()``.

So that both do the same work and their maps can be compared, both capture **the same layers (COMMON:
the layers in which the peer recorded image->text in its warm-up call and daamkit traces), all steps,
the mean over all heads, the probabilities of ``--probabilities`` (default ``model``, the peer's)**.
``timesteps="all"`` (not the peer's default ``"last"``) because daamkit aggregates every step;
``max_capture_bytes=None`` lifts the peer's 8 GiB guard, which all steps of q/k can exceed.

Reported per tool, against the untraced calls of the same run: wall-time median ratio (and ratio of
mins), process CPU-time ratio, extra peak memory (the meters of ``overhead.py``: RSS on CPU,
``max_memory_allocated`` on CUDA) in MiB and as % of the untraced total peak, the tensors the tool
still holds after the call, the image difference, and whether the pipeline came back unchanged
(the same processor objects, no hooks left).

Agreement: the peer's records of image 0's conditional row, head-mean (B, 1, N, T) per (layer, step),
are turned into daamkit's aggregate exactly as DAAM defines it (each map reshaped to its layer's grid,
upsampled bicubically to the latent grid and clamped at 0 where it is not already on it, summed over
steps and layers, divided by the number of layers); each word's map is the mean over the token
positions daamkit's alignment gives that word. Pearson r per word between the two (mean, min) and
the largest difference relative to the map's peak, against daamkit with ``probabilities="model"``
and with ``"text"`` (one extra untimed daamkit call with the other setting).

The peer imports torchvision only to write PNGs (lazily, in ``save_attention_image``), so it is not
needed here and no import is stubbed.

    pip install --no-deps attention_map_diffusers-1.0.0-py3-none-any.whl ftfy   # see benchmarks/README.md
    python benchmarks/peers.py --model sd15 --size 256 --steps 3
    python benchmarks/peers.py --model flux --size 256 --steps 1 --flux-blocks 2,4
    python benchmarks/peers.py --model sd15 --size 64 --steps 1 --repeats 1 --warmup 0   # smoke test
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import (  # noqa: E402
    MODELS,
    CpuMeter,
    CudaMeter,
    MemSample,
    MiB,
    _fmt_table,
    _median,
    add_model_args,
    first_output,
    format_paired,
    paired_ratio,
    parse_size,
    tensor_bytes,
)

PEER = "attention-map-diffusers"
DENOISERS = ("unet", "transformer")


# ---- the pipeline's state: processors and hooks ------------------------------------------------
@dataclass
class PipeState:
    """The attention processors of the denoiser and the number of hooks on every model component."""

    processors: dict[str, tuple[torch.nn.Module, Any]]
    hooks: int

    @classmethod
    def read(cls, pipe) -> PipeState:
        processors: dict[str, tuple[torch.nn.Module, Any]] = {}
        hooks = 0
        for comp, model in pipe.components.items():
            if not isinstance(model, torch.nn.Module):
                continue
            for name, module in model.named_modules():
                hooks += len(module._forward_hooks) + len(module._forward_pre_hooks)
                proc = getattr(module, "processor", None) if comp in DENOISERS else None
                if proc is not None:
                    processors[f"{comp}.{name}"] = (module, proc)
        return cls(processors, hooks)

    def differences(self, pipe) -> list[str]:
        now = PipeState.read(pipe)
        out = [
            f"{name}: {type(now.processors[name][1]).__name__} instead of {type(proc).__name__}"
            for name, (_, proc) in self.processors.items()
            if name in now.processors and now.processors[name][1] is not proc
        ]
        if now.hooks != self.hooks:
            out.append(f"{now.hooks - self.hooks:+d} hooks")
        return out

    def put_back(self) -> None:
        for module, proc in self.processors.values():
            if getattr(module, "processor", None) is not proc:
                module.set_processor(proc)


# ---- one call of one arm -----------------------------------------------------------------------
@dataclass
class Call:
    arm: str
    seconds: float
    cpu_seconds: float
    post_seconds: float  # tc.heat_maps(0) / cap.compute(), inside ``seconds``
    mem: MemSample
    image: np.ndarray
    held_bytes: int = 0  # tensors the tool's object holds after the call
    left_changed: list[str] = field(default_factory=list)  # what the tool left on the pipeline
    result: Any = None  # daamkit: GlobalHeatMap; peer: [(layer, timestep, (N, T) cond-row map)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _call_kwargs(args, model, device: torch.device) -> dict[str, Any]:
    kwargs = model.kwargs(args)
    kwargs.update(
        num_inference_steps=args.steps,
        height=args.height,
        width=args.width,
        generator=torch.Generator(device="cpu").manual_seed(args.seed),
        output_type="latent" if model.video or args.latent else "np",
    )
    if model.video:
        kwargs["num_frames"] = args.frames
    return kwargs


def _peer_rows(maps: Any, keep: set[str] | None) -> list[tuple[str, float | None, torch.Tensor]]:
    """(layer, timestep, (N, T) head-mean map of image 0's conditional row) of each image->text (a
    video's: video->text, queries frame-major) record."""
    out = []
    for rec in maps.records:
        if rec.relation not in ("image->text", "video->text") or rec.data is None:
            continue
        name = rec.layer_id.split(".", 1)[1]  # "unet.down_blocks..." -> daamkit's module path
        if keep is not None and name not in keep:
            continue
        data = rec.data
        # one image per call: a batch of 2 is CFG's [negative, positive]
        row = 1 if data.shape[0] == 2 else 0
        out.append((name, rec.timestep, data[row, 0].detach().float().cpu().clone()))
    return out


def run_call(
    pipe, args, model, device: torch.device, arm: str, state: PipeState | None, opts: dict[str, Any]
) -> Call:
    """One call of ``arm``; ``state``: what the pipeline must look like afterwards (None: not checked)."""
    kwargs = _call_kwargs(args, model, device)
    meter = (
        CudaMeter(device)
        if device.type == "cuda"
        else CpuMeter(args.interval_ms / 1000, trim=not args.no_trim)
    )
    post = 0.0
    held = 0
    result: Any = None
    with meter:
        _sync(device)
        c0 = time.process_time()
        t0 = time.perf_counter()
        if arm == "untraced":
            out = pipe(prompt=args.prompt, **kwargs)
        elif arm.startswith("daamkit"):
            from daamkit import trace

            with trace(pipe, layers=opts["layers"], probabilities=opts["probabilities"]) as tc:
                out = pipe(prompt=args.prompt, **kwargs)
                _sync(device)
                t1 = time.perf_counter()
                result = tc.heat_maps(0)
                _ = result.words
                post = time.perf_counter() - t1
        else:
            from attention_map_diffusers import AttentionCapture

            with AttentionCapture(
                pipe,
                relations=["video->text" if model.video else "image->text"],
                timesteps="all",
                heads="mean",
                mode=opts["mode"],
                offload=opts["offload"],
                max_capture_bytes=None,
            ) as cap:
                out = pipe(prompt=args.prompt, **kwargs)
                _sync(device)
                t1 = time.perf_counter()
                maps = cap.compute()
                post = time.perf_counter() - t1
        _sync(device)
        seconds = time.perf_counter() - t0
        cpu_seconds = time.process_time() - c0
    if arm.startswith("daamkit"):
        held = tensor_bytes({k: v for k, v in vars(tc).items() if k != "pipe"})
    elif arm != "untraced":
        held = tensor_bytes(cap.collector.records)
        result = _peer_rows(maps, opts.get("keep"))
        del maps, cap
    changed = state.differences(pipe) if state is not None else []
    if changed:
        state.put_back()  # later calls must run on the pipeline as it was built
    image = first_output(out, model, args)
    del out
    return Call(arm, seconds, cpu_seconds, post, meter.sample, image, held, changed, result)  # type: ignore[arg-type]


# ---- agreement ---------------------------------------------------------------------------------
def _layer_grid(latent_hw: tuple[int, int], tokens: int) -> tuple[int, int]:
    # a UNet's stride-2 downsamplers round odd sizes up
    h, w = latent_hw
    while h * w > tokens:
        h, w = math.ceil(h / 2), math.ceil(w / 2)
    if h * w != tokens:
        raise ValueError(f"{tokens} image queries do not fit the latent grid {latent_hw}")
    return h, w


def peer_aggregate(
    rows: list[tuple[str, float | None, torch.Tensor]], latent_hw, grid, frames: int | None = None
) -> tuple[torch.Tensor, int, int]:
    """DAAM's aggregate of the peer's maps: (T, gh, gw), or (T, F, gh, gw) for a video's ``frames``
    frame-major token frames, and the numbers of layers and steps in it."""
    total = None
    layers, steps = set(), set()
    f = frames or 1
    for name, timestep, m in rows:
        n, t = m.shape
        h, w = _layer_grid(latent_hw, n // f)
        x = m.T.reshape(1, t * f, h, w)
        if (h, w) != tuple(grid):
            x = F.interpolate(x, size=tuple(grid), mode="bicubic", align_corners=False).clamp_(min=0)
        x = x.reshape(1, t, f, *grid) if frames else x
        total = x[0].clone() if total is None else total.add_(x[0])
        layers.add(name)
        steps.add(timestep)
    if total is None:
        raise ValueError("the peer recorded no image->text map")
    return total / len(layers), len(layers), len(steps)


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    x, y = a.double().flatten(), b.double().flatten()
    x, y = x - x.mean(), y - y.mean()
    den = float((x.square().sum() * y.square().sum()).sqrt())
    return float((x * y).sum()) / den if den > 0 else float("nan")


def agreement(hm: Any, peer: torch.Tensor) -> dict[str, Any]:
    """Pearson r of each word's map (mean over its token positions) between daamkit's and the peer's."""
    extra = peer.shape[0] - hm.maps.shape[0]
    # Z-Image pads its caption with a learnt token to a multiple of 32 after the prompt's tokens; the peer
    # keeps those key columns, daamkit's text ends with the prompt's own tokens
    if extra > 0 and tuple(peer.shape[1:]) == tuple(hm.maps.shape[1:]):
        peer = peer[: hm.maps.shape[0]]
    if tuple(peer.shape) != tuple(hm.maps.shape):
        return {"error": f"daamkit maps {tuple(hm.maps.shape)} vs peer {tuple(peer.shape)}"}
    words = {}
    for label, wm in hm.items():
        other = peer[list(wm.positions)].mean(0)
        peak = float(wm.value.abs().max()) or 1.0
        words[label] = {
            "r": _pearson(wm.value, other),
            "max_rel_diff": float((wm.value - other).abs().max()) / peak,
        }
    rs = [v["r"] for v in words.values() if not math.isnan(v["r"])]
    return {
        "words": words,
        "r_mean": float(np.mean(rs)) if rs else float("nan"),
        "r_min": float(min(rs)) if rs else float("nan"),
        "max_rel_diff": max((v["max_rel_diff"] for v in words.values()), default=float("nan")),
        "all_tokens_r": _pearson(hm.maps, peer),
        "peer_extra_key_columns": max(extra, 0),
    }


# ---- summary -----------------------------------------------------------------------------------
def summarize(calls: list[Call], arm: str, base: str = "untraced") -> dict[str, Any]:
    u = [c for c in calls if c.arm == base]
    t = [c for c in calls if c.arm == arm]
    out: dict[str, Any] = {
        "n": len(t),
        "s": [round(c.seconds, 4) for c in t],
        "median_s": _median([c.seconds for c in t]),
        "post_median_s": _median([c.post_seconds for c in t]),
        "call_peak_mib": _median([c.mem.call_peak for c in t]) / MiB,
        "total_peak_mib": _median([c.mem.peak for c in t]) / MiB,
        "held_mib": max(c.held_bytes for c in t) / MiB,
        "left_changed": sorted({x for c in t for x in c.left_changed}),
    }
    if arm != base and u:
        um = _median([c.seconds for c in u])
        out["time_ratio_median"] = out["median_s"] / um
        out["time_ratio_min"] = min(c.seconds for c in t) / min(c.seconds for c in u)
        out["cpu_time_ratio_median"] = _median([c.cpu_seconds for c in t]) / _median(
            [c.cpu_seconds for c in u]
        )
        u_call = _median([c.mem.call_peak for c in u]) / MiB
        u_total = _median([c.mem.peak for c in u]) / MiB
        out["extra_peak_mib"] = out["call_peak_mib"] - u_call
        out["extra_peak_pct_of_untraced_total"] = 100 * out["extra_peak_mib"] / u_total
        out["max_abs_image_diff"] = float(np.abs(t[0].image - u[0].image).max())
        if len(t) == len(u) > 1:  # one call of each arm per round, back to back
            out["time_ratio_paired"] = paired_ratio([c.seconds for c in u], [c.seconds for c in t])
            out["cpu_time_ratio_paired"] = paired_ratio([c.cpu_seconds for c in u], [c.cpu_seconds for c in t])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="sd15", choices=sorted(MODELS))
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "float16", "bfloat16"],
        help="auto: float32 on CPU, float16 on CUDA",
    )
    p.add_argument(
        "--size", default=None, help="image side in px, or WIDTHxHEIGHT (default 256 on CPU, 512 on CUDA)"
    )
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 3 on CPU, 30 on CUDA)")
    p.add_argument("--repeats", type=int, default=3, help="calls of each arm measured (ABBA order)")
    p.add_argument(
        "--warmup",
        type=int,
        default=1,
        help="calls of each arm run first and discarded (besides these, one untraced call always runs "
        "first, and one peer call that tells which layers it records)",
    )
    p.add_argument(
        "--probabilities",
        default="model",
        choices=["model", "text"],
        help="daamkit's timed arm (model: the peer's softmax over all keys); the other setting "
        "gets one extra untimed call for its agreement",
    )
    p.add_argument(
        "--peer-mode",
        default="fast",
        choices=["fast", "exact"],
        help="the peer's mode (fast, its default: keep q/k, form maps after the call)",
    )
    p.add_argument(
        "--peer-offload",
        default="same",
        help="where the peer keeps what it captures: 'same' (the pipeline's device, as its image "
        "quick start does), 'cpu' (its default) or a device",
    )
    p.add_argument(
        "--daamkit-layers",
        default="common",
        choices=["common", "all"],
        help="common: only the layers the peer records (same work); all: daamkit's default",
    )
    p.add_argument(
        "--latent",
        action="store_true",
        help="return latents (output_type='latent'): no VAE decode, which neither tool traces, so short "
        "calls give more rounds",
    )
    p.add_argument("--prompt", default="a photograph of a dog sitting on a wooden bench in a park")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)"
    )
    p.add_argument("--interval-ms", type=float, default=2.0, help="RSS sampling interval on CPU")
    p.add_argument("--no-trim", action="store_true", help="CPU: do not malloc_trim(0) before each call")
    add_model_args(p)
    p.add_argument("--json", dest="json_path", default=None, help="also write the result JSON here")
    args = p.parse_args(argv)

    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but CUDA is not available")
    dtype = (
        getattr(torch, args.dtype)
        if args.dtype != "auto"
        else (torch.float16 if device.type == "cuda" else torch.float32)
    )
    args.height, args.width = parse_size(args.size) or ((512, 512) if device.type == "cuda" else (256, 256))
    args.size = args.width if args.height == args.width else f"{args.width}x{args.height}"
    args.steps = args.steps or (30 if device.type == "cuda" else 3)
    if args.threads:
        torch.set_num_threads(args.threads)
    other_probabilities = "text" if args.probabilities == "model" else "model"

    try:
        import attention_map_diffusers as peer_pkg

        peer_version = getattr(peer_pkg, "__version__", "?")
    except ImportError as e:
        p.error(f"{PEER} is not installed ({e}); see benchmarks/README.md")

    model = MODELS[args.model]
    load0 = os.getloadavg() if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    pipe = model.build(device, dtype, args.seed, args)
    pipe.set_progress_bar_config(disable=True)
    build_s = time.perf_counter() - t0
    state = PipeState.read(pipe)
    proc_kinds = sorted({type(proc).__name__ for _, proc in state.processors.values()})
    print(
        f"built {args.model} on {device} ({dtype}) in {build_s:.1f} s; processors: {', '.join(proc_kinds)}",
        flush=True,
    )

    errors: dict[str, str] = {}
    from daamkit import trace

    try:
        daamkit_layers = [info.name for info in trace(pipe).capture.layers]
    except Exception as e:  # the family is not supported (yet)
        daamkit_layers = []
        errors["daamkit"] = f"{type(e).__name__}: {e}"
    offload = str(device) if args.peer_offload == "same" else args.peer_offload
    peer_opts: dict[str, Any] = {"mode": args.peer_mode, "offload": offload, "keep": None}

    calls: list[Call] = []

    def go(arm: str, opts: dict[str, Any], keep: bool = True, check: bool = True) -> Call | None:
        try:
            c = run_call(pipe, args, model, device, arm, state if check else None, opts)
        except Exception as e:
            errors[arm] = f"{type(e).__name__}: {e}"
            print(f"  {arm:<14} failed: {errors[arm]}", flush=True)
            # the tools restore on the way out of their with-block; make sure of it
            state.put_back()
            return None
        print(
            f"  {arm:<14} {c.seconds:8.2f} s  cpu {c.cpu_seconds:8.2f} s  call peak {c.mem.call_peak / MiB:8.1f} MiB"
            f"  total peak {c.mem.peak / MiB:8.0f} MiB  held {c.held_bytes / MiB:7.2f} MiB"
            + (f"  LEFT CHANGED: {c.left_changed}" if c.left_changed else ""),
            flush=True,
        )
        if keep:
            calls.append(c)
        return c

    # transformers installs some hooks of its own on a model's first forward (SD3's CLIP encoders asked
    # for hidden states): the state a tool must leave behind is the one after an untraced call
    print("first call (untraced, discarded)", flush=True)
    go("untraced", {}, keep=False, check=False)
    state = PipeState.read(pipe)
    # the peer's first call: which layers it records image->text in (the comparison's COMMON layers)
    print("probe: the peer's layers", flush=True)
    probe = go("peer", peer_opts, keep=False)
    peer_layers = sorted({name for name, _, _ in probe.result}) if probe is not None else []
    if probe is not None and not peer_layers:
        errors["peer"] = "recorded no image->text map"
    common = [n for n in daamkit_layers if n in set(peer_layers)] or daamkit_layers
    daamkit_opts = {
        "layers": common if args.daamkit_layers == "common" and peer_layers else None,
        "probabilities": args.probabilities,
    }
    peer_opts["keep"] = set(common) if common else None
    arms = (
        ["untraced"]
        + (["daamkit"] if "daamkit" not in errors else [])
        + (["peer"] if "peer" not in errors else [])
    )
    opts = {"untraced": {}, "daamkit": daamkit_opts, "peer": peer_opts}
    print(
        f"layers: daamkit traces {len(daamkit_layers)}, the peer records image->text in {len(peer_layers)}, "
        f"common {len(common)}"
        + (
            f"; the daamkit arm traces {'all' if daamkit_opts['layers'] is None else 'the common'} layers"
            if "daamkit" in arms
            else ""
        ),
        flush=True,
    )

    print(f"warm-up ({args.warmup} x each)", flush=True)
    for _ in range(args.warmup):
        for arm in arms:
            go(arm, opts[arm], keep=False)
    print(f"measure ({args.repeats} x each, ABBA)", flush=True)
    for i in range(args.repeats):
        for arm in arms if i % 2 == 0 else arms[::-1]:
            go(arm, opts[arm])
    arms = [a for a in arms if any(c.arm == a for c in calls)]

    # agreement: the last measured maps of each tool, and daamkit once more with the other probabilities
    agree: dict[str, Any] = {}
    last = {c.arm: c for c in calls}
    if "daamkit" in last and "peer" in last:
        other = go(
            "daamkit-" + other_probabilities,
            {**daamkit_opts, "probabilities": other_probabilities},
            keep=False,
        )
        hm = last["daamkit"].result
        latent_hw = tuple(hm.meta["latent_hw"])
        try:
            peer_map, n_layers, n_steps = peer_aggregate(
                last["peer"].result, latent_hw, hm.grid_size, hm.time.frames if hm.is_video else None
            )
        except ValueError as e:
            errors["agreement"] = str(e)
        else:
            agree = {
                "layers": n_layers,
                "steps": n_steps,
                "daamkit_layers": len(hm.meta["layers"]),
                "grid": list(hm.grid_size),
                "tokens": int(hm.maps.shape[0]),
                args.probabilities: agreement(hm, peer_map),
            }
            if other is not None:
                agree[other_probabilities] = agreement(other.result, peer_map)
    load1 = os.getloadavg() if hasattr(os, "getloadavg") else None

    result: dict[str, Any] = {
        "benchmark": f"daamkit.trace vs {PEER}",
        "model": args.model,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or platform.machine(),
        "dtype": str(dtype).replace("torch.", ""),
        "size": args.size,
        "frames": args.frames if MODELS[args.model].video else None,
        "steps": args.steps,
        "latent": args.latent,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": load0,
        "loadavg_end": load1,
        "torch": torch.__version__,
        "peer_version": peer_version,
        "model_description": model.description,
        "reduced": model.reduced(args),
        "build_s": build_s,
        "processors": proc_kinds,
        "settings": {
            "daamkit": {
                "probabilities": args.probabilities,
                "layers": "common" if daamkit_opts["layers"] else "all",
            },
            "peer": {
                "relations": ["video->text" if MODELS[args.model].video else "image->text"],
                "timesteps": "all",
                "heads": "mean",
                "mode": args.peer_mode,
                "offload": offload,
                "max_capture_bytes": None,
            },
        },
        "layers": {"daamkit": daamkit_layers, "peer": peer_layers, "common": common},
        "errors": errors,
        "arms": {arm: summarize(calls, arm) for arm in arms},
        "agreement": agree,
    }
    # the two tools against each other, round by round: below 1, daamkit took less time than the peer
    if "daamkit" in arms and "peer" in arms:
        d = summarize(calls, "daamkit", base="peer")
        result["daamkit_vs_peer"] = {k: d[k] for k in ("time_ratio_median", "cpu_time_ratio_median",
                                                       "time_ratio_paired", "cpu_time_ratio_paired") if k in d}

    rows = [
        ("model / device / dtype", f"{args.model} / {result['device_name']} ({device}) / {result['dtype']}"),
        *([("reduced from the released model", result["reduced"])] if result["reduced"] else []),
        ("image, steps", f"{args.width}x{args.height} px{f' x {args.frames} frames' if model.video else ''}, "
                         f"{args.steps} steps" + (", latents returned" if args.latent else "")),
        ("load avg", f"{load0} -> {load1}, {result['torch_threads']} torch threads"),
        (
            "peer",
            f"{PEER} {peer_version}: mode={args.peer_mode}, offload={offload}, timesteps=all, heads=mean",
        ),
        ("layers", f"daamkit {len(daamkit_layers)}, peer {len(peer_layers)}, common {len(common)}"),
    ]
    for arm in arms:
        s = result["arms"][arm]
        if arm == "untraced":
            rows.append(
                (
                    arm,
                    f"{s['median_s']:.3f} s median {s['s']}; peak call/total "
                    f"{s['call_peak_mib']:.1f}/{s['total_peak_mib']:.0f} MiB",
                )
            )
            continue
        rows += [
            (arm, f"{s['median_s']:.3f} s median {s['s']} (maps: {s['post_median_s'] * 1e3:.1f} ms)"),
            (
                f"  {arm}: time ratio",
                f"{s['time_ratio_median']:.4f} median, {s['time_ratio_min']:.4f} min; "
                f"CPU time {s['cpu_time_ratio_median']:.4f}",
            ),
            *[
                (f"  {arm}: {label}, paired", format_paired(s[key]))
                for key, label in (("time_ratio_paired", "time ratio"), ("cpu_time_ratio_paired", "CPU-time ratio"))
                if key in s
            ],
            (
                f"  {arm}: extra peak",
                f"{s['extra_peak_mib']:+.1f} MiB = {s['extra_peak_pct_of_untraced_total']:+.3f} % "
                f"of untraced total; holds {s['held_mib']:.3f} MiB after the call",
            ),
            (
                f"  {arm}: image, pipeline",
                f"max |diff| {s['max_abs_image_diff']:.2e}; "
                + ("left unchanged" if not s["left_changed"] else f"LEFT CHANGED {s['left_changed']}"),
            ),
        ]
    vs = result.get("daamkit_vs_peer", {})
    for key, label in (("time_ratio_paired", "time"), ("cpu_time_ratio_paired", "CPU time")):
        if key in vs:
            rows.append((f"daamkit / peer, {label}", format_paired(vs[key])))
    for prob in (args.probabilities, other_probabilities):
        a = agree.get(prob)
        if not a:
            continue
        if "error" in a:
            rows.append((f"agreement ({prob})", a["error"]))
            continue
        rows.append(
            (
                f"agreement, daamkit {prob!r} vs peer",
                f"r per word mean {a['r_mean']:.6f} min {a['r_min']:.6f} ({len(a['words'])} words); "
                f"all tokens r {a['all_tokens_r']:.6f}; max diff {a['max_rel_diff']:.2e} of the peak",
            )
        )
    if agree:
        rows.append(
            (
                "  compared",
                f"{agree['layers']} layers x {agree['steps']} steps, head mean, "
                f"{agree['tokens']} text keys on a {agree['grid'][0]}x{agree['grid'][1]} grid"
                + (f" (the peer's {n} key columns after them left out)"
                   if (n := agree[args.probabilities].get("peer_extra_key_columns")) else ""),
            )
        )
        words = agree[args.probabilities].get("words", {})
        for w, v in words.items():
            o = agree.get(other_probabilities, {}).get("words", {}).get(w, {})
            rows.append(
                (
                    f"    {w}",
                    f"r {v['r']:.6f} ({args.probabilities})"
                    + (f", {o['r']:.6f} ({other_probabilities})" if o else ""),
                )
            )
    for arm, e in errors.items():
        rows.append((f"{arm} error", e))
    print(f"\ndaamkit vs {PEER}")
    print(_fmt_table(rows))
    print(json.dumps(result, default=float), flush=True)
    if args.json_path:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_path)), exist_ok=True)
        with open(args.json_path, "w", encoding="utf-8") as f:
            f.write(json.dumps(result, indent=2, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
