#!/usr/bin/env bash
# Create .venv and install daamkit with everything the demo and the tests need (idempotent).
# torch is installed first and pinned (constraints.txt): a bare `torch` requirement would pull a
# multi-gigabyte CUDA build on machines where the CPU wheel is what we want.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
if ! python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')" 2>/dev/null; then
  pip install -q "torch==2.13.0"
fi
pip install -q -c constraints.txt -e ".[dev,ui,e2e,syntax,video]" 2>&1 | grep -v "^WARNING: Location" || true
python -c "import daamkit, torch; print('daamkit', daamkit.__version__, 'torch', torch.__version__)"
