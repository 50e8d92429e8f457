"""Where a traced denoising step spends its time: the capture path, part by part.

Builds the same random-weight pipelines as ``overhead.py`` (``--model sd15|sd3|flux``), runs
untraced and traced single-step calls (``output_type="latent"``: no VAE) under ``torch.profiler``
in ABAB order, and prints per part of the capture path the CPU time in ms per denoising step and
its share of the traced step (the denoiser's forward, hooks included). The ranges are put in by
wrapping the capture's functions from here, so the library carries no profiling code:

* hooks: the pre-hook, the q/k projection hooks and the Python of the after-hook outside the parts
  below (branch rows, the loop over branches); the after-hook's own operators (row slicing, and
  for SD3/Flux the module's q/k norms and RoPE) are "after: q/k norms, RoPE, slicing";
* probabilities: ``attention_probs`` split by operator (matmul, scale, softmax, copies; "q/k prep"
  is the views and the UNet modules' optional q/k norms);
* accumulation: ``Accumulator.add`` split by operator (head average, resize, clamp, running sums,
  copies, Python).

The profiler's own cost inflates every part a little; the ratios in ``overhead.py`` are the figures
without it. The last line of stdout is the result as JSON.

    python benchmarks/profile_capture.py --size 512
    python benchmarks/profile_capture.py --model flux --size 512
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import MODELS, add_model_args  # noqa: E402

# operator name -> part, inside the probability and accumulation ranges; the first match wins
PROB_OPS = (
    (("matmul", "bmm", "baddbmm", "mm"), "probs: q k^T matmul"),
    (("mul", "mul_", "div", "div_"), "probs: scale"),
    (("softmax", "_softmax"), "probs: softmax"),
    (("copy_", "clone", "contiguous", "to", "_to_copy"), "probs: copies / casts"),
)
ADD_OPS = (
    (("mean", "sum", "div_", "div"), "acc: head average"),
    (("upsample_bicubic2d", "interpolate"), "acc: resize to grid"),
    (("clamp", "clamp_", "clamp_min_", "clamp_min"), "acc: clamp"),
    (("add_", "add"), "acc: running sums"),
    (("copy_", "clone", "contiguous", "reshape", "_to_copy", "to"), "acc: copies"),
)

# (where, attribute, range name): functions of the capture path wrapped in a profiler range
WRAP = [
    ("daamkit.capture.base:DenoiserPreHook", "__call__", "hooks: step pre-hook"),
    ("daamkit.capture.base:ProjectionTap", "reset", "hooks: q/k save"),
    ("daamkit.capture.base:ProjectionTap", "save_q", "hooks: q/k save"),
    ("daamkit.capture.base:ProjectionTap", "save_k", "hooks: q/k save"),
    ("daamkit.capture.unet:_LayerTap", "after", "after"),
    ("daamkit.capture.sdpa:AttentionTap", "pre", "hooks: mode push"),
    ("daamkit.capture.sdpa:AttentionTap", "post", "hooks: mode pop"),
    ("daamkit.capture.sdpa", "text_probabilities", "probs"),
    ("daamkit.capture.unet", "attention_probs", "probs"),
    ("daamkit.aggregate:Accumulator", "add", "acc"),
    ("daamkit.aggregate:Accumulator", "flush", "acc"),
]


def _resolve(where: str):
    import importlib

    mod, _, cls = where.partition(":")
    obj = importlib.import_module(mod)
    return getattr(obj, cls) if cls else obj


def install_ranges() -> None:
    for where, attr, name in WRAP:
        owner = _resolve(where)
        fn = getattr(owner, attr, None)
        if fn is None or getattr(fn, "_profiled", False):
            continue

        def wrapped(*a, __fn=fn, __name=name, **kw):
            with record_function(__name):
                return __fn(*a, **kw)

        functools.update_wrapper(wrapped, fn)
        wrapped._profiled = True  # type: ignore[attr-defined]
        setattr(owner, attr, wrapped)


def _classify(op: str, table) -> str | None:
    short = op.split("::", 1)[-1]
    for names, part in table:
        if short in names:
            return part
    return None


def parts_of(events) -> tuple[dict[str, float], float]:
    """CPU ms per part in one profiled call, and the denoiser's total (the step)."""
    parts: dict[str, float] = defaultdict(float)
    step = 0.0
    for ev in events:
        if ev.name == "denoiser step":
            step += ev.cpu_time_total
            continue
        if ev.name.startswith("hooks:"):
            parts[ev.name] += ev.cpu_time_total
            continue
        if ev.name not in ("after", "probs", "acc"):
            continue
        parent = ev.cpu_parent
        if ev.name == "after":
            # the joint capture applies the q/k norms and RoPE here, before attention_probs
            ops = sum(c.cpu_time_total for c in ev.cpu_children if c.name not in ("probs", "acc"))
            nested = sum(c.cpu_time_total for c in ev.cpu_children if c.name in ("probs", "acc"))
            parts["after: q/k norms, RoPE, slicing"] += ops
            parts["hooks: after (Python, loop)"] += ev.cpu_time_total - nested - ops
            continue
        if parent is not None and parent.name == ev.name:
            continue  # a wrapped function calling itself through a wrapper
        table, rest = (PROB_OPS, "probs: q/k prep (norms, RoPE, views)") if ev.name == "probs" else (
            ADD_OPS,
            "acc: Python and other ops",
        )
        inner = 0.0
        for c in ev.cpu_children:
            part = _classify(c.name, table) or rest
            parts[part] += c.cpu_time_total
            inner += c.cpu_time_total
        parts[rest] += ev.cpu_time_total - inner
    return {k: v / 1e3 for k, v in parts.items()}, step / 1e3


