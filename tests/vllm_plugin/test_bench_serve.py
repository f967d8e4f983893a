"""``kvcomp bench serve`` end to end on the bundled SmolLM2: stock vLLM and kvcomp (compression off)
servers, a small concurrent load, every row's fields, the ratios to stock and the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FIELDS = ("ttft_s", "decode_tokens_per_s", "e2e_tokens_per_s", "accuracy", "kv_capacity_tokens", "peak_rss_bytes",
          "output_tokens")


def test_bench_serve_small_load(tmp_path):
    out = tmp_path / "serve.json"
    cmd = [sys.executable, "-m", "kvcomp.cli", "bench", "serve", "--vllm-python", sys.executable, "--loads", "2x256",
           "--methods", "off,stock", "--output-tokens", "8", "--max-model-len", "512", "--enforce-eager",
           "--max-num-batched-tokens", "512",
           "--work", str(tmp_path / "work"), "--out", str(out)]
    # the servers run the native CPU ops, as a user's would (not the Triton interpreter the suite may set)
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "KVCOMP_OPS")}
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["machine"]["line"] and data["commit"] and data["loads"] == ["2x256"]
    rows = {r["method"]: r for r in data["results"]}
    assert list(rows) == ["stock", "off"], "stock runs first so every row gets its ratios"
    for m, r in rows.items():
        assert "error" not in r, (m, r.get("error"))
        for f in FIELDS:
            assert r.get(f) is not None, (m, f)
        assert r["output_tokens"] == 2 * 8 and r["concurrency"] == 2 and r["prompt_tokens"] == 256
        assert 0.0 <= r["accuracy"] <= 1.0 and r["kv_capacity_tokens"] >= 512
    off = rows["off"]
    assert off["stock_decode_tokens_per_s"] == rows["stock"]["decode_tokens_per_s"]
    assert off["decode_vs_stock"] > 0 and off["ttft_vs_stock"] > 0
    assert off["accuracy"] == rows["stock"]["accuracy"], "compression off answers as stock vLLM"
    sys.path.insert(0, str(ROOT / "bench"))
    import report_serve

    text = report_serve.render(data)
    assert "2 requests x 256 prompt tokens" in text and "| off |" in text
