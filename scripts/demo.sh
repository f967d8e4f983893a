#!/usr/bin/env bash
# The main job: install what is needed, then answer a hidden-fact question over ~2K tokens of real prose
# with the full cache and with each method, printing answer, allocated KV bytes/token and time.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=$(bash scripts/setup_env.sh | tail -n 1)
exec "$VENV/bin/kvcomp" demo "$@"
