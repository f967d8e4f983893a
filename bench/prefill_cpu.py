"""Multi-token rows on the CPU: the native varlen ``paged_prefill`` (one call over the pages) against the
per-request gather + SDPA loop (:func:`kvcomp.methods.dense.dense_rows_loop`), same data, same run.

Cases (block size 16, pages in permuted order): SmolLM2 geometry (9 query / 3 KV heads, D=64) at
1 x 4K and 1 x 8K prompts, 4 x 1K prompts, a chunked step (the last 512 tokens of a 4K context), the
1 x 4K prompt with bf16 pages; Llama-3.1-8B geometry (32 / 8, D=128) at 1 x 4K. fp32 unless named.

    python bench/prefill_cpu.py [--reps 3] [--out bench/results/prefill-cpu.json]

Prints one line per case and writes a JSON file with the machine line (kvcomp.bench.core.machine)
and per case the median / p20 / p80 ms of both paths and the speedup (loop ms / native ms).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kvcomp.bench.core import machine, time_cpu  # noqa: E402
from kvcomp.methods.dense import dense_rows_loop  # noqa: E402
from kvcomp.methods.step import Step  # noqa: E402

CASES = [  # (name, Hq, Hkv, D, seq_lens, q_lens, dtype of the pages)
    ("smollm2 1x4K", 9, 3, 64, [4096], [4096], torch.float32),
    ("smollm2 1x8K", 9, 3, 64, [8192], [8192], torch.float32),
    ("smollm2 4x1K", 9, 3, 64, [1024] * 4, [1024] * 4, torch.float32),
    ("smollm2 chunk 512 on 4K", 9, 3, 64, [4096], [512], torch.float32),
    ("smollm2 1x4K bf16 pages", 9, 3, 64, [4096], [4096], torch.bfloat16),
    ("llama 1x4K", 32, 8, 128, [4096], [4096], torch.float32),
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
    tn, tl = time_cpu(native, reps), time_cpu(loop, reps)
    row = {"case": name, "hq": hq, "hkv": hkv, "head_dim": d, "seq_lens": seq_lens, "q_lens": q_lens,
           "kv_dtype": str(dtype).removeprefix("torch."), "native_ms": tn["ms"], "native_p20_ms": tn["p20_ms"],
           "native_p80_ms": tn["p80_ms"], "loop_ms": tl["ms"], "loop_p20_ms": tl["p20_ms"], "loop_p80_ms": tl["p80_ms"],
           "speedup": tl["ms"] / tn["ms"], "max_abs_diff": err}
    print(f"{name:26s} native {tn['ms']:9.1f} ms   gather+SDPA loop {tl['ms']:9.1f} ms   "
          f"speedup {row['speedup']:5.2f}x   max|diff| {err:.1e}", flush=True)
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
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"machine": info, "results": rows}, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
