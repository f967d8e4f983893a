#!/usr/bin/env bash
# The test suite (what CI runs): CPU only; Triton kernels under TRITON_INTERPRET=1; GPU tests skip without CUDA.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(bash scripts/setup_env.sh | tail -n 1)
export TRITON_INTERPRET=${TRITON_INTERPRET:-1}
exec "$VENV/bin/python" -m pytest -q -ra --durations=15 "$@"
