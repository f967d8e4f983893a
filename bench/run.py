"""The kernel benchmark runner (one runner for every entry of ``bench/registry.py``).

    python bench/run.py --smoke                       # CPU: tiny shapes, Triton interpreter, vs reference
    python bench/run.py                               # CUDA: default sweep of every registered kernel
    python bench/run.py --kernels duo_decode --contexts 4096,65536 --batches 1,8 --check

Timing (CUDA only): ``triton.testing.do_bench`` with quantiles (median, p20, p80); it clears the L2 cache
before every repetition (cold L2). Reported per case: ms, GB/s over the bytes the kernel must move
(``Bench.nbytes``), % of the device's peak HBM bandwidth (``registry.PEAK_GBPS``; null when unknown) and
speedup against each full-attention baseline (baseline median / kernel median). Output: JSON
``bench/results/kernels-<device>.json`` with a machine line and the git commit. Without CUDA a timing
run is skipped with its reason (exit 0) and writes nothing; ``--smoke`` makes no timing claims.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _machine() -> dict:
    try:
        from kvcomp.utils.machine import git_commit, machine_info

        info = machine_info()
        info["commit"] = git_commit(str(ROOT))
        return info
    except Exception as e:  # the machine line must never stop a benchmark
        import platform

        import torch

        dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
        return {"device": dev, "torch": torch.__version__, "cuda": torch.version.cuda,
                "python": platform.python_version(), "commit": "unknown",
                "line": f"{dev} | torch {torch.__version__} (machine_info unavailable: {e})"}


def _problem(bench, base, **over):
    """``base`` with the bench defaults merged under its extra, then fields overridden."""
    p = dataclasses.replace(base, extra={**bench.defaults, **base.extra})
    return dataclasses.replace(p, **over) if over else p


def _compare(bench, problem, ratio=None) -> dict:
    """Reference first (in-place kernels must not influence it), then the kernel; relative-RMS check."""
    import torch

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
    """Run every selected kernel once on its tiny CPU (or CUDA) problem and compare with its reference."""
    import torch

    from bench.registry import REGISTRY

    rows, failed = [], 0
    for name in names:
        bench = REGISTRY[name]
        dev = "cuda" if torch.cuda.is_available() else "cpu"
        problem = _problem(bench, bench.smoke, device=dev)
        t0 = time.perf_counter()
        res = _compare(bench, problem)
        res.update(kernel=name, problem=problem.label(), wall_s=round(time.perf_counter() - t0, 2))
        failed += not res["ok"]
        rows.append(res)
        print(f"{'ok  ' if res['ok'] else 'FAIL'} {name:24s} {problem.label():34s} rel_rms={res['rel_rms']:.2e} "
              f"max_abs={res['max_abs']:.2e} ({res['wall_s']} s, no timing in smoke mode)")
    if out_path:
        _write(out_path, {"mode": "smoke", "machine": _machine(), "results": rows})
    return 1 if failed else 0


def _time(fn, warmup, rep):
    import triton.testing

    med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
    return {"median_ms": med, "p20_ms": p20, "p80_ms": p80}


def _fits(problem, frac) -> str | None:
    """Skip reason when the dense full-attention KV of this problem would not fit in ``frac`` of free memory."""
    import torch

    free, _ = torch.cuda.mem_get_info()
    need = 2 * problem.batch * problem.hkv * problem.context * problem.d * problem.elt
    if need > frac * free:
        return f"needs ~{need / 2**30:.1f} GiB of KV, {free / 2**30:.1f} GiB free"
    return None


def bench_case(bench, problem, args, peak) -> dict:
    import torch

    row = {"kernel": bench.name, "problem": problem.label(), "batch": problem.batch, "context": problem.context,
           "hq": problem.hq, "hkv": problem.hkv, "d": problem.d, "dtype": str(problem.dtype).replace("torch.", ""),
           "extra": problem.extra}
    reason = _fits(problem, args.mem_frac)
    if reason:
        row["skipped"] = reason
        return row
    try:
        if args.check and problem.context <= args.check_max_context:
            row["check"] = _compare(bench, problem)
        inputs = bench.make(problem)
        row.update(_time(lambda: bench.run(inputs), args.warmup, args.rep))
        del inputs
    except torch.cuda.OutOfMemoryError as e:
        row["skipped"] = f"out of memory: {str(e).splitlines()[0]}"
        return row
    finally:
        torch.cuda.empty_cache()
    nbytes = bench.nbytes(problem)
    row["bytes"] = nbytes
    row["gbps"] = nbytes / (row["median_ms"] * 1e-3) / 1e9
    row["pct_peak_bw"] = None if peak is None else 100.0 * row["gbps"] / peak
    row["baselines"], row["speedup"] = {}, {}
    for bname, base in ({} if args.no_baselines else bench.baselines).items():
        try:
            x = base.make(problem)
            t = _time(lambda: base.run(x), args.warmup, args.rep)
            del x
            row["baselines"][bname] = t
            row["speedup"][bname] = t["median_ms"] / row["median_ms"]
        except Exception as e:  # unavailable backend / shape / OOM: record why
            row["baselines"][bname] = {"unavailable": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
        finally:
            torch.cuda.empty_cache()
    return row


def _fmt(row) -> str:
    if "skipped" in row:
        return f"{row['kernel']:20s} {row['problem']:36s} skipped: {row['skipped']}"
    pct = "  n/a" if row["pct_peak_bw"] is None else f"{row['pct_peak_bw']:5.1f}"
    sp = " ".join(f"{k}={v:.2f}x" for k, v in row["speedup"].items())
    chk = "" if "check" not in row else (" check=ok" if row["check"]["ok"] else " check=FAIL")
    return (f"{row['kernel']:20s} {row['problem']:36s} {row['median_ms']:9.4f} ms "
            f"[{row['p20_ms']:.4f}, {row['p80_ms']:.4f}] {row['gbps']:8.1f} GB/s {pct}% peak  {sp}{chk}")


def _write(path, payload) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str))
    print(f"wrote {path}")


def _ints(s: str | None):
    return None if not s else tuple(int(x) for x in s.split(","))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kernels", help="comma-separated registry names (default: all)")
    ap.add_argument("--contexts", help="comma-separated context lengths (default: per kernel)")
    ap.add_argument("--batches", help="comma-separated batch sizes (default: per kernel)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, interpreter on CPU, check vs reference")
    ap.add_argument("--check", action="store_true", help="also check against the reference (small contexts)")
    ap.add_argument("--check-max-context", type=int, default=16384)
    ap.add_argument("--no-baselines", action="store_true")
    ap.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    ap.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    ap.add_argument("--mem-frac", type=float, default=0.35, help="skip cases whose dense KV exceeds this share of free memory")
    ap.add_argument("--out", help="JSON path (default bench/results/kernels-<device>.json; smoke: none)")
    ap.add_argument("--list", action="store_true", help="list the registered kernels and exit")
    args = ap.parse_args(argv)

    import torch

    if args.smoke and not torch.cuda.is_available():
        # must happen before any kernels.* module is imported (the registry imports them lazily)
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    from bench.registry import REGISTRY, Problem, peak_gbps

    names = list(REGISTRY) if not args.kernels else args.kernels.split(",")
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        ap.error(f"unknown kernels {unknown}; registered: {list(REGISTRY)}")
    if args.list:
        for n in names:
            print(f"{n:24s} {REGISTRY[n].description}")
        return 0
    if args.smoke:
        return smoke(names, args.out)
    if not torch.cuda.is_available():
        print("skipped: timing needs a CUDA device (run with --smoke for the CPU correctness check)")
        return 0

    machine = _machine()
    dev_name = torch.cuda.get_device_name(0)
    peak = peak_gbps(dev_name)
    print(machine.get("line", dev_name), "| commit", machine.get("commit"))
    print(f"peak HBM bandwidth: {peak} GB/s")
    dtype = getattr(torch, args.dtype)
    rows = []
    for name in names:
        bench = REGISTRY[name]
        for b in _ints(args.batches) or bench.batches:
            for t in _ints(args.contexts) or bench.contexts:
                problem = _problem(bench, Problem(b, t, dtype=dtype, device="cuda"))
                row = bench_case(bench, problem, args, peak)
                rows.append(row)
                print(_fmt(row), flush=True)
    slug = re.sub(r"[^a-z0-9]+", "-", dev_name.lower()).strip("-")
    out = args.out or ROOT / "bench" / "results" / f"kernels-{slug}.json"
    _write(out, {"mode": "timing", "machine": machine, "peak_gbps": peak, "timer": "triton.testing.do_bench "
                 "(cold L2, quantiles 0.5/0.2/0.8)", "results": rows})
    return 1 if any("check" in r and not r["check"]["ok"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
