"""Brute-force helpers for tests/ref: explicit per-(b, h, i) loops in float64, written independently
of kvcomp.ref (no shared code paths)."""

from __future__ import annotations

import torch


def brute_attention(q, k, v, visible, scale=None):
    """q [B,Hq,Tq,D], k [B,Hkv,Tk,D], v [B,Hkv,Tk,Dv]; visible(b, h, i) -> list of key indices."""
    b_, hq, tq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    sc = d ** -0.5 if scale is None else scale
    out = torch.zeros(b_, hq, tq, v.shape[-1], dtype=torch.float64)
    qd, kd, vd = q.double(), k.double(), v.double()
    for b in range(b_):
        for h in range(hq):
            for i in range(tq):
                js = visible(b, h, i)
                if not js:
                    continue
                js = torch.tensor(js, dtype=torch.long)
                logits = (kd[b, h // g, js] @ qd[b, h, i]) * sc
                p = torch.exp(logits - logits.max())
                p = p / p.sum()
                out[b, h, i] = p @ vd[b, h // g, js]
    return out


def to_pages(k_dense_list, block_size, hkv, d, extra_blocks=3, seed=0):
    """Scatter per-sequence dense keys ``[Hkv, L_b, D]`` into a paged cache with a permuted block table.

    Returns (cache [NB, BS, Hkv, D] float with garbage in unused slots, block_table [B, max_blocks] int32).
    """
    g = torch.Generator().manual_seed(seed)
    nblk = [-(-x.shape[1] // block_size) for x in k_dense_list]
    total = sum(nblk) + extra_blocks
    perm = torch.randperm(total, generator=g)
    cache = torch.randn(total, block_size, hkv, d, generator=g) * 100.0  # garbage must never be read
    max_blocks = max(max(nblk), 1) + 1
    table = torch.full((len(k_dense_list), max_blocks), -1, dtype=torch.int32)
    nxt = 0
    for b, x in enumerate(k_dense_list):
        for j in range(nblk[b]):
            blk = int(perm[nxt])
            nxt += 1
            table[b, j] = blk
            part = x[:, j * block_size:(j + 1) * block_size]  # [Hkv, n, D]
            cache[blk, :part.shape[1]] = part.permute(1, 0, 2)
    table[table < 0] = int(perm[-1])  # unused columns point at a real (garbage) block
    return cache, table
