#!/usr/bin/env bash
# One call on a GPU machine as it comes (torch 2.11+cu130, Triton 3.6, no vLLM, only the package registry):
#   1. installs kvcomp into that Python without touching torch / triton (editable, --no-deps, plus the pure
#      dependencies that are missing, with torch and triton pinned by a constraints file to what is installed);
#   2. runs the `gpu`-marked tests (pytest -m gpu);
#   3. runs the kernel benchmark (bench/run.py, every registered method) at the Llama-3.1-8B attention geometry
#      (32 query / 8 KV heads, d=128, bf16: the registry's default problem) at 32K and 128K, batch 1 and 16,
#      writing bench/results/kernels-<gpu>.json (rewritten after every case).
# The whole run stays within --budget-s seconds (default 480): the tests get a third, the benchmark the rest
# (its own --budget-s: remaining cases are recorded as skipped).
#
#   bash scripts/gpu_check.sh [--budget-s N] [--python PY]
#   bash scripts/gpu_check.sh --dry-run [--out PATH]   # CPU: the same steps on tiny shapes under
#       TRITON_INTERPRET=1 (no install: prints the pip commands), the benchmark as `bench/run.py --smoke`
#       writing a JSON with the same machine line and result rows to PATH (default: a temp file)
set -euo pipefail
cd "$(dirname "$0")/.."
BUDGET=480
DRY=0
OUT=""
PY=${PYTHON:-python3}
while [ $# -gt 0 ]; do
  case "$1" in
    --budget-s) BUDGET=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --out) OUT=$2; shift 2 ;;
    --python) PY=$2; shift 2 ;;
    *) echo "usage: $0 [--budget-s N] [--dry-run] [--out PATH] [--python PY]" >&2; exit 2 ;;
  esac
done
if [ "$DRY" = 1 ] && [ -z "${PYTHON:-}" ] && [ -x .venv/bin/python ]; then PY=.venv/bin/python; fi
t0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - t0) )); }
log() { echo "[gpu_check $(( $(date +%s) - t0 ))s] $*"; }

"$PY" - <<'EOF'
import torch
print("torch", torch.__version__, "| cuda", torch.version.cuda, "| device",
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton: not installed")
EOF

# 1. install without touching torch / triton
CONS=$(mktemp)
"$PY" -c "import torch; print('torch==' + torch.__version__)" > "$CONS"
"$PY" -c "import triton; print('triton==' + triton.__version__)" >> "$CONS" 2>/dev/null || true
DEPS=(numpy safetensors tqdm "transformers>=5.0,<6" gguf accelerate pytest)
if [ "$DRY" = 1 ]; then
  log "dry run: would run: $PY -m pip install --no-deps --no-build-isolation -e . && $PY -m pip install -c $CONS ${DEPS[*]}"
  log "constraints: $(tr '\n' ' ' < "$CONS")"
else
  log "installing kvcomp (editable, no deps; torch/triton pinned: $(tr '\n' ' ' < "$CONS"))"
  "$PY" -m pip install -q -c "$CONS" "setuptools>=68" wheel  # the build backend (no build isolation)
  "$PY" -m pip install -q --no-deps --no-build-isolation -e .
  "$PY" -m pip install -q -c "$CONS" "${DEPS[@]}"
fi
rm -f "$CONS"

# 2. the gpu-marked tests (on the CPU they skip: the dry run checks that they collect and run)
TEST_S=$(( $(left) / 3 ))
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1
  TESTS=(tests/kernels)
else
  TESTS=(tests --ignore=tests/vllm_plugin)
fi
log "pytest -m gpu (at most ${TEST_S}s)"
set +e
timeout "$TEST_S" "$PY" -m pytest -q -ra -m gpu -p no:cacheprovider "${TESTS[@]}" 2>&1 | tail -n 25
TEST_RC=${PIPESTATUS[0]}
set -e
log "gpu tests: exit $TEST_RC"

# 3. the kernel benchmark
BENCH_S=$(( $(left) - 15 ))
if [ "$BENCH_S" -lt 30 ]; then BENCH_S=30; fi
if [ "$DRY" = 1 ]; then
  OUT=${OUT:-$(mktemp --suffix=.json)}
  log "bench (dry run: tiny shapes under the interpreter) -> $OUT"
  "$PY" bench/run.py --smoke --out "$OUT"
else
  log "bench: 32K/128K, batch 1/16, bf16, every method (budget ${BENCH_S}s)"
  "$PY" bench/run.py --contexts 32K,128K --batch 1,16 --dtypes bfloat16 --budget-s "$BENCH_S" \
    ${OUT:+--out "$OUT"}
  OUT=${OUT:-$(ls -t bench/results/kernels-*.json | head -n 1)}
fi
log "done in $(( $(date +%s) - t0 ))s: results $OUT (gpu tests exit $TEST_RC)"
[ "$TEST_RC" = 0 ] || [ "$TEST_RC" = 5 ]
