"""The CUDA sweep of ``kvcomp bench kernels`` (and of ``bench/run.py``) over the registered Triton
benches, and the ``--smoke`` correctness check (tiny shapes, the interpreter on the CPU).

Timing: ``triton.testing.do_bench`` (cold L2, median / p20 / p80) of the whole Python op, and the kernel
time alone with ``triton.testing.do_bench_cudagraph`` (the op captured in a CUDA graph; a capture
failure is recorded as ``graph_error``). Per case: bytes (``Bench.nbytes``), GB/s, % of the device's
peak HBM bandwidth, speedups against each full-attention baseline. Errors are recorded per case.
"""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

import torch

from kvcomp.bench.core import Problem, machine, peak_gbps, time_cuda, time_cuda_graph
from kvcomp.bench.runner import Budget, Recorder, error_text, progress


def problem_for(bench, base: Problem, **over) -> Problem:
    """``base`` with the bench defaults merged under its extra, then fields overridden."""
    p = dataclasses.replace(base, extra={**bench.defaults, **base.extra})
    return dataclasses.replace(p, **over) if over else p


def compare(bench, problem: Problem, ratio: float | None = None) -> dict:
    """Reference first (in-place kernels must not influence it), then the kernel; relative-RMS check."""
    from kvcomp.testing import error_stats

    inputs = bench.make(problem)
    ref = bench.ref(inputs)
    out = bench.output(inputs, bench.run(inputs))
    if problem.device == "cuda":
        torch.cuda.synchronize()
    max_abs, rel = error_stats(ref.float(), out.float())
    tol = ratio if ratio is not None else (1e-5 if problem.dtype == torch.float32 else bench.ratio)
    nan = bool(torch.isnan(out.float()).any()) and not bool(torch.isnan(ref.float()).any())
    return {"max_abs": max_abs, "rel_rms": rel, "tolerance": tol, "ok": bool(rel <= tol and not nan)}


def smoke(names, out_path=None) -> int:
    """Run every selected bench once on its tiny CPU (or CUDA) problem and compare with its reference."""
    from kvcomp.bench.methods import REGISTRY

    rec = Recorder(out_path, {"mode": "smoke", "machine": machine()}) if out_path else None
    failed = 0
    for name in names:
        bench = REGISTRY[name]
        problem = problem_for(bench, bench.smoke, device="cuda" if torch.cuda.is_available() else "cpu")
        t0 = time.perf_counter()
        try:
            res = compare(bench, problem)
        except Exception as e:  # a crash is a failed check, recorded with its reason
            res = {"ok": False, "error": error_text(e), "rel_rms": float("nan"), "max_abs": float("nan")}
        res.update(kernel=name, problem=problem.label(), wall_s=round(time.perf_counter() - t0, 2))
        failed += not res["ok"]
        if rec is not None:
            rec.add(res)
        print(f"{'ok  ' if res['ok'] else 'FAIL'} {name:24s} {problem.label():34s} rel_rms={res['rel_rms']:.2e} "
              f"max_abs={res['max_abs']:.2e} ({res['wall_s']} s, no timing in smoke mode)"
              + (f" {res['error']}" if "error" in res else ""))
    return 1 if failed else 0


def fits(problem: Problem, frac: float) -> str | None:
    """Skip reason when the dense full-attention KV of this problem would not fit in ``frac`` of free memory."""
    free, _ = torch.cuda.mem_get_info()
    need = 2 * problem.batch * problem.hkv * problem.context * problem.d * problem.elt
    if need > frac * free:
        return f"needs ~{need / 2**30:.1f} GiB of KV, {free / 2**30:.1f} GiB free"
    return None


