"""Benchmark of the host-mirror ops: native kvcomp._C vs the references (KVCOMP_OPS=native|reference), on the CPU.

Default problem: a 32K-token host mirror with 8 KV heads, d=128, K=1024 selected tokens per head
(A²ATS decode), 32 query heads (GQA 4), batch 1; dense and paged (block 16) layouts; fp32 and bf16.

    python bench/host_mirror.py [--tokens 32768] [--k 1024] [--reps 20] [--out bench/results/host-mirror-cpu.json]

Writes a JSON file with a machine line (python, torch, CPU count, platform, git commit) and, per
case and implementation, the median / p20 / p80 time in ms and the bandwidth of the rows touched.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kvcomp._ext import has_ext, load_ext  # noqa: E402
from kvcomp.ops import host_mirror as hm  # noqa: E402


def machine() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "csrc", "kvcomp/ops"], cwd=ROOT,
                                    capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = "unknown", False
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_count": os.cpu_count(),
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "cpu": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "commit": commit + ("+dirty" if dirty else ""),
        "native_ext": has_ext(),
        "native_build": load_ext().build_info() if has_ext() else None,
    }


def bench(fn, reps: int, warmup: int = 3) -> dict:
    """Median / p20 / p80 wall time in ms, plus the median process CPU time (all threads) in ms.

    On a shared, oversubscribed machine wall time includes waiting for a core; CPU time does not.
    """
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(reps):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    q = torch.quantile(torch.tensor(wall), torch.tensor([0.5, 0.2, 0.8])).tolist()
    return {"ms": round(q[0], 4), "p20": round(q[1], 4), "p80": round(q[2], 4),
            "cpu_ms": round(float(torch.tensor(cpu).median()), 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, nargs="+", default=sorted({1, torch.get_num_threads()}),
                    help="torch intra-op thread counts to run (default: 1 and all)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "host-mirror-cpu.json")
    args = ap.parse_args()
    t, hkv, d, k, bs = args.tokens, args.kv_heads, args.head_dim, args.k, args.block_size
    impls = ["reference"] + (["native"] if has_ext() else [])
    gen = torch.Generator().manual_seed(0)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        es = torch.finfo(dtype).bits // 8
        dense = torch.randn(1, hkv, t, d, generator=gen).to(dtype)
        dense_v = torch.randn(1, hkv, t, d, generator=gen).to(dtype)
        nb = t // bs
        perm = torch.randperm(nb, generator=gen).to(torch.int32)
        paged_k = torch.empty(nb, bs, hkv, d, dtype=dtype)
        paged_v = torch.empty(nb, bs, hkv, d, dtype=dtype)
        paged_k[perm.long()] = dense[0].reshape(hkv, nb, bs, d).permute(1, 2, 0, 3)
        paged_v[perm.long()] = dense_v[0].reshape(hkv, nb, bs, d).permute(1, 2, 0, 3)
        idx = torch.sort(torch.rand(1, hkv, t, generator=gen).topk(k, dim=-1).indices, dim=-1).values.to(torch.int32)
        count = torch.full((1, hkv), k, dtype=torch.int32)
        q = torch.randn(1, hkv * args.group, d, generator=gen).to(dtype)
        gather_bytes = 2 * hkv * k * d * es  # read + write
        attn_bytes = 2 * hkv * k * d * es  # K and V rows read
        cases = {
            "gather_dense": (lambda: hm.gather_tokens(dense[0], idx[0], out_g), gather_bytes),
            "gather_paged": (lambda: hm.gather_tokens(paged_k, idx[0], out_g, block_table=perm), gather_bytes),
            "sparse_attention_dense": (lambda: hm.sparse_attention_host(q, dense, dense_v, idx, count), attn_bytes),
            "sparse_attention_paged": (lambda: hm.sparse_attention_host(q, paged_k, paged_v, idx, count,
                                                                        block_table=perm[None]), attn_bytes),
        }
        out_g = torch.empty(hkv, k, d, dtype=dtype)
        for threads, (name, (fn, nbytes)) in ((th, c) for th in args.threads for c in cases.items()):
            torch.set_num_threads(threads)
            row = {"case": name, "dtype": str(dtype).replace("torch.", ""), "threads": threads, "tokens": t,
                   "kv_heads": hkv, "q_heads": hkv * args.group, "head_dim": d, "k": k,
                   "block_size": bs if "paged" in name else None}
            base = None
            for impl in impls:
                os.environ["KVCOMP_OPS"] = impl
                r = bench(fn, args.reps)
                r["GB/s"] = round(nbytes / (r["ms"] * 1e-3) / 1e9, 2)
                base = base or r
                r["speedup_vs_reference"] = round(base["ms"] / r["ms"], 2)
                r["cpu_speedup_vs_reference"] = round(base["cpu_ms"] / max(r["cpu_ms"], 1e-6), 2)
                row[impl] = r
            if "native" in impls:
                os.environ["KVCOMP_OPS"] = "reference"
                a = fn().clone()  # the gathers write into one buffer
                os.environ["KVCOMP_OPS"] = "native"
                b = fn()
                row["max_abs_diff"] = float((a.float() - b.float()).abs().max())
            results.append(row)
            print(f"{name:24s} {row['dtype']:9s} thr={threads} " + "  ".join(
                f"{impl}: {row[impl]['ms']:8.3f} ms (cpu {row[impl]['cpu_ms']:8.3f}, {row[impl]['GB/s']:6.2f} GB/s, "
                f"x{row[impl]['speedup_vs_reference']})" for impl in impls), flush=True)
    info = machine()
    info["threads_default"] = max(args.threads)
    print("machine:", json.dumps(info))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": info, "config": vars(args) | {"out": str(args.out)},
                                    "results": results}, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
