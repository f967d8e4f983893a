"""The CUDA registry runner works on a CPU: --smoke checks each DuoAttention kernel against its reference
(Triton interpreter), bench/run.py timing without CUDA is skipped with a reason, a wrong or crashing kernel
fails the smoke, and the timing rows (op time, CUDA-graph time, baselines, errors) are assembled right."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
DUO = "duo_decode,streaming_prefill,write_paged_kv"


def _run(*args):
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_smoke_duo_kernels(tmp_path):
    out = tmp_path / "smoke.json"
    res = _run("--smoke", "--kernels", DUO, "--out", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads(out.read_text())
    assert data["mode"] == "smoke" and data["machine"]["line"]
    assert [r["kernel"] for r in data["results"]] == DUO.split(",")
    assert all(r["ok"] and r["rel_rms"] <= r["tolerance"] for r in data["results"])
    assert "median_ms" not in json.dumps(data)  # no timing claims in smoke mode


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA skip path")
def test_timing_without_cuda_is_skipped_with_reason(tmp_path):
    out = tmp_path / "t.json"
    res = _run("--kernels", "write_paged_kv", "--out", str(out))
    assert res.returncode == 0
    assert "skipped: timing needs a CUDA device" in res.stdout
    assert not out.exists()


def test_unknown_kernel_is_an_error():
    res = _run("--smoke", "--kernels", "no_such_kernel")
    assert res.returncode != 0 and "unknown kernels" in res.stderr


def test_smoke_detects_a_wrong_kernel(monkeypatch, tmp_path):
    from kvcomp.bench import cuda as runner
    from kvcomp.bench.core import REGISTRY, Bench, Problem

    x = torch.randn(4, 8)
    bad = Bench(name="_bad", description="doubles instead of copying", make=lambda p: x,
                run=lambda t: t * 2, ref=lambda t: t.clone(), nbytes=lambda p: 0,
                smoke=Problem(1, 8, 1, 1, 16, torch.float32, "cpu"))
    crash = Bench(name="_crash", description="raises", make=lambda p: x, run=lambda t: t[99], ref=lambda t: t,
                  nbytes=lambda p: 0, smoke=Problem(1, 8, 1, 1, 16, torch.float32, "cpu"))
    monkeypatch.setitem(REGISTRY, "_bad", bad)
    monkeypatch.setitem(REGISTRY, "_crash", crash)
    assert runner.smoke(["_bad", "_crash"], tmp_path / "bad.json") == 1
    rows = json.loads((tmp_path / "bad.json").read_text())["results"]
    assert [r["ok"] for r in rows] == [False, False]
    assert "IndexError" in rows[1]["error"]


def test_peak_bandwidth_table():
    from kvcomp.bench.core import peak_gbps

    assert peak_gbps("NVIDIA H100 80GB HBM3") == 3350.0
    assert peak_gbps("NVIDIA GH200 480GB") == 4000.0
    assert peak_gbps("NVIDIA H200") == 4800.0
    assert peak_gbps("NVIDIA H100 PCIe") == 2000.0
    assert peak_gbps("NVIDIA A100-SXM4-80GB") == 2039.0
    assert peak_gbps("Some Future GPU") is None


def test_timing_row_assembly_with_a_fake_timer(monkeypatch):
    """The CUDA timing path builds its rows (check, op and graph time, bytes, GB/s over the graph time, %
    peak, baselines, speedups); timers and the memory guard are replaced so it runs on the CPU."""
    import argparse
    import dataclasses

    from kvcomp.bench import cuda as runner
    from kvcomp.bench.methods import REGISTRY

    times = iter([2.0, 4.0, 8.0])
    monkeypatch.setattr(runner, "time_cuda", lambda fn, w, r: (fn(), {"median_ms": next(times), "p20_ms": 1.0,
                                                                      "p80_ms": 3.0})[1])
    monkeypatch.setattr(runner, "time_cuda_graph", lambda fn, r: {"graph_ms": 1.0, "graph_p20_ms": 0.9,
                                                                  "graph_p80_ms": 1.1})
    monkeypatch.setattr(runner, "fits", lambda p, f: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    bench = REGISTRY["streaming_prefill"]
    bench = dataclasses.replace(bench, baselines={"sdpa_flash": bench.baselines["sdpa_flash"],
                                                  "flash_attn": bench.baselines["flash_attn"]})
    args = argparse.Namespace(check=True, check_max_context=1000, warmup_ms=1, rep_ms=1, no_baselines=False,
                              mem_frac=0.5)
    problem = runner.problem_for(bench, bench.smoke, device="cuda" if torch.cuda.is_available() else "cpu")
    row = runner.bench_case(bench, problem, args, peak=1000.0)
    assert row["check"]["ok"]
    assert row["median_ms"] == 2.0 and row["graph_ms"] == 1.0 and row["bytes"] == bench.nbytes(problem)
    assert row["gbps_basis"] == "graph_ms" and abs(row["gbps"] - row["bytes"] / 1e-3 / 1e9) < 1e-12
    assert abs(row["pct_peak_bw"] - row["gbps"] / 10.0) < 1e-12
    assert row["speedup"]["sdpa_flash"] == 2.0
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        assert "unavailable" in row["baselines"]["flash_attn"]
    assert "skipped" not in runner.fmt(row)

    def boom(x):
        raise RuntimeError("kernel exploded\nsecond line")

    row = runner.bench_case(dataclasses.replace(bench, run=boom), problem,
                            argparse.Namespace(**{**vars(args), "check": False}), peak=None)
    assert row["error"] == "RuntimeError: kernel exploded" and "error: RuntimeError" in runner.fmt(row)


def test_cuda_sweep_plan_json_and_budget(monkeypatch, tmp_path):
    """run_cuda's plan (kernels x dtypes x batches x contexts), the JSON rewritten per case and the budget
    skip, with the device name and the per-case timing replaced so it runs without a GPU."""
    import argparse

    from kvcomp.bench import cuda as runner
    from kvcomp.bench.runner import Budget, add_kernels_args

    seen = []

    def fake_case(bench, problem, args, peak):
        seen.append(json.loads((tmp_path / "g.json").read_text())["results"])
        return {"kernel": bench.name, "problem": problem.label(), "median_ms": 1.0, "p20_ms": 1.0, "p80_ms": 1.0,
                "gbps": 1.0, "pct_peak_bw": 100.0 / peak, "speedup": {}}

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "NVIDIA H200")
    monkeypatch.setattr(runner, "bench_case", fake_case)
    k = argparse.ArgumentParser()
    add_kernels_args(k)
    a = k.parse_args(["--kernels", "duo_decode,vq_topk", "--contexts", "32K,128K", "--batch", "1,16",
                      "--out", str(tmp_path / "g.json")])
    assert runner.run_cuda(a, Budget(None)) == 0
    data = json.loads((tmp_path / "g.json").read_text())
    assert data["peak_gbps"] == 4800.0 and "do_bench_cudagraph" in data["timer"]
    assert [r["problem"] for r in data["results"][:2]] == ["B1-T32768-H32/8-D128-bfloat16",
                                                           "B1-T131072-H32/8-D128-bfloat16"]
    assert len(data["results"]) == 8 and [len(s) for s in seen] == list(range(8))
    assert runner.run_cuda(a, Budget(0)) == 0
    rows = json.loads((tmp_path / "g.json").read_text())["results"]
    assert len(rows) == 8 and all(r["skipped"].startswith("budget:") for r in rows)
