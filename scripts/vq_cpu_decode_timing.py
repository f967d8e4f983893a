"""One A²ATS decode layer on the CPU, stage by stage: native kvcomp_C ops vs the reference chain vs torch SDPA.

Llama-3.1-8B attention geometry (32 query / 8 KV heads, D=128), batch 1, fp32, C=256 codes, top-K per
query head as a fraction of the context, sink 8, local 64; paged K/V host mirror and head-major int16
code pages with permuted blocks. Prints median ms (p20-p80) per stage and the machine's read bandwidth
(``torch.ones(2**28).sum()``, 1 GiB). Not a test and not the benchmark suite (``kvcomp bench``):

    .venv/bin/python scripts/vq_cpu_decode_timing.py [--context 32768] [--reps 20]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

from kvcomp import ref
from kvcomp._ext import ext_ops
from kvcomp.ops.vq import topk_kmax
from kvcomp.ref.vq_paged import paged_vq_topk


def timed(fn, reps: int) -> tuple[float, float, float]:
    """(median, p20, p80) wall ms of ``fn()`` over ``reps`` runs after two warm-ups (p20 tracks the
    unloaded time on a shared machine, where a descheduled thread stretches the median)."""
    fn()
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e3)
    ts.sort()
    return statistics.median(ts), ts[int(0.2 * (reps - 1))], ts[int(0.8 * (reps - 1))]


def fmt(r: tuple[float, float, float]) -> str:
    return f"{r[0]:8.3f} ms ({r[1]:.3f}-{r[2]:.3f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's)")
    ap.add_argument("--skip-reference", action="store_true", help="skip the (slow) reference chain")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    hq, hkv, d, nc, bs, t = 32, 8, 128, 256, 16, args.context
    sink, local, scale = 8, 64, 1.0 / math.sqrt(d)
    nb = math.ceil(t / bs)
    table = torch.randperm(nb).to(torch.int32).reshape(1, nb)
    k = torch.randn(nb, bs, hkv, d)
    v = torch.randn(nb, bs, hkv, d)
    codes = torch.randint(0, nc, (nb, hkv, bs), dtype=torch.int16).permute(0, 2, 1)  # head-major pages
    q = torch.randn(1, hq, d)
    codebook = torch.randn(hkv, nc, d)
    whiten = torch.linalg.cholesky(torch.eye(d) + 0.1 * torch.ones(d, d)).expand(hkv, d, d).contiguous()
    seq_lens = torch.tensor([t], dtype=torch.int32)
    ops = ext_ops()  # imports kvcomp._C (raises with the build hint when absent)

    bw_x = torch.ones(2**28)
    bw = timed(lambda: bw_x.sum(), 10)
    del bw_x
    print(f"threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}; read bandwidth {2**30 / bw[0] / 1e6:.1f} GB/s "
          f"(torch.ones(2**28).sum(): {fmt(bw)})")
    print(f"context {t}, Hq {hq}, Hkv {hkv}, D {d}, C {nc}, block {bs}, fp32, batch 1")

    # full attention on the same K/V (dense copy; SDPA cannot read pages)
    kd = k.permute(2, 0, 1, 3).reshape(1, hkv, nb * bs, d)[:, :, :t].contiguous()
    vd = v.permute(2, 0, 1, 3).reshape(1, hkv, nb * bs, d)[:, :, :t].contiguous()
    sdpa = timed(lambda: F.scaled_dot_product_attention(q[:, :, None], kd, vd, enable_gqa=True), args.reps)
    print(f"torch SDPA full attention        {fmt(sdpa)}")
    k_new = torch.randn(1, hkv, d)
    enc = timed(lambda: ops.vq_encode_paged(k_new, codebook, whiten, codes, table, seq_lens,
                                            torch.tensor([0, 1], dtype=torch.int32)), args.reps)
    print(f"native vq_encode_paged (1 token)  {fmt(enc)}  (whitens the {nc}-entry codebook every call)")

    for frac in (0.03, 0.10):
        topk = math.ceil(frac * t)
        topk_t = torch.tensor([topk], dtype=torch.int32)
        kmax = topk_kmax(topk, hq // hkv, sink, local, nb * bs)
        lut = ops.vq_lut(q, codebook, scale)
        idx, count = ops.vq_topk(lut, codes, table, seq_lens, topk_t, sink, local, kmax)
        t_lut = timed(lambda: ops.vq_lut(q, codebook, scale), args.reps)
        t_sel = timed(lambda: ops.vq_topk(lut, codes, table, seq_lens, topk_t, sink, local, kmax), args.reps)
        t_att = timed(lambda: ops.sparse_attention(q, k, v, idx, count, table, scale), args.reps)
        total = t_lut[0] + t_sel[0] + t_att[0]
        mean_count = float(count.float().mean())
        print(f"\ntop-K {frac:.0%} per query head ({topk} tokens; {mean_count:.0f} per KV head after the union)")
        print(f"  native vq_lut                   {fmt(t_lut)}")
        print(f"  native vq_topk (score+select)   {fmt(t_sel)}")
        print(f"  native sparse_attention_host    {fmt(t_att)}")
        print(f"  native total {total:.3f} ms = {sdpa[0] / total:.2f}x SDPA's speed")
        if not args.skip_reference:
            r_lut = timed(lambda: ref.vq_lut(q, codebook, scale=scale), 3)
            r_sel = timed(lambda: paged_vq_topk(lut, codes, table, seq_lens, topk=topk, sink=sink, local=local), 3)
            r_att = timed(lambda: ref.paged_sparse_attention(q, k, v, table, idx, count, scale=scale), 3)
            r_total = r_lut[0] + r_sel[0] + r_att[0]
            print(f"  reference lut / topk / attention {r_lut[0]:.3f} / {r_sel[0]:.3f} / {r_att[0]:.3f} ms, "
                  f"total {r_total:.3f} ms = {sdpa[0] / r_total:.2f}x SDPA's speed")


if __name__ == "__main__":
    main()