def bench_case(bench, problem: Problem, args, peak: float | None) -> dict:
    """One timed case: op time, kernel (CUDA graph) time, bytes, GB/s, baselines; errors recorded."""
    row = {"kernel": bench.name, "problem": problem.label(), "batch": problem.batch, "context": problem.context,
           "hq": problem.hq, "hkv": problem.hkv, "d": problem.d, "dtype": str(problem.dtype).replace("torch.", ""),
           "extra": problem.extra}
    reason = fits(problem, args.mem_frac)
    if reason:
        row["skipped"] = reason
        return row
    try:
        if args.check and problem.context <= args.check_max_context:
            row["check"] = compare(bench, problem)
        inputs = bench.make(problem)
        row.update(time_cuda(lambda: bench.run(inputs), args.warmup_ms, args.rep_ms))
        try:
            row.update(time_cuda_graph(lambda: bench.run(inputs), args.rep_ms))
        except Exception as e:  # a host sync in the op: no kernel-only time
            row["graph_error"] = error_text(e)
        del inputs
    except Exception as e:
        row["error"] = error_text(e)
        return row
    finally:
        torch.cuda.empty_cache()
    nbytes = bench.nbytes(problem)
    row["bytes"] = nbytes
    best = row.get("graph_ms") or row["median_ms"]
    row["gbps"] = nbytes / (best * 1e-3) / 1e9
    row["gbps_basis"] = "graph_ms" if row.get("graph_ms") else "median_ms"
    row["pct_peak_bw"] = None if peak is None else 100.0 * row["gbps"] / peak
    row["baselines"], row["speedup"] = {}, {}
    for bname, base in ({} if args.no_baselines else bench.baselines).items():
        try:
            x = base.make(problem)
            t = time_cuda(lambda: base.run(x), args.warmup_ms, args.rep_ms)
            del x
            row["baselines"][bname] = t
            row["speedup"][bname] = t["median_ms"] / row["median_ms"]
        except Exception as e:  # unavailable backend / shape / OOM: record why
            row["baselines"][bname] = {"unavailable": error_text(e)}
        finally:
            torch.cuda.empty_cache()
    return row


def fmt(row: dict) -> str:
    if "skipped" in row or "error" in row:
        return f"{row['kernel']:20s} {row['problem']:36s} {'skipped' if 'skipped' in row else 'error'}: " \
               f"{row.get('skipped') or row.get('error')}"
    pct = "  n/a" if row["pct_peak_bw"] is None else f"{row['pct_peak_bw']:5.1f}"
    sp = " ".join(f"{k}={v:.2f}x" for k, v in row["speedup"].items())
    chk = "" if "check" not in row else (" check=ok" if row["check"]["ok"] else " check=FAIL")
    graph = f" graph {row['graph_ms']:.4f} ms" if row.get("graph_ms") else ""
    return (f"{row['kernel']:20s} {row['problem']:36s} {row['median_ms']:9.4f} ms "
            f"[{row['p20_ms']:.4f}, {row['p80_ms']:.4f}]{graph} {row['gbps']:8.1f} GB/s {pct}% peak  {sp}{chk}")


def run_cuda(args, budget: Budget) -> int:
    """The registry sweep on CUDA; JSON ``bench/results/kernels-<gpu>.json`` rewritten after every case."""
    from kvcomp.bench.methods import REGISTRY

    names = list(REGISTRY) if not args.kernels else [n.strip() for n in args.kernels.split(",")]
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown kernels {unknown}; registered: {list(REGISTRY)}")
    info = machine()
    dev_name = torch.cuda.get_device_name(0)
    peak = peak_gbps(dev_name)
    print(info["line"], "| commit", info["commit"], f"| peak HBM bandwidth: {peak} GB/s", flush=True)
    slug = re.sub(r"[^a-z0-9]+", "-", dev_name.lower()).strip("-")
    rec = Recorder(args.out or Path("bench") / "results" / f"kernels-{slug}.json", {
        "mode": "timing", "machine": info, "peak_gbps": peak,
        "timer": "triton.testing.do_bench (cold L2, quantiles 0.5/0.2/0.8) of the op; "
                 "triton.testing.do_bench_cudagraph of the op in a CUDA graph (graph_ms)",
        "budget_s": args.budget_s})
    dtypes = args.dtypes or ("bfloat16",)
    plan = [(REGISTRY[n], b, t, dt) for n in names for dt in dtypes for b in (args.batch or REGISTRY[n].batches)
            for t in (args.contexts or REGISTRY[n].contexts)]
    bar = progress(len(plan), "kvcomp bench kernels (cuda)")
    for bench, b, t, dt in plan:
        problem = problem_for(bench, Problem(b, t, dtype=getattr(torch, dt), device="cuda"))
        if budget.spent():
            row = {"kernel": bench.name, "problem": problem.label(), "batch": b, "context": t, "dtype": dt,
                   "skipped": budget.reason()}
        else:
            row = bench_case(bench, problem, args, peak)
        rec.add(row)
        bar.update(1)
        print(fmt(row), flush=True)
    bar.close()
    print(f"wrote {rec.path}")
    return 1 if any("check" in r and not r["check"]["ok"] for r in rec.payload["results"]) else 0
