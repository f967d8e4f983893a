"""The CPU sweep of ``kvcomp bench kernels``: every case of :data:`kvcomp.bench.core.CPU_CASES` at the
Llama-3.1-8B attention geometry of one layer (32 query / 8 KV heads, D=128, paged blocks of 16) for each
context x batch x dtype, timed with ``time.perf_counter`` through the public ``kvcomp.ops`` entry points
(whatever implementation the dispatch picks; the row's ``impl`` says which ran, observed with the
profiler, and ``impl_for`` what the dispatch rule predicts).

The machine's read bandwidth is measured in the same run (median of timed ``x.sum()`` over a 1 GiB fp32
tensor) and every row's ``pct_read_bw`` is relative to it. Only one case's tensors are alive at a time.
"""

from __future__ import annotations

import gc
import json
import sys
import time
from pathlib import Path

import torch

from kvcomp.bench.core import (BYTE_MODEL, LLAMA31_8B, Problem, machine, observed_impl,
                               read_bandwidth_gbps, time_cpu)
from kvcomp.bench.runner import CPU_CONTEXTS, CPU_OUT, Budget, Recorder, error_text, parse_ints, progress
from kvcomp.vllm_plugin.mirror import available_host_bytes as mem_available  # one home: /proc/meminfo

LLAMA = LLAMA31_8B
FIELDS = ("method", "context_len", "batch", "dtype", "ms", "p20_ms", "p80_ms", "full_sdpa_ms", "dense_paged_ms",
          "speedup_vs_sdpa", "speedup_vs_dense", "bytes", "gbps", "pct_read_bw", "read_bw_gbps", "impl")


def _finish(row: dict, base: dict, bw: float) -> None:
    """Derived fields: GB/s, % of read bandwidth, the group's SDPA / dense times and speedups."""
    row["read_bw_gbps"] = round(bw, 2)
    row["full_sdpa_ms"], row["dense_paged_ms"] = base.get("sdpa"), base.get("off")
    ms = row.get("ms")
    ok = ms is not None and ms > 0
    row["gbps"] = round(row["bytes"] / (ms * 1e-3) / 1e9, 6) if ok and row.get("bytes") else None
    row["pct_read_bw"] = round(100.0 * row["gbps"] / bw, 4) if row["gbps"] is not None else None
    row["speedup_vs_sdpa"] = round(row["full_sdpa_ms"] / ms, 3) if ok and row["full_sdpa_ms"] else None
    row["speedup_vs_dense"] = round(row["dense_paged_ms"] / ms, 3) if ok and row["dense_paged_ms"] else None


def run_case(case, p: Problem, args, budget: Budget) -> dict:
    """Time one case; every failure (including a skip for memory) ends up in the returned row."""
    row = {k: None for k in FIELDS}
    row.update(method=case.name, context_len=p.context, batch=p.batch, dtype=str(p.dtype).replace("torch.", ""))
    avail = mem_available()
    need = case.kv_bytes(p)
    if avail is not None and need > args.mem_frac * avail:
        row["skipped"] = (f"memory: inputs need ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available "
                          f"(--mem-frac {args.mem_frac})")
        return row
    x = None
    t0 = time.perf_counter()
    try:
        x = case.make(p)
        if case.ops:  # one untimed call under the profiler: which implementation each op ran
            row["impl"], row["impl_for"] = observed_impl(lambda: case.run(x), case.ops, p.device)
        else:
            row["impl"] = case.label
        t = time_cpu(lambda: case.run(x), args.reps, args.warmup, deadline=budget.deadline)
        row.update({k: round(v, 4) if isinstance(v, float) else v for k, v in t.items()})
        row["bytes"] = int(case.nbytes(p, x))
        if case.stages is not None:
            row["stage_ms"] = {k: round(time_cpu(fn, args.reps, 1, deadline=budget.deadline)["ms"], 4)
                               for k, fn in case.stages(x).items()}
    except Exception as e:  # recorded, the sweep goes on
        row["error"] = error_text(e)
    finally:
        del x
        gc.collect()
    row["wall_s"] = round(time.perf_counter() - t0, 2)
    return row