CAPTURE_RANGES = ("after", "probs", "acc")


def op_times(events) -> dict[str, float]:
    """Self CPU ms per operator inside the denoiser step, the capture's own operators (those under one
    of its ranges) apart as "capture: <op>": which of the model's operators a trace slows down."""
    out: dict[str, float] = defaultdict(float)
    for ev in events:
        if ev.name == "denoiser step" or ev.name.startswith("hooks:") or ev.name in CAPTURE_RANGES:
            continue
        node, inside, in_step = ev.cpu_parent, False, False
        while node is not None:
            inside = inside or node.name in CAPTURE_RANGES or node.name.startswith("hooks:")
            if node.name == "denoiser step":
                in_step = True
                break
            node = node.cpu_parent
        if in_step:
            out[("capture: " if inside else "") + ev.name] += ev.self_cpu_time_total / 1e3
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="sd15", choices=sorted(MODELS))
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2, help="profiled untraced/traced pairs (ABAB)")
    p.add_argument("--warmup", type=int, default=1, help="untraced/traced pairs run first and discarded")
    p.add_argument("--prompt", default="a photograph of a dog sitting on a wooden bench in a park")
    p.add_argument("--seed", type=int, default=0)
    add_model_args(p)
    p.add_argument("--ops", type=int, default=0,
                   help="also list the N operators of the step whose time grew most when traced")
    p.add_argument("--json", dest="json_path", default=None)
    args = p.parse_args(argv)

    from daamkit import trace

    model = MODELS[args.model]
    pipe = model.build(torch.device("cpu"), torch.float32, args.seed, args)
    pipe.set_progress_bar_config(disable=True)
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    install_ranges()

    ranges: list = []

    def open_range(module, args_, kwargs):
        r = record_function("denoiser step")
        r.__enter__()
        ranges.append(r)

    def close_range(module, args_, kwargs, out):
        ranges.pop().__exit__(None, None, None)

    denoiser.register_forward_pre_hook(open_range, with_kwargs=True, prepend=True)
    denoiser.register_forward_hook(close_range, with_kwargs=True, always_call=True)

    def call(traced: bool):
        kw = model.kwargs(args)
        kw.update(
            num_inference_steps=1,
            height=args.size,
            width=args.size,
            output_type="latent",
            generator=torch.Generator().manual_seed(args.seed),
        )
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            if traced:
                with trace(pipe) as tc:
                    pipe(prompt=args.prompt, **kw)
                    tc.heat_maps(0)
            else:
                pipe(prompt=args.prompt, **kw)
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        # page faults and kernel time: the allocator's cost of extra tensors shows here, not in the ops
        usage = {
            "user_s": r1.ru_utime - r0.ru_utime,
            "sys_s": r1.ru_stime - r0.ru_stime,
            "minor_faults": r1.ru_minflt - r0.ru_minflt,
        }
        return prof.events(), usage

    load0 = os.getloadavg()
    for _ in range(args.warmup):
        call(False)
        call(True)
    runs: dict[bool, list] = {False: [], True: []}
    usages: dict[bool, list] = {False: [], True: []}
    ops: dict[bool, list] = {False: [], True: []}
    for i in range(args.repeats):
        for traced in (False, True) if i % 2 == 0 else (True, False):
            events, usage = call(traced)
            parts, step = parts_of(events)
            runs[traced].append((parts, step))
            if args.ops:
                ops[traced].append(op_times(events))
            usages[traced].append(usage)
            print(
                f"  {'traced  ' if traced else 'untraced'} step {step:9.1f} ms  call: user {usage['user_s']:.1f} s, "
                f"sys {usage['sys_s']:.1f} s, {usage['minor_faults']} minor page faults",
                flush=True,
            )
    load1 = os.getloadavg()

    untraced = min(s for _, s in runs[False])
    traced_step = min(s for _, s in runs[True])
    names = sorted({k for parts, _ in runs[True] for k in parts})
    table = {k: statistics.median(parts.get(k, 0.0) for parts, _ in runs[True]) for k in names}
    total = sum(table.values())
    print(f"\n{args.model} {args.size}x{args.size} px, 1 step, CPU fp32, {torch.get_num_threads()} threads, load {load0} -> {load1}")
    print(f"denoiser step (min of {args.repeats}): untraced {untraced:.1f} ms, traced {traced_step:.1f} ms "
          f"(difference {traced_step - untraced:+.1f} ms, {100 * (traced_step / untraced - 1):+.2f} %)")
    print("\n| part | ms per step | share of traced step |\n| --- | ---: | ---: |")
    for k in names:
        print(f"| {k} | {table[k]:.1f} | {100 * table[k] / traced_step:.2f} % |")
    print(f"| **capture path, total** | **{total:.1f}** | **{100 * total / traced_step:.2f} %** |")
    grown: list[tuple[str, float, float]] = []
    if args.ops:
        def med(traced: bool, name: str) -> float:
            return statistics.median(o.get(name, 0.0) for o in ops[traced])

        names_ops = {k for o in ops[False] + ops[True] for k in o}
        grown = sorted(((k, med(False, k), med(True, k)) for k in names_ops), key=lambda x: x[1] - x[2])[: args.ops]
        print(f"\n| operator (self CPU, median of {args.repeats}) | untraced ms | traced ms | traced - untraced |")
        print("| --- | ---: | ---: | ---: |")
        for k, u, t in grown:
            print(f"| {k} | {u:.1f} | {t:.1f} | {t - u:+.1f} |")
        u_all = statistics.median(sum(o.values()) for o in ops[False])
        t_all = statistics.median(sum(o.values()) for o in ops[True])
        print(f"| all operators of the step | {u_all:.1f} | {t_all:.1f} | {t_all - u_all:+.1f} |")
    result = {
        "benchmark": "daamkit capture profile",
        "model": args.model,
        "size": args.size,
        "repeats": args.repeats,
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": load0,
        "loadavg_end": load1,
        "untraced_step_ms": untraced,
        "traced_step_ms": traced_step,
        "parts_ms": table,
        "call_usage": {"untraced": usages[False], "traced": usages[True]},
        "capture_total_ms": total,
        "ops_grown": [{"op": k, "untraced_ms": u, "traced_ms": t} for k, u, t in grown],
    }
    print(json.dumps(result))
    if args.json_path:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_path)), exist_ok=True)
        with open(args.json_path, "w", encoding="utf-8") as f:
            f.write(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
