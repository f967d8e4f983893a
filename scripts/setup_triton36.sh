#!/usr/bin/env bash
# Idempotently create a small venv with the GPU machine's Triton (3.6.0) for the ahead-of-time sm_90 compile test
# (tests/kernels/test_sm90_compile.py). torch is pinned with == so pip takes the CPU build and never a CUDA one;
# kvcomp itself is not installed there: the test puts the repository on sys.path. Prints the venv path last.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KVCOMP_TRITON36_VENV:-.venv-triton36}
PY=${PYTHON:-python3}
stamp="$VENV/.kvcomp-triton36-$(sha1sum scripts/setup_triton36.sh | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  t0=$(date +%s)
  [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q triton==3.6.0 numpy
  "$VENV/bin/python" -c "import torch, triton; assert triton.__version__ == '3.6.0', triton.__version__" >&2
  touch "$stamp"
  echo "[setup] Triton 3.6 venv ready in $(( $(date +%s) - t0 )) s" >&2
fi
echo "$VENV"