def _line(row: dict) -> str:
    head = f"{row['method']:>10} T={row['context_len']:<7} B={row['batch']:<2} {row['dtype']:<8}"
    if row.get("skipped") or row.get("error"):
        return f"{head} {'skipped' if row.get('skipped') else 'error'}: {row.get('skipped') or row.get('error')}"

    def f(v, spec):
        return "  n/a" if v is None else format(v, spec)

    return (f"{head} {row['ms']:9.3f} ms [{row['p20_ms']:.3f}, {row['p80_ms']:.3f}] {f(row['gbps'], '7.2f')} GB/s "
            f"{f(row['pct_read_bw'], '5.1f')}% bw  x{f(row['speedup_vs_sdpa'], '.2f')} sdpa  "
            f"x{f(row['speedup_vs_dense'], '.2f')} dense  [{row['impl']}]")


def run_cpu(args, budget: Budget) -> int:
    from kvcomp.bench.methods import CPU_CASES

    names = [n.strip() for n in args.methods.split(",")] if args.methods else list(CPU_CASES)
    unknown = [n for n in names if n not in CPU_CASES]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {list(CPU_CASES)}")
    contexts = args.contexts or parse_ints(CPU_CONTEXTS)
    batches = args.batch or (1, 8)
    dtypes = args.dtypes or ("float32", "bfloat16")
    info = machine()
    print(f"[kvcomp bench] {info['line']} | commit {info['commit'][:12]} | kvcomp._C {info['kvcomp_C']} "
          f"(native ops: {', '.join(info['native_ops']) or 'none'}) | {info['threads']} threads", flush=True)
    bw = read_bandwidth_gbps(args.bw_gib, reps=5)
    print(f"[kvcomp bench] read bandwidth: {bw:.1f} GB/s (median x.sum() over {args.bw_gib:g} GiB fp32)", flush=True)
    out = Path(args.out or CPU_OUT)
    prior = json.loads(out.read_text()) if args.append and out.exists() else {}
    if prior and prior.get("mode") != "cpu":
        raise ValueError(f"--append: {out} is not a CPU kernels result (mode {prior.get('mode')!r})")
    run = {"command": " ".join(sys.argv), "commit": info["commit"], "read_bw_gbps": round(bw, 2),
           "loadavg_1m": info["loadavg_1m"], "budget_s": args.budget_s,
           "timer": f"time.perf_counter, {args.warmup} warmup + {args.reps} timed calls: median / p20 / p80 ms"}
    rec = Recorder(out, {
        "mode": "cpu", "machine": info, "geometry": dict(LLAMA, block_size=16, layers=1, q_len=1),
        "read_bw_probe": f"median of timed x.sum() over a {args.bw_gib:g} GiB fp32 tensor, same run",
        "byte_model": BYTE_MODEL,
        "methods": {**prior.get("methods", {}), **{n: CPU_CASES[n].description for n in names}},
        "runs": prior.get("runs", []) + [run], **run}, prior.get("results", []))
    plan = [(t, b, dt, n) for t in contexts for b in batches for dt in dtypes for n in names]
    base: dict[tuple, dict] = {}  # (T, B, dtype) -> {"sdpa": ms, "off": ms}
    done: dict[tuple, list] = {}  # (T, B, dtype) -> its rows so far
    bar = progress(len(plan), "kvcomp bench kernels")
    for t, b, dt, name in plan:
        p = Problem(b, t, dtype=getattr(torch, dt), device="cpu", extra={"block_size": 16}, **LLAMA)
        group, rows = base.setdefault((t, b, dt), {}), done.setdefault((t, b, dt), [])
        if budget.spent():
            row = {k: None for k in FIELDS}
            row.update(method=name, context_len=t, batch=b, dtype=dt, skipped=budget.reason())
        else:
            row = run_case(CPU_CASES[name], p, args, budget)
            if row.get("ms") is not None and name in ("sdpa", "off"):
                group[name] = row["ms"]
        rows.append(row)
        for r in rows if name in ("sdpa", "off") else [row]:  # a baseline updates its group's earlier rows
            if r.get("ms") is not None:
                _finish(r, group, bw)
        rec.add(row)
        bar.update(1)
        if bar.disable:
            print(_line(row), flush=True)
        else:
            bar.write(_line(row))
    bar.close()
    if not budget.spent():
        run["read_bw_end_gbps"] = round(read_bandwidth_gbps(args.bw_gib, reps=5), 2)
    run["wall_s"] = round(time.perf_counter() - budget.t0, 1)
    rec.payload.update(run)
    rec.write()
    print(f"[kvcomp bench] wrote {rec.path}", flush=True)
    return 0
