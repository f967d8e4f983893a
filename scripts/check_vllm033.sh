#!/usr/bin/env bash
# vLLM 0.33 (users' GPU target) checked on a machine without a GPU: tests/vllm033/test_interfaces.py in its own venv.
#
#   scripts/check_vllm033.sh [VENV_DIR]      (default: $KVCOMP_VLLM033_VENV or .venv-vllm033)
#
# vllm==0.33.0 pins a CUDA torch 2.14.0; its wheels install and import on a CPU-only machine (no CUDA driver
# needed to import), so the plugin's entry point, kvcomp's backend / metadata builder / impl against 0.33's
# abstract interfaces and `kvcomp vllm-config` against 0.33's config objects can all be checked here. Steps (each
# skipped when already satisfied; the first run downloads ~4 GB of CUDA wheels, later runs only run the tests):
#   1. python3 -m venv (checks free disk first: 12 GB)
#   2. vllm==0.33.0 (with its pinned torch)
#   3. kvcomp editable without deps (its pyproject registers the vllm.general_plugins entry point) + pytest
#   4. pytest tests/vllm033 with KVCOMP_DISABLE_EXT=1 (kvcomp._C is built against the main venv's torch)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-${KVCOMP_VLLM033_VENV:-$REPO/.venv-vllm033}}"
PY="${PYTHON:-python3}"
T0=$(date +%s)
step() { echo "[check_vllm033 $(( $(date +%s) - T0 ))s] $*"; }

have() { "$VENV/bin/python" - "$1" "$2" <<'PYEOF'
import sys
from importlib.metadata import version, PackageNotFoundError
try:
    sys.exit(0 if version(sys.argv[1]).split("+")[0] == sys.argv[2] else 1)
except PackageNotFoundError:
    sys.exit(1)
PYEOF
}

if [ ! -x "$VENV/bin/python" ] || ! have vllm 0.33.0; then
    free_kb=$(df -Pk "$(dirname "$VENV")" | awk 'NR == 2 {print $4}')
    if [ "$free_kb" -lt $((12 * 1024 * 1024)) ]; then
        echo "check_vllm033: needs 12 GB free for vllm 0.33 + CUDA torch, $((free_kb / 1024 / 1024)) GB left" >&2
        exit 1
    fi
fi
if [ ! -x "$VENV/bin/python" ]; then
    step "creating venv $VENV"
    "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
fi
PIP=("$VENV/bin/python" -m pip)
if ! have vllm 0.33.0; then
    step "installing vllm==0.33.0 (pins a CUDA torch 2.14.0; several GB on the first run, then pip's cache)"
    "${PIP[@]}" install -q vllm==0.33.0
fi
# the distribution (not an importable folder: run from the repo root, `import kvcomp` finds the sources without
# the entry point)
if ! "$VENV/bin/python" -c "import importlib.metadata as m, pytest; m.version('kvcomp')" 2>/dev/null; then
    step "installing kvcomp (editable, no deps) + pytest"
    "${PIP[@]}" install -q --no-deps -e "$REPO"
    "${PIP[@]}" install -q pytest
fi
step "versions: $("$VENV/bin/python" -c 'import torch, vllm; print(f"torch {torch.__version__}, vllm {vllm.__version__}, cuda available {torch.cuda.is_available()}")' 2>/dev/null)"
step "pytest tests/vllm033"
cd "$REPO"
KVCOMP_DISABLE_EXT=1 "$VENV/bin/python" -m pytest -q -ra -p no:cacheprovider tests/vllm033 "${@:2}"
step "done"
