"""DuoAttention benches: head-split paged decode, streaming prefill, paged / ring writes (CUDA registry)
and the CPU case ``duo50`` (half the KV heads streaming, sink 64 / recent 256)."""

from __future__ import annotations

import dataclasses
import math

import torch

from kvcomp.bench.core import (Baseline, Bench, CpuCase, Problem, dense_qkv, generator, randn, register,
                               register_cpu, seq_lens)
from kvcomp.bench.methods.dense import (DUO_OPS, decode_len, full_attention_baselines, kv_read_bytes, prefill_len,
                                        run_duo_ops)


def split_heads(p: Problem) -> tuple[int, int]:
    """``(n_ret, n_str)``: retrieval and streaming KV heads for ``streaming_frac``."""
    n_str = int(round(p.hkv * p.get("streaming_frac", 0.5)))
    return p.hkv - n_str, n_str


def make_duo_decode(p: Problem) -> dict:
    """Head-split cache at ``p.context`` tokens per sequence: retrieval heads paged (permuted blocks),
    streaming heads in full rings; the first ``n_ret`` KV heads are retrieval heads."""
    from kvcomp.ref.duo import duo_head_map

    bs, sink, window = p.get("block_size"), p.get("sink"), p.get("window")
    n_ret, n_str = split_heads(p)
    g = generator(p)
    per_seq = math.ceil(p.context / bs)
    nb = p.batch * per_seq
    perm = torch.randperm(nb, device=p.device, generator=g).to(torch.int32)
    streaming = torch.tensor([False] * n_ret + [True] * n_str)
    return dict(q=randn(p, g, p.batch, p.hq, p.d), k_cache=randn(p, g, nb, bs, n_ret, p.d),
                v_cache=randn(p, g, nb, bs, n_ret, p.d), block_table=perm.view(p.batch, per_seq),
                seq_lens=seq_lens(p), k_stream=randn(p, g, p.batch, n_str, sink + window, p.d),
                v_stream=randn(p, g, p.batch, n_str, sink + window, p.d),
                head_map=duo_head_map(streaming).to(p.device), sink=sink, window=window)


def ref_duo_decode(x):
    from kvcomp.ref.duo import duo_decode_attention

    return duo_decode_attention(x["q"], x["k_cache"], x["v_cache"], x["block_table"], x["seq_lens"], x["k_stream"],
                                x["v_stream"], x["head_map"], sink=x["sink"], window=x["window"])


def bytes_duo_decode(p: Problem) -> int:
    """Retrieval heads' full K/V + ``min(T, sink + window)`` rows per streaming head."""
    n_ret, n_str = split_heads(p)
    return (kv_read_bytes(p, p.context, n_ret)
            + kv_read_bytes(p, min(p.context, p.get("sink") + p.get("window")), n_str))


def _paged_full(p: Problem) -> dict:
    return make_duo_decode(dataclasses.replace(p, extra={**p.extra, "streaming_frac": 0.0}))


register(Bench(
    name="duo_decode",
    description="DuoAttention head-split paged decode (split-K), half the KV heads streaming",
    make=make_duo_decode, run=run_duo_ops, nbytes=bytes_duo_decode, ref=ref_duo_decode,
    baselines={**full_attention_baselines(decode_len), "triton_paged_full": Baseline(_paged_full, run_duo_ops)},
    defaults=dict(block_size=16, sink=64, window=256, streaming_frac=0.5),
    smoke=Problem(2, 37, 4, 2, 16, torch.float32, "cpu", dict(block_size=8, sink=4, window=8)),
))

def _duo50(p: Problem) -> Problem:
    return dataclasses.replace(p, extra={**p.extra, "streaming_frac": 0.5, "sink": 64, "window": 256})


register_cpu(CpuCase(
    name="duo50", description="DuoAttention, 50% streaming KV heads (sink 64 / recent 256), kvcomp.ops duo decode",
    make=lambda p: make_duo_decode(_duo50(p)), run=run_duo_ops, ops=DUO_OPS,
    nbytes=lambda p, x: bytes_duo_decode(_duo50(p)), kv_bytes=lambda p: kv_read_bytes(p, p.context) // 2))


# --------------------------------------------------------------------------------------------------
# Streaming prefill and cache writes (CUDA registry)


def make_streaming_prefill(p: Problem) -> dict:
    q, k, v = dense_qkv(p, prefill_len(p))
    return dict(q=q, k=k, v=v, sink=p.get("sink"), window=p.get("window"))


def run_streaming_prefill(x):
    from kvcomp.ops.prefill import triton_streaming_attention

    return triton_streaming_attention(x["q"], x["k"], x["v"], sink=x["sink"], window=x["window"])


def ref_streaming_prefill(x):
    from kvcomp.ref import streaming_attention

    return streaming_attention(x["q"], x["k"], x["v"], sink=x["sink"], window=x["window"])


def bytes_streaming_prefill(p: Problem) -> int:
    tq = prefill_len(p)
    visible = min(p.context, p.get("sink") + p.get("window"))  # keys a query tile must read (no reuse)
    return p.batch * p.elt * p.d * (2 * p.hq * tq + 2 * p.hkv * min(p.context, tq + visible))


register(Bench(
    name="streaming_prefill",
    description="sink+window block-sparse causal prefill (all heads streaming) vs dense causal prefill",
    make=make_streaming_prefill, run=run_streaming_prefill, nbytes=bytes_streaming_prefill,
    ref=ref_streaming_prefill, baselines=full_attention_baselines(prefill_len),
    contexts=(4096, 16384, 65536, 131072), batches=(1,),
    defaults=dict(sink=64, window=256),
    smoke=Problem(1, 45, 4, 2, 16, torch.float32, "cpu", dict(sink=4, window=8)),
))


def make_write_paged(p: Problem) -> dict:
    """Decode-style write: one new token per sequence into a cache sized for ``p.context`` tokens each."""
    bs = p.get("block_size")
    g = generator(p)
    nb = p.batch * math.ceil(p.context / bs)
    k_cache = torch.zeros(nb, bs, p.hkv, p.d, device=p.device, dtype=p.dtype)
    blocks = torch.randperm(nb, device=p.device, generator=g)[: p.batch]
    slots = blocks * bs + (p.context - 1) % bs
    key = randn(p, g, p.batch, p.hkv, p.d)
    return dict(key=key, value=key.clone(), k_cache=k_cache, v_cache=k_cache.clone(), slot_mapping=slots)


def run_write_paged(x):
    from kvcomp.ops.cache_write import triton_write_paged_kv

    triton_write_paged_kv(x["key"], x["value"], x["k_cache"], x["v_cache"], x["slot_mapping"])


def ref_write_paged(x):
    from kvcomp.ref.cache_write import write_paged_kv

    kc, vc = x["k_cache"].clone(), x["v_cache"].clone()
    write_paged_kv(x["key"], x["value"], kc, vc, x["slot_mapping"])
    return torch.stack([kc, vc])


register(Bench(
    name="write_paged_kv",
    description="paged KV write by slot mapping (one decode token per sequence)",
    make=make_write_paged, run=run_write_paged, ref=ref_write_paged,
    output=lambda x, _: torch.stack([x["k_cache"], x["v_cache"]]),
    nbytes=lambda p: 4 * p.batch * p.hkv * p.d * p.elt + 8 * p.batch,
    contexts=(4096,), batches=(1, 8, 64),
    defaults=dict(block_size=16),
    smoke=Problem(3, 20, 4, 2, 16, torch.float32, "cpu", dict(block_size=8)),
))
