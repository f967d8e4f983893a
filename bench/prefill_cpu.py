"""Multi-token rows on the CPU: the native varlen ``paged_prefill`` (one call over the pages) against the
per-request gather + SDPA loop (:func:`kvcomp.methods.dense.dense_rows_loop`), same data, same run;
and DuoAttention's streaming heads: the native sink + window ``streaming_prefill`` against the
reference (:func:`kvcomp.ref.streaming_attention`), the masked SDPA call the CPU ran before, and dense
causal SDPA (what the same heads cost as retrieval heads) on the same q / k / v.

Cases (block size 16, pages in permuted order): SmolLM2 geometry (9 query / 3 KV heads, D=64) at
1 x 1K, 1 x 4K and 1 x 8K prompts, 4 x 1K prompts, a chunked step (the last 512 tokens of a 4K
context), the 1 x 4K prompt with bf16 pages; Llama-3.1-8B geometry (32 / 8, D=128) at 1 x 2K.
Streaming rows: SmolLM2 geometry, one 4K and one 8K prompt, sink 64 / recent 256 (kvcomp.defaults).
fp32 unless named. The paths of a case are timed interleaved (one call of each per round), so their
ratio holds on a loaded machine; the JSON records the 1-minute load average before and after.

    python bench/prefill_cpu.py [--reps 3] [--out bench/results/prefill-cpu.json]

Prints one line per case and writes a JSON file with the machine line (kvcomp.bench.core.machine)
and per case the median / p20 / p80 ms of each path and the speedups.
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
from kvcomp.methods.dense import dense_rows_loop  # noqa: E402
from kvcomp.methods.step import Step  # noqa: E402
from kvcomp.ops.prefill import dense_prefill, streaming_prefill  # noqa: E402
from kvcomp.ref.streaming import streaming_attention, streaming_mask  # noqa: E402

CASES = [  # (name, Hq, Hkv, D, seq_lens, q_lens, dtype of the pages)
    ("smollm2 1x1K", 9, 3, 64, [1024], [1024], torch.float32),
    ("smollm2 1x4K", 9, 3, 64, [4096], [4096], torch.float32),
    ("smollm2 1x8K", 9, 3, 64, [8192], [8192], torch.float32),
    ("smollm2 4x1K", 9, 3, 64, [1024] * 4, [1024] * 4, torch.float32),
    ("smollm2 chunk 512 on 4K", 9, 3, 64, [4096], [512], torch.float32),
    ("smollm2 1x4K bf16 pages", 9, 3, 64, [4096], [4096], torch.bfloat16),
    ("llama 1x2K", 32, 8, 128, [2048], [2048], torch.float32),
]
STREAMING = [  # (name, Hq, Hkv, D, prompt tokens)
    ("smollm2 streaming 1x4K", 9, 3, 64, 4096),
    ("smollm2 streaming 1x8K", 9, 3, 64, 8192),
]
BLOCK = 16


def problem(hq, hkv, d, seq_lens, q_lens, dtype, seed=0):
    """``(q, k_cache, v_cache, Step)`` with each request's pages at permuted block ids."""
    g = torch.Generator().manual_seed(seed)
    nblk = [-(-n // BLOCK) for n in seq_lens]
    width = max(nblk)
    perm = torch.randperm(len(seq_lens) * width, generator=g).reshape(len(seq_lens), width)
    k = torch.randn(len(seq_lens) * width, BLOCK, hkv, d, generator=g).to(dtype)
    v = torch.randn(len(seq_lens) * width, BLOCK, hkv, d, generator=g).to(dtype)
    qsl = [0]
    for n in q_lens:
        qsl.append(qsl[-1] + n)
    q = torch.randn(qsl[-1], hq, d, generator=g)
    md = Step(len(seq_lens), qsl[-1], max(q_lens), max(seq_lens), torch.tensor(qsl, dtype=torch.int32),
              torch.tensor(seq_lens, dtype=torch.int32), perm.to(torch.int32), torch.zeros(0, dtype=torch.long),
              qsl, list(seq_lens))
    return q, k, v, md


def interleaved(fns: dict, reps: int) -> dict:
    """Median / p20 / p80 ms of each function, timed one call of each per round after one warm-up round."""
    ts = {k: [] for k in fns}
    for r in range(reps + 1):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r:
                ts[k].append((time.perf_counter() - t0) * 1e3)
    res = {}
    for k, v in ts.items():
        q = torch.quantile(torch.tensor(v, dtype=torch.float64), torch.tensor([0.5, 0.2, 0.8], dtype=torch.float64))
        res[k] = {"ms": float(q[0]), "p20_ms": float(q[1]), "p80_ms": float(q[2])}
    return res


def run_case(name, hq, hkv, d, seq_lens, q_lens, dtype, reps):
    q, k, v, md = problem(hq, hkv, d, seq_lens, q_lens, dtype)
    multi = md.rows()[1]
    scale = d**-0.5
    out = torch.empty_like(q)

    def native():
        return torch.ops.kvcomp_C.paged_prefill(q, k, v, multi.block_table, multi.seq_lens,
                                                multi.query_start_loc, scale)

    def loop():
        dense_rows_loop(q, k, v, md, multi.reqs, scale, out)
        return out

    err = (native() - loop()).abs().max().item()
    t = interleaved({"native": native, "loop": loop}, reps)
    tn, tl = t["native"], t["loop"]
    row = {"case": name, "hq": hq, "hkv": hkv, "head_dim": d, "seq_lens": seq_lens, "q_lens": q_lens,
           "kv_dtype": str(dtype).removeprefix("torch."), "native_ms": tn["ms"], "native_p20_ms": tn["p20_ms"],
           "native_p80_ms": tn["p80_ms"], "loop_ms": tl["ms"], "loop_p20_ms": tl["p20_ms"], "loop_p80_ms": tl["p80_ms"],
           "speedup": tl["ms"] / tn["ms"], "max_abs_diff": err}
    print(f"{name:26s} native {tn['ms']:9.1f} ms   gather+SDPA loop {tl['ms']:9.1f} ms   "
          f"speedup {row['speedup']:5.2f}x   max|diff| {err:.1e}", flush=True)
    return row


def run_streaming(name, hq, hkv, d, tokens, reps):
    """One prompt's streaming heads: native vs reference vs masked SDPA vs dense causal SDPA."""
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, hq, tokens, d, generator=g)
    k, v = torch.randn(2, 1, hkv, tokens, d, generator=g).unbind(0)
    pos = torch.arange(tokens)
    sink, recent = DUO_SINK, DUO_RECENT

    def masked_sdpa():  # the CPU path of ops.prefill.streaming_prefill before the native kernel
        mask = streaming_mask(pos, pos, sink, recent)
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    os.environ["KVCOMP_OPS"] = "native"  # the ops entry runs torch.ops.kvcomp_C.streaming_prefill (or raises)
    fns = {"native": lambda: streaming_prefill(q, k, v, sink=sink, window=recent),
           "reference": lambda: streaming_attention(q, k, v, sink=sink, window=recent),
           "masked_sdpa": masked_sdpa, "dense_sdpa": lambda: dense_prefill(q, k, v)}
    err = (fns["native"]() - fns["reference"]()).abs().max().item()
    t = interleaved(fns, reps)
    row = {"case": name, "hq": hq, "hkv": hkv, "head_dim": d, "tokens": tokens, "sink": sink, "recent": recent,
           "max_abs_diff": err}
    for key, tm in t.items():
        row.update({f"{key}_ms": tm["ms"], f"{key}_p20_ms": tm["p20_ms"], f"{key}_p80_ms": tm["p80_ms"]})
    for key in ("reference", "masked_sdpa", "dense_sdpa"):
        row[f"speedup_vs_{key}"] = t[key]["ms"] / t["native"]["ms"]
    print(f"{name:26s} native {t['native']['ms']:8.1f} ms   reference {t['reference']['ms']:8.1f}   masked SDPA "
          f"{t['masked_sdpa']['ms']:8.1f}   dense SDPA {t['dense_sdpa']['ms']:8.1f}   max|diff| {err:.1e}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "prefill-cpu.json"))
    args = ap.parse_args()
    from kvcomp._ext import load_ext

    load_ext()
    if not hasattr(torch.ops.kvcomp_C, "paged_prefill"):
        sys.exit("bench/prefill_cpu.py: kvcomp._C with paged_prefill is not built (KVCOMP_BUILD_EXT=1, see README)")
    info = machine(str(ROOT))
    print(f"machine: {info}", flush=True)
    rows = [run_case(*c, reps=args.reps) for c in CASES]
    streaming = [run_streaming(*c, reps=args.reps) for c in STREAMING]
    load = {"loadavg_1m_start": info["loadavg_1m"], "loadavg_1m_end": round(os.getloadavg()[0], 2)}
    print(f"load average (1 min): {load}", flush=True)
    note = ("paths of a case timed interleaved in one process; absolute ms are from a shared, loaded machine "
            "(see the load averages): compare ratios only")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": info, **load, "note": note, "results": rows,
                                          "streaming": streaming}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
