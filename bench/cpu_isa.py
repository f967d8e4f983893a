"""Native CPU kernels per ISA: the same decode step timed with ``kvcomp._C.set_cpu_isa`` set to each ISA this
CPU has (generic / avx2 / avx512), side by side on the same tensors.

    python bench/cpu_isa.py                                   # 32K, batch 1, fp32 + bf16 -> bench/results/cpu-isa.json
    python bench/cpu_isa.py --contexts 8192 --threads 2 --reps 9

Cases are those of ``kvcomp bench kernels`` (Llama-3.1-8B layer geometry, kvcomp.bench.methods.CPU_CASES):
``off`` (dense paged decode, native duo_decode with no streaming heads), ``duo50``, ``think`` (native
think_decode) and ``vq3:attn`` (the A²ATS chain's sparse_attention stage alone, on the rows its top-K
selected). The ISAs are interleaved round by round (``--rounds``) so a change of machine load hits each
alike; each row keeps the median of its rounds' medians and the ratios to avx2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from kvcomp import _C
from kvcomp.bench.core import LLAMA31_8B, Problem, machine, observed_impl, time_cpu
from kvcomp.bench.methods import CPU_CASES

OUT = Path(__file__).resolve().parent / "results" / "cpu-isa.json"
CASES = ("off", "duo50", "think", "vq3:attn")


def _runner(name: str, x):
    """The timed call and the native ops it should run, for a case name (``case`` or ``case:stage``)."""
    case_name, _, stage = name.partition(":")
    case = CPU_CASES[case_name]
    if stage:
        return case.stages(x)[stage], tuple(op for op in case.ops if op[0] == stage)
    return (lambda: case.run(x)), case.ops


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="32768")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--isas", default=",".join(_C.cpu_isas()), help="default: every ISA this CPU has")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: least disturbance)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    isas = a.isas.split(",")
    for isa in isas:
        _C.set_cpu_isa(isa)  # ValueError for one this CPU lacks, before any work
    info = machine()
    print(f"[cpu-isa] {info['line']} | commit {info['commit'][:12]} | ISAs {isas} | {a.threads} threads | "
          f"load {info['loadavg_1m']}", flush=True)
    rows = []
    for ctx in (int(c) for c in a.contexts.split(",")):
        for dt in a.dtypes.split(","):
            p = Problem(a.batch, ctx, dtype=getattr(torch, dt), device="cpu", extra={"block_size": 16}, **LLAMA31_8B)
            for name in a.cases.split(","):
                x = CPU_CASES[name.partition(":")[0]].make(p)
                fn, ops = _runner(name, x)
                impl, _ = observed_impl(fn, ops, "cpu")
                per = {isa: [] for isa in isas}
                for _ in range(a.rounds):
                    for isa in isas:
                        _C.set_cpu_isa(isa)
                        per[isa].append(time_cpu(fn, a.reps, warmup=1)["ms"])
                _C.set_cpu_isa("auto")
                row = {"case": name, "context_len": ctx, "batch": a.batch, "dtype": dt, "impl": impl,
                       "ms": {isa: round(statistics.median(v), 4) for isa, v in per.items()},
                       "round_ms": {isa: [round(t, 4) for t in v] for isa, v in per.items()}}
                if "avx2" in row["ms"]:
                    row["vs_avx2"] = {isa: round(row["ms"]["avx2"] / ms, 3) for isa, ms in row["ms"].items()}
                rows.append(row)
                print(f"{name:>9} T={ctx} B={a.batch} {dt:<8} [{impl}] "
                      + "  ".join(f"{isa} {ms:8.3f} ms" for isa, ms in row["ms"].items())
                      + ("  | avx2/x: " + " ".join(f"{k} {v:.2f}" for k, v in row["vs_avx2"].items())
                         if "vs_avx2" in row else ""), flush=True)
                del x, fn
    info["loadavg_1m_end"] = round(__import__("os").getloadavg()[0], 2)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"command": " ".join(sys.argv), "machine": info, "threads": a.threads,
                               "timer": f"time.perf_counter, 1 warmup + {a.reps} calls per round, median; "
                                        f"{a.rounds} rounds interleaving the ISAs, median of the rounds",
                               "results": rows}, indent=1) + "\n")
    print(f"[cpu-isa] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
