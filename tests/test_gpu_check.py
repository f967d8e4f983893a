"""``scripts/gpu_check.sh --dry-run``: the GPU machine's one-call check, on the CPU with tiny shapes under the
Triton interpreter (no install), writes a benchmark JSON with the machine line and one row per method."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_writes_the_json(tmp_path):
    out = tmp_path / "kernels-dry.json"
    env = {**os.environ, "PYTHON": sys.executable, "TRITON_INTERPRET": "1"}
    res = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(out)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "pytest -m gpu" in res.stdout and "would run" in res.stdout
    data = json.loads(out.read_text())
    assert data["machine"]["line"]
    from kvcomp.bench.methods import REGISTRY

    rows = data["results"]
    assert {r["kernel"] for r in rows} == set(REGISTRY)
    assert all(r["ok"] for r in rows), [r for r in rows if not r["ok"]]
