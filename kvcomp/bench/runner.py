"""``kvcomp bench kernels``: command line, the JSON rewritten after every case, the time budget, progress.

    kvcomp bench kernels                                   # CPU: 8K/32K/128K, batch 1 and 8, fp32 and bf16
    kvcomp bench kernels --contexts 8K,32K --batch 1 --dtypes float32 --reps 5 --budget-s 600
    kvcomp bench kernels --device cuda --kernels duo_decode,vq_decode --contexts 32K,128K --batch 1,16

Every case is timed on its own: an exception is recorded in its row (``error``) and the sweep goes on;
the JSON is rewritten after each case; when ``--budget-s`` is spent the remaining cases are recorded as
``skipped`` and the command exits 0. Imports here stay light (torch is imported when a command runs).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

CPU_CONTEXTS = "8K,32K,128K"
CPU_OUT = Path("bench") / "results" / "kernels-cpu.json"


def parse_ints(s: str | None) -> tuple[int, ...] | None:
    """``"8K,32768,1M"`` -> ``(8192, 32768, 1048576)``; None for an empty value."""
    if not s:
        return None
    out = []
    for tok in s.split(","):
        tok = tok.strip().upper()
        mult = {"K": 1024, "M": 1024 * 1024}.get(tok[-1:], 1)
        try:
            n = int(tok[:-1] if mult > 1 else tok) * mult
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a list of positive integers (8K, 32768, 1M): {s!r}") from None
        if n < 1:
            raise argparse.ArgumentTypeError(f"values must be positive: {s!r}")
        out.append(n)
    return tuple(out)


def _dtype_list(s: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in s.split(",") if x.strip())
    bad = [n for n in names if n not in ("float32", "bfloat16", "float16")]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"dtypes must be among float32, bfloat16, float16, got {s!r}")
    return names


class Recorder:
    """A result file rewritten (atomically) after every row, so an interrupted sweep keeps its rows."""

    def __init__(self, path, header: dict, rows: list | None = None):
        self.path = Path(path)
        self.payload = {**header, "results": list(rows or [])}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.write()

    def add(self, row: dict) -> None:
        self.payload["results"].append(row)
        self.write()

    def write(self) -> None:
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.payload, indent=1, default=str) + "\n")
        os.replace(tmp, self.path)


class Budget:
    """Wall-clock budget of a sweep (``None``: unlimited)."""

    def __init__(self, seconds: float | None):
        self.seconds, self.t0 = seconds, time.perf_counter()

    @property
    def deadline(self) -> float | None:
        return None if self.seconds is None else self.t0 + self.seconds

    def spent(self) -> bool:
        return self.seconds is not None and time.perf_counter() - self.t0 >= self.seconds

    def reason(self) -> str:
        return f"budget: --budget-s {self.seconds:g} spent before this case"


def progress(total: int, desc: str):
    """A tqdm bar on stderr (off when stderr is not a terminal); rows are also printed one per line."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, file=sys.stderr, disable=None, dynamic_ncols=True)


def error_text(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300] if msg else ''}"


def add_bench_parser(sub, parents=()) -> argparse.ArgumentParser:
    """Register ``kvcomp bench`` (and its ``kernels`` subcommand) on the CLI's subparsers."""
    b = sub.add_parser("bench", parents=list(parents),
                       help="standalone benchmarks (kernels: per-layer decode time of every method; "
                            "serve: vLLM-CPU end to end)")
    bsub = b.add_subparsers(dest="bench_cmd", required=True)
    k = bsub.add_parser("kernels", parents=list(parents), description=__doc__,
                        help="decode kernels of every method vs full attention (CPU or CUDA)",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_kernels_args(k)
    k.set_defaults(fn=cmd_kernels)
    from .serve import __doc__ as serve_doc, add_serve_args, cmd_serve

    s = bsub.add_parser("serve", parents=list(parents), description=serve_doc,
                        help="vLLM-CPU end to end: every method against stock vLLM (TTFT, tokens/s, accuracy)",
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_args(s)
    s.set_defaults(fn=cmd_serve)
    return b


def add_kernels_args(k: argparse.ArgumentParser) -> None:
    k.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: cuda when available, else cpu")
    k.add_argument("--contexts", type=parse_ints, default=None,
                   help=f"context lengths, e.g. 8K,32K (CPU default {CPU_CONTEXTS}; CUDA: per kernel)")
    k.add_argument("--batch", type=parse_ints, default=None, help="batch sizes (CPU default 1,8; CUDA: per kernel)")
    k.add_argument("--dtypes", type=_dtype_list, default=None,
                   help="KV dtypes (CPU default float32,bfloat16; CUDA default bfloat16)")
    k.add_argument("--methods", default=None,
                   help="CPU cases, comma-separated (default all: sdpa,off,vllm_cpu,duo50,think,vq3,vq10,duo50+vq3)")
    k.add_argument("--kernels", default=None, help="CUDA registry names, comma-separated (default all)")
    k.add_argument("--reps", type=int, default=10, help="CPU: timed calls per case (median / p20 / p80)")
    k.add_argument("--warmup", type=int, default=2, help="CPU: untimed calls before timing")
    k.add_argument("--budget-s", type=float, default=None, help="stop cleanly after this many seconds")
    k.add_argument("--mem-frac", type=float, default=0.6,
                   help="skip cases whose inputs exceed this share of available (CPU) / free (CUDA) memory")
    k.add_argument("--bw-gib", type=float, default=1.0, help="CPU: size of the read-bandwidth probe (GiB fp32)")
    k.add_argument("--warmup-ms", type=int, default=25, help="CUDA: do_bench warmup (ms)")
    k.add_argument("--rep-ms", type=int, default=100, help="CUDA: do_bench repetition time (ms)")
    k.add_argument("--check", action="store_true", help="CUDA: also check against the reference")
    k.add_argument("--check-max-context", type=int, default=16384)
    k.add_argument("--no-baselines", action="store_true", help="CUDA: skip the full-attention baselines")
    k.add_argument("--append", action="store_true",
                   help="CPU: keep the rows already in --out and add this run's (e.g. 128K after 8K/32K)")
    k.add_argument("--out", default=None, help=f"JSON path (CPU default {CPU_OUT}; CUDA: "
                                               "bench/results/kernels-<gpu>.json)")


def cmd_kernels(a) -> int:
    import torch

    if a.reps < 1 or a.warmup < 0:
        raise ValueError("--reps must be >= 1 and --warmup >= 0")
    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but torch sees no CUDA device")
    budget = Budget(a.budget_s)
    if device == "cpu":
        from kvcomp.bench.cpu import run_cpu

        return run_cpu(a, budget)
    from kvcomp.bench.cuda import run_cuda

    return run_cuda(a, budget)
