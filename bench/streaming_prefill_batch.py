"""DuoAttention's streaming heads over a step of several multi-token requests on the CPU:
``StreamingHeads.prefill`` (one varlen ``torch.ops.kvcomp_C.streaming_prefill`` call for every
request, index tensors built once per step and shared by its layers) against the per-request loop it
replaced (:func:`per_request`, the method body at e33ae97: a ring gather, a ``cat``, one native call
and a ring write per request), same rings, same q / k / v, timed interleaved in one process.

A "step" is ``--layers`` layers (each its own ring, one shared :class:`~kvcomp.methods.step.Step`),
as a model forward runs them; ms are per step. Cases: SmolLM2 geometry (2 streaming KV heads of 3,
GQA 3, D=64) and Llama-3.1-8B geometry (4 of 8, GQA 4, D=128), sink 64 / recent 256
(kvcomp.defaults), fresh prompts and chunks over a full ring.

Each case runs with 1 intra-op thread and with torch's default (both cores here): on a loaded
machine every ATen op that opens a parallel region waits for a second thread to be scheduled (a
tiny ``repeat_interleave`` took 6.8 ms with 2 threads vs 6 us with 1 at load 7.5), which inflates
the per-request loop's many small ops and is part of what one call per step removes.

    python bench/streaming_prefill_batch.py [--reps 5] [--layers 4] [--threads 1,2]
        [--out bench/results/streaming-prefill-batch.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kvcomp.bench.core import machine  # noqa: E402
from kvcomp.defaults import DUO_RECENT, DUO_SINK  # noqa: E402
from kvcomp.methods.duo import StreamingHeads, ring_kept, ring_slot  # noqa: E402
from kvcomp.methods.step import Step, Store  # noqa: E402
from kvcomp.ops.prefill import streaming_prefill  # noqa: E402

CASES = [  # (name, streaming KV heads, GQA, D, context before the step per request, new tokens per request)
    ("smollm2 4 x 1K prompts", 2, 3, 64, [0] * 4, [1024] * 4),
    ("smollm2 8 x 256 chunk on 2K", 2, 3, 64, [2048] * 8, [256] * 8),
    ("smollm2 8 x 16 rows on 1K", 2, 3, 64, [1024] * 8, [16] * 8),
    ("llama 4 x 512 chunk on 4K", 4, 4, 128, [4096] * 4, [512] * 4),
]


def per_request(heads: StreamingHeads, store, q, k_new, v_new, md: Step, reqs: list[int], output) -> None:
    """The loop ``StreamingHeads.prefill`` ran before (ring path, every head): one call per request."""
    sink, recent, d = heads.sink, heads.recent, k_new.shape[2]
    ring = store.ring
    qsl, lens = md.qsl_host(), md.seq_lens_host()
    blocks = store.ring_block.tolist()
    for b in reqs:
        s0, e0 = qsl[b], qsl[b + 1]
        seq_len = lens[b]
        ctx = seq_len - (e0 - s0)
        old_pos = ring_kept(0, ctx, sink, recent)
        r = ring[blocks[b]]
        idx = torch.tensor([ring_slot(p, sink, recent) for p in old_pos], dtype=torch.long)
        k_old, v_old = r[:, idx, :d], r[:, idx, d:]
        k = torch.cat([k_old, k_new[s0:e0].transpose(0, 1).to(k_old.dtype)], dim=1)[None].to(q.dtype)
        v = torch.cat([v_old, v_new[s0:e0].transpose(0, 1).to(v_old.dtype)], dim=1)[None].to(q.dtype)
        k_pos = torch.tensor(old_pos + list(range(ctx, seq_len)))
        o = streaming_prefill(q[s0:e0].transpose(0, 1)[None], k, v, sink=sink, window=recent, scale=heads.scale,
                              q_pos=k_pos[len(old_pos):], k_pos=k_pos)
        output[s0:e0] = o[0].transpose(0, 1).to(output.dtype)
        keep = ring_kept(ctx, seq_len, sink, recent)
        if keep:
            ki = torch.tensor([p - ctx for p in keep], dtype=torch.long) + s0
            slot = torch.tensor([ring_slot(p, sink, recent) for p in keep], dtype=torch.long)
            r[:, slot, :d] = k_new.index_select(0, ki).transpose(0, 1).to(r.dtype)
            r[:, slot, d:] = v_new.index_select(0, ki).transpose(0, 1).to(r.dtype)


def problem(n_str, g, d, ctxs, qlens, layers, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cap = DUO_SINK + DUO_RECENT
    rings = [torch.randn(len(ctxs), n_str, cap, 2 * d, generator=gen) for _ in range(layers)]
    qsl = [0]
    for n in qlens:
        qsl.append(qsl[-1] + n)
    lens = [c + n for c, n in zip(ctxs, qlens)]

    def step():  # a fresh Step per forward (its memo is per step, as in the model)
        return Step(len(ctxs), qsl[-1], max(qlens), max(lens), torch.tensor(qsl, dtype=torch.int32),
                    torch.tensor(lens, dtype=torch.int32), torch.zeros(len(ctxs), 1, dtype=torch.int32),
                    torch.zeros(qsl[-1], dtype=torch.long), qsl)

    q = torch.randn(qsl[-1], n_str * g, d, generator=gen)
    k, v = torch.randn(2, qsl[-1], n_str, d, generator=gen).unbind(0)
    return rings, step, q, k, v


def interleaved(fns: dict, reps: int) -> dict:
    """Median / p20 / p80 wall ms and the median calling-thread CPU ms (``time.thread_time``: with 1
    thread the whole cost, far less disturbed by a loaded machine) of each function, one call of each
    per round after one warm-up round."""
    ts = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    for r in range(reps + 1):
        for k, fn in fns.items():
            t0, c0 = time.perf_counter(), time.thread_time()
            fn()
            if r:
                ts[k].append((time.perf_counter() - t0) * 1e3)
                cpu[k].append((time.thread_time() - c0) * 1e3)
    out = {}
    for k, v in ts.items():
        q = torch.quantile(torch.tensor(v, dtype=torch.float64), torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
        out[k] = {"ms": float(q[0]), "p20_ms": float(q[1]), "p80_ms": float(q[2]),
                  "cpu_ms": float(torch.tensor(cpu[k], dtype=torch.float64).median())}
    return out


def run_case(name, n_str, g, d, ctxs, qlens, layers, reps, threads):
    torch.set_num_threads(threads)
    rings, step, q, k, v = problem(n_str, g, d, ctxs, qlens, layers)
    heads = StreamingHeads(DUO_SINK, DUO_RECENT, d ** -0.5)
    reqs = list(range(len(ctxs)))
    ring_block = torch.arange(len(ctxs))
    out_a, out_b = torch.empty_like(q), torch.empty_like(q)
    rings_b = [r.clone() for r in rings]

    def varlen():
        md = step()
        for ring in rings:
            heads.prefill(Store(ring=ring, ring_block=ring_block), q, k, v, md, reqs, out_a)

    def loop():
        md = step()
        for ring in rings_b:
            per_request(heads, Store(ring=ring, ring_block=ring_block), q, k, v, md, reqs, out_b)

    varlen()
    loop()
    err = (out_a - out_b).abs().max().item()  # same rings in, same outputs (the rings then take the step)
    t = interleaved({"varlen": varlen, "per_request": loop}, reps)
    row = {"case": name, "threads": threads, "streaming_kv_heads": n_str, "gqa": g, "head_dim": d, "context": ctxs,
           "q_lens": qlens, "layers": layers, "sink": DUO_SINK, "recent": DUO_RECENT, "max_abs_diff": err,
           "speedup": t["per_request"]["ms"] / t["varlen"]["ms"],
           "speedup_cpu": t["per_request"]["cpu_ms"] / t["varlen"]["cpu_ms"]}
    for key, tm in t.items():
        row.update({f"{key}_{m}": tm[m] for m in ("ms", "p20_ms", "p80_ms", "cpu_ms")})
    print(f"{name:30s} {threads} thr  varlen {t['varlen']['ms']:8.2f} ms   "
          f"per-request {t['per_request']['ms']:8.2f} ms   speedup {row['speedup']:5.2f}x (CPU time "
          f"{row['speedup_cpu']:5.2f}x)   max|diff| {err:.1e}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--threads", default=f"1,{torch.get_num_threads()}", help="intra-op thread counts, comma-separated")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "streaming-prefill-batch.json"))
    args = ap.parse_args()
    from kvcomp._ext import load_ext

    load_ext()
    if not hasattr(torch.ops.kvcomp_C, "streaming_prefill"):
        sys.exit("bench/streaming_prefill_batch.py: kvcomp._C is not built (KVCOMP_BUILD_EXT=1, see README)")
    os.environ["KVCOMP_OPS"] = "native"
    info = machine(str(ROOT))
    print(f"machine: {info}", flush=True)
    rows = [run_case(*c, layers=args.layers, reps=args.reps, threads=int(n)) for n in args.threads.split(",")
            for c in CASES]
    load = {"loadavg_1m_start": info["loadavg_1m"], "loadavg_1m_end": round(os.getloadavg()[0], 2)}
    print(f"load average (1 min): {load}", flush=True)
    note = ("both paths timed interleaved in one process; absolute ms are from a shared, loaded machine "
            "(see the load averages): compare ratios only")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": info, **load, "note": note, "results": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
