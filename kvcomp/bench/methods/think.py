"""ThinK benches: pruned-key paged decode and the cache write (CUDA registry), and the CPU case ``think``
(λ = 0.4 of the key channels pruned, full-width ring of W = 32 tokens)."""

from __future__ import annotations

import dataclasses

import torch

from kvcomp.bench.core import (Baseline, Bench, CpuCase, Problem, generator, pages, randn, register, register_cpu,
                               seq_lens)
from kvcomp.bench.methods.dense import decode_len, full_attention_baselines
from kvcomp.ref.think import think_kept_dim


def think_dk(p: Problem) -> int:
    """Kept key channels as ThinK stores them: ``D - floor(prune_ratio * D)`` rounded up to a multiple of
    16 (:func:`kvcomp.ref.think_kept_dim`: 80 of 128 at λ = 0.4)."""
    return think_kept_dim(p.d, p.get("prune_ratio"))


def _chan_idx(p: Problem, g: torch.Generator, dk: int) -> torch.Tensor:
    return torch.stack([torch.randperm(p.d, device=p.device, generator=g)[:dk].sort().values
                        for _ in range(p.hkv)]).view(1, p.hkv, dk)


def make_think_decode(p: Problem) -> dict:
    """ThinK cache at ``p.context`` tokens per sequence: pruned key pages (``D_keep`` channels, one static
    channel set per layer), full-width ring of ``window`` tokens, value pages; permuted blocks."""
    g = generator(p)
    nb, bt = pages(p, g)
    bs, w, dk = p.get("block_size"), p.get("window"), think_dk(p)
    return dict(q=randn(p, g, p.batch, p.hq, p.d), kp_cache=randn(p, g, nb, bs, p.hkv, dk),
                chan_idx=_chan_idx(p, g, dk), k_recent=randn(p, g, p.batch, p.hkv, w, p.d),
                v_cache=randn(p, g, nb, bs, p.hkv, p.d), block_table=bt, seq_lens=seq_lens(p))


_THINK_KEYS = ("q", "kp_cache", "chan_idx", "k_recent", "v_cache", "block_table", "seq_lens")


def run_think_decode(x):
    from kvcomp.ops.think import think_decode

    return think_decode(*(x[k] for k in _THINK_KEYS))


def ref_think_decode(x):
    from kvcomp.ref.think_paged import paged_pruned_key_attention

    return paged_pruned_key_attention(*(x[k] for k in _THINK_KEYS))


def bytes_think_decode(p: Problem, x=None) -> int:
    """Narrow keys of the ``T - W`` older tokens (the width as stored: ``kp_cache``'s last dim when the
    inputs are given), the full-width ring of ``min(T, W)`` tokens, all ``T`` values."""
    w = min(p.context, p.get("window"))
    dk = x["kp_cache"].shape[-1] if x is not None else think_dk(p)
    return p.batch * p.hkv * p.elt * ((p.context - w) * dk + w * p.d + p.context * p.d)


def _unpruned(p: Problem) -> dict:
    return make_think_decode(dataclasses.replace(p, extra={**p.extra, "prune_ratio": 0.0}))


register(Bench(
    name="think_decode",
    description="ThinK pruned-key paged decode (split-K): keys with D_keep channels + full-width recent ring",
    make=make_think_decode, run=run_think_decode, nbytes=bytes_think_decode, ref=ref_think_decode,
    baselines={**full_attention_baselines(decode_len), "think_unpruned": Baseline(_unpruned, run_think_decode)},
    defaults=dict(block_size=16, prune_ratio=0.4, window=32),
    smoke=Problem(2, 41, 4, 2, 16, torch.float32, "cpu", dict(block_size=8, window=6)),
))


def _think04(p: Problem) -> Problem:
    return dataclasses.replace(p, extra={**p.extra, "prune_ratio": 0.4, "window": 32})


register_cpu(CpuCase(
    name="think",
    description="ThinK, λ=0.4 of the key channels pruned, W=32 full-width ring (kvcomp.ops think_decode)",
    make=lambda p: make_think_decode(_think04(p)), run=run_think_decode, ops=(("", "think_decode"),),
    nbytes=lambda p, x: bytes_think_decode(_think04(p), x),
    kv_bytes=lambda p: bytes_think_decode(_think04(p))))
