"""The ThinK / A²ATS entries of bench/registry.py pass the runner's --smoke check (interpreter on CPU)."""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NAMES = ["think_decode", "vq_decode", "vq_topk"]


def test_bench_smoke_think_vq(tmp_path):
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import json

    from bench.run import smoke

    out = tmp_path / "smoke.json"
    assert smoke(NAMES, out_path=str(out)) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["kernel"] for r in rows] == NAMES and all(r["ok"] for r in rows)
