#!/usr/bin/env bash
# Idempotently create .venv-kvpress (or $KVPRESS_VENV): CPU torch, kvpress 0.5.5 with its own transformers pin,
# and kvcomp itself without the native extension (the peer runner imports kvcomp.eval for the same prompts).
# torch is installed first and pinned with == so pip keeps the CPU build and never pulls a CUDA one.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KVPRESS_VENV:-.venv-kvpress}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
PIP="$VENV/bin/pip"
stamp="$VENV/.kvpress-setup-$(sha1sum scripts/setup_kvpress.sh | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  t0=$(date +%s)
  "$PIP" install -q torch==2.13.0
  # torch stays at the CPU build installed above: the constraint file pins it for kvpress's resolution
  echo "torch==2.13.0" > "$VENV/torch-pin.txt"
  "$PIP" install -q -c "$VENV/torch-pin.txt" kvpress==0.5.5 gguf tqdm
  # kvcomp's eval package (prompts, scorer) without building the native extension or pulling its deps
  KVCOMP_BUILD_EXT=0 "$PIP" install -q -c "$VENV/torch-pin.txt" --no-deps --no-build-isolation -e .
  "$VENV/bin/python" -c "import torch, kvpress, transformers; assert not torch.version.cuda, torch.__version__; \
print('[setup] torch', torch.__version__, 'transformers', transformers.__version__)"
  touch "$stamp"
  echo "[setup] kvpress environment ready in $(( $(date +%s) - t0 )) s"
fi
echo "$VENV"
