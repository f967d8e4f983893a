"""ThinK decode on the CPU at Llama-3.1-8B attention geometry (one layer): native vs reference vs full attention.

    .venv/bin/python scripts/think_decode_cpu_numbers.py [--contexts 8192 32768] [--reps 20]

Per (context, dtype), batch 1, 32 query / 8 KV heads, D=128, ThinK lambda=0.4 (Dk = 80 as ThinK stores it,
77 with --channel-multiple 1), ring W=32, block
size 16 with permuted blocks: the median wall time (p20 / p80) of torch.ops.kvcomp_C.think_decode, of the
reference kvcomp.ref.think_paged.paged_pruned_key_attention, of torch SDPA over contiguous full K/V
(enable_gqa), and of kvcomp's native dense paged decode torch.ops.kvcomp_C.duo_decode (no streaming heads)
on the same token count; GB/s of the bytes each must read, against the machine's read bandwidth measured
here (median of summing a 1 GiB fp32 tensor). A number printer for reports, not a test.
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch

from kvcomp._ext import load_ext
from kvcomp.ref.duo import duo_head_map
from kvcomp.ref.think import think_kept_dim
from kvcomp.ref.think_paged import paged_pruned_key_attention

HQ, HKV, D, BS, W = 32, 8, 128, 16, 32


def timed(fns: dict, reps: int, clock=time.perf_counter) -> dict:
    """{name: (median, p20, p80) ms} after one warm-up call each; the calls are interleaved round-robin so
    every function sees the same machine load (this machine is shared)."""
    ts = {k: [] for k in fns}
    for fn in fns.values():
        fn()
    for _ in range(reps):
        for k, fn in fns.items():
            t = clock()
            fn()
            ts[k].append((clock() - t) * 1e3)
    out = {}
    for k, v in ts.items():
        q = statistics.quantiles(v, n=10) if len(v) > 1 else [v[0]] * 9
        out[k] = (statistics.median(v), q[1], q[7])
    return out


def read_bandwidth(reps: int, clock) -> float:
    x = torch.ones(2**28)
    ms = timed({"sum": lambda: x.sum()}, reps, clock)["sum"][0]
    return x.numel() * 4 / ms / 1e6


def problem(t: int, dtype: torch.dtype, gen: torch.Generator, dk: int) -> dict:
    nb = math.ceil(t / BS)
    r = lambda *s: torch.randn(*s, generator=gen).to(dtype)  # noqa: E731
    bt = torch.randperm(nb, generator=gen).to(torch.int32)[None]
    chan = torch.randperm(D, generator=gen)[:dk].sort().values.expand(1, HKV, dk).contiguous()
    return dict(q=r(1, HQ, D), kp=r(nb, BS, HKV, dk), chan=chan, kr=r(1, HKV, W, D), v=r(nb, BS, HKV, D),
                k_full=r(nb, BS, HKV, D), bt=bt, lens=torch.tensor([t], dtype=torch.int32),
                k_dense=r(1, HKV, t, D), v_dense=r(1, HKV, t, D))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", type=int, nargs="+", default=[8192, 32768])
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--ref-reps", type=int, default=3)
    ap.add_argument("--channel-multiple", type=int, default=16, help="ThinK's kept channels rounded up to this")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with the process CPU clock instead of the wall clock (for 1 thread on a loaded machine)")
    args = ap.parse_args()
    dk = think_kept_dim(D, 0.4, args.channel_multiple)
    clock = time.process_time if args.cpu_time else time.perf_counter
    ops = load_ext() and torch.ops.kvcomp_C
    has_dense = hasattr(ops, "duo_decode")
    scale = 1 / math.sqrt(D)
    bw = read_bandwidth(10, clock)
    print(f"threads {torch.get_num_threads()}  clock {clock.__name__}  load {os.getloadavg()[0]:.1f}  "
          f"read bandwidth {bw:.1f} GB/s "
          f"(sum of 1 GiB fp32)  Dk={dk} W={W}")
    print(f"{'ctx':>6} {'dtype':>8} | {'think ms (p20-p80)':>22} {'GB/s':>6} {'%bw':>4} | {'ref ms':>8} "
          f"{'sdpa ms':>8} {'dense ms':>8} | {'x ref':>6} {'x sdpa':>6} {'x dense':>7}")
    for t in args.contexts:
        for name in args.dtypes:
            dtype = getattr(torch, name)
            x = problem(t, dtype, torch.Generator().manual_seed(t), dk)
            think_args = (x["q"], x["kp"], x["chan"], x["kr"], x["v"], x["bt"], x["lens"])
            esz = x["v"].element_size()
            nbytes = HKV * (max(t - W, 0) * dk + min(t, W) * D + t * D) * esz
            qd = x["q"][:, :, None]
            fns = {"think": lambda: ops.think_decode(*think_args, scale, 0, 0),
                   "sdpa": lambda: torch.nn.functional.scaled_dot_product_attention(
                       qd, x["k_dense"], x["v_dense"], enable_gqa=True)}
            if has_dense:
                empty = x["q"].new_empty(1, 0, 1, D)
                hm = duo_head_map(torch.zeros(HKV, dtype=torch.bool))
                fns["dense"] = lambda: ops.duo_decode(x["q"], x["k_full"], x["v"], x["bt"], x["lens"], empty, empty,
                                                      hm, 0, 1, scale, 0)
            r = timed(fns, args.reps, clock)
            ms, p20, p80 = r["think"]
            sdpa_ms, dense_ms = r["sdpa"][0], r.get("dense", (float("nan"),))[0]
            ref_ms = timed({"ref": lambda: paged_pruned_key_attention(*think_args, scale=scale)}, args.ref_reps,
                           clock)["ref"][0]
            gbps = nbytes / ms / 1e6
            print(f"{t:>6} {name:>8} | {ms:8.2f} ({p20:5.2f}-{p80:5.2f}) {gbps:6.1f} {100 * gbps / bw:4.0f} | "
                  f"{ref_ms:8.1f} {sdpa_ms:8.2f} {dense_ms:8.2f} | {ref_ms / ms:6.1f} {sdpa_ms / ms:6.2f} "
                  f"{dense_ms / ms:7.2f}")


if __name__ == "__main__":
    main()
