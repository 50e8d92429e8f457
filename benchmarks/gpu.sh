#!/usr/bin/env bash
# The GPU overhead figures in one run: SD 1.5 at 512 px / 30 steps fp16, SDXL at 1024 px / 30 steps fp16
# and Flux.1-dev at 1024 px / 30 steps bf16 (full depth: 12B + T5-XXL fit one 80 GB card in bf16), each
# traced against its untraced run in the same process (benchmarks/overhead.py). Writes one JSON per model
# and the printed reports to OUT (default runs/gpu); a model that fails or runs out of time does not stop
# the others.
#
#     bash benchmarks/gpu.sh                 # OUT=runs/gpu, REPEATS=3
#     OUT=/tmp/gpu REPEATS=2 bash benchmarks/gpu.sh
#
# Budget on one H100: building the random weights on the card takes seconds; the calls take about
# 1-2 s (SD 1.5), 4-6 s (SDXL) and 10-20 s (Flux) each, 2 * (1 + REPEATS) calls per model.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu}
REPEATS=${REPEATS:-3}
LIMIT=${LIMIT:-240}  # seconds per model
PY=${PY:-python}
mkdir -p "$OUT"
export OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.csv" 2>&1 || true

run() {  # name, then overhead.py options
  local name=$1
  shift
  echo "=== $name: $*"
  timeout "$LIMIT" "$PY" benchmarks/overhead.py --device cuda --repeats "$REPEATS" --warmup 1 --step-factor 0 \
    --json "$OUT/gpu_$name.json" "$@" > "$OUT/gpu_$name.txt" 2>&1
  echo "=== $name rc=$?"
  grep -E "time ratio|CPU-time|extra peak|image diff|traced time|untraced time" "$OUT/gpu_$name.txt" || tail -5 "$OUT/gpu_$name.txt"
}

run sd15_512_fp16 --model sd15 --dtype float16 --size 512 --steps 30
run sdxl_1024_fp16 --model sdxl --dtype float16 --size 1024 --steps 30
run flux_1024_bf16 --model flux --dtype bfloat16 --size 1024 --steps 30 --flux-blocks 19,38 --flux-t5-layers 24
