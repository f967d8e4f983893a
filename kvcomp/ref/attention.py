"""Exact dense and paged attention references (fp32 softmax, GQA-aware, any device).

Everything in ``kvcomp.ref`` that attends ends up in :func:`softmax_av`: fp32 logits, ``-inf`` on
hidden keys, fp32 softmax, fp32 ``P @ V``. A query row that sees no key at all (possible only with an
explicit ``mask`` or positions that exclude the query's own token) gets an all-zero output, the
convention of flash-attention for rows with ``lse = -inf``.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import _validate as V

# Logit elements computed at once before the query axis is split into chunks (~256 MiB fp32).
_CHUNK_ELEMS = 1 << 26


def softmax_av(logits: torch.Tensor, visible: torch.Tensor | None, v: torch.Tensor) -> torch.Tensor:
    """Masked fp32 softmax over the last dim, then ``@ v``.

    Args:
        logits: ``[B, Hkv, G, Tq, Tk]`` fp32 (already scaled).
        visible: bool broadcastable to ``logits`` (True = visible) or None (all visible).
        v: ``[B, Hkv, Tk, Dv]`` fp32.
    Returns:
        ``[B, Hkv, G, Tq, Dv]`` fp32; rows with no visible key are zero.
    """
    if visible is not None:
        logits = logits.masked_fill(~visible, float("-inf"))
    p = torch.softmax(logits, dim=-1)
    if visible is not None:
        any_vis = visible.any(dim=-1, keepdim=True)
        p = torch.where(any_vis, p, torch.zeros((), dtype=p.dtype, device=p.device))
    return torch.matmul(p, v.unsqueeze(2))


def chunked(tq: int, tk: int, heads: int, batch: int, fn: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """Run ``fn(start, end)`` over query chunks so one logits block stays under ``_CHUNK_ELEMS``.

    ``fn`` returns ``[B, Hkv, G, end-start, Dv]``; the chunks are concatenated on dim 3.
    """
    per_q = max(1, tk * heads * batch)
    step = max(1, _CHUNK_ELEMS // per_q)
    if step >= tq:
        return fn(0, tq)
    return torch.cat([fn(s, min(tq, s + step)) for s in range(0, tq, step)], dim=3)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
              causal: bool = True, q_pos: torch.Tensor | None = None, k_pos: torch.Tensor | None = None,
              mask: torch.Tensor | None = None) -> torch.Tensor:
    """Exact dense attention, the base of every other reference.

    Args:
        q: ``[B, Hq, Tq, D]``; query head ``h`` reads KV head ``h // (Hq // Hkv)``.
        k: ``[B, Hkv, Tk, D]``.
        v: ``[B, Hkv, Tk, Dv]`` (``Dv`` may differ from ``D``).
        scale: logit scale, default ``1/sqrt(D)``.
        causal: hide keys with ``k_pos > q_pos``.
        q_pos: ``[Tq]`` or ``[B, Tq]`` integer positions; default ``Tk - Tq + arange(Tq)``
            (bottom-right alignment).
        k_pos: ``[Tk]`` or ``[B, Tk]`` integer positions; default ``arange(Tk)``. Explicit positions
            let compact storage (any subset of tokens, any order) be expressed exactly.
        mask: optional bool, broadcastable to ``[B, Hq, Tq, Tk]``, True = visible; ANDed in.
    Returns:
        ``[B, Hq, Tq, Dv]`` in ``q.dtype``; computed in fp32. Rows with no visible key are zero.
    """
    V.tensor("q", q, ndim=4, kind="float")
    V.tensor("k", k, ndim=4, kind="float")
    V.tensor("v", v, ndim=4, kind="float")
    V.same_device(q=q, k=k, v=v, mask=mask)
    b, hq, tq, d = q.shape
    _, hkv, tk, _ = k.shape
    V.dim_eq("k", k.shape[0], b, "batch size")
    V.dim_eq("k", k.shape[3], d, "head dim (equal to q's)")
    if tuple(v.shape[:3]) != (b, hkv, tk):
        raise ValueError(f"v must be [B={b}, Hkv={hkv}, Tk={tk}, Dv], got {tuple(v.shape)}")
    g = V.gqa("q", hq, hkv)
    sc = V.scale_or_default(scale, d)
    vis = None
    if causal:
        qp = V.query_positions(q_pos, b, tq, tk, q.device)
        kp = V.key_positions(k_pos, b, tk, q.device)
        vis = (kp[:, None, :] <= qp[:, :, None])[:, None, None]  # [B|1, 1, 1, Tq, Tk]
    else:
        if q_pos is not None:
            V.positions("q_pos", q_pos, b, tq, q.device)
        if k_pos is not None:
            V.positions("k_pos", k_pos, b, tk, q.device)
    if mask is not None:
        V.tensor("mask", mask, kind="bool")
        try:
            m = mask.expand(b, hq, tq, tk) if mask.dim() <= 4 else None
        except RuntimeError:
            m = None
        if m is None:
            raise ValueError(f"mask of shape {tuple(mask.shape)} is not broadcastable to {(b, hq, tq, tk)}")
        m = m.reshape(b, hkv, g, tq, tk)
        vis = m if vis is None else (vis & m)
    qf = q.float().reshape(b, hkv, g, tq, d)
    kt = k.float().unsqueeze(2).transpose(-1, -2)  # [B, Hkv, 1, D, Tk]
    vf = v.float()

    def block(s: int, e: int) -> torch.Tensor:
        logits = torch.matmul(qf[:, :, :, s:e], kt) * sc
        vv = None
        if vis is not None:
            vv = vis[..., s:e, :] if vis.shape[-2] != 1 else vis
        return softmax_av(logits, vv, vf)

    o = chunked(tq, tk, hq, b, block)
    return o.reshape(b, hq, tq, v.shape[3]).to(q.dtype)


def gather_paged(cache: torch.Tensor, block_table: torch.Tensor, seq_len_b: int, b: int) -> torch.Tensor:
    """Gather the first ``seq_len_b`` tokens of sequence ``b`` from a paged cache.

    Args:
        cache: ``[num_blocks, block_size, Hkv, D]``.
        block_table: ``[B, max_blocks]`` integer block ids (any order; only the first
            ``ceil(seq_len_b / block_size)`` entries of row ``b`` are read).
        seq_len_b: number of tokens of the sequence.
        b: row of ``block_table``.
    Returns:
        ``[Hkv, seq_len_b, D]`` in ``cache.dtype`` (a copy).
    """
    V.tensor("cache", cache, ndim=4)
    V.tensor("block_table", block_table, ndim=2, kind="int")
    V.nonneg_int("seq_len_b", int(seq_len_b) if isinstance(seq_len_b, torch.Tensor) else seq_len_b)
    seq_len_b = int(seq_len_b)
    if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < block_table.shape[0]:
        raise ValueError(f"b must be an int in [0, {block_table.shape[0]}), got {b!r}")
    nb, bs, hkv, d = cache.shape
    nblk = V.check_blocks(block_table, b, seq_len_b, bs, nb)
    ids = block_table[b, :nblk].to(device=cache.device, dtype=torch.long)
    toks = cache.index_select(0, ids).reshape(nblk * bs, hkv, d)[:seq_len_b]
    return toks.permute(1, 0, 2).contiguous()


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                    seq_lens: torch.Tensor, query_start_loc: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """Causal varlen attention (prefill, chunked prefill, decode) over a paged KV cache.

    Args:
        q: ``[total_q, Hq, D]`` packed queries; sequence ``b`` owns rows
            ``query_start_loc[b]:query_start_loc[b+1]``, which are its last ``q_len_b`` tokens.
        k_cache: ``[num_blocks, block_size, Hkv, D]``.
        v_cache: ``[num_blocks, block_size, Hkv, Dv]``.
        block_table: ``[B, max_blocks]`` integer; pages may be in any order, the last one partial.
        seq_lens: ``[B]`` tokens in the cache including the new ones.
        query_start_loc: ``[B+1]`` integer, non-decreasing, from 0 to ``total_q``.
        scale: default ``1/sqrt(D)``.
    Returns:
        ``[total_q, Hq, Dv]`` in ``q.dtype``.
    """
    return paged_apply(q, k_cache, v_cache, block_table, seq_lens, query_start_loc,
                       lambda qb, kb, vb: attention(qb, kb, vb, scale=scale, causal=True))


def paged_apply(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, fn) -> torch.Tensor:
    """Validate a paged varlen call and run ``fn(q_b [1,Hq,q_len,D], k_b [1,Hkv,L,D], v_b)`` per sequence."""
    _, lens, qsl = V.paged(q, k_cache, v_cache, block_table, seq_lens, query_start_loc)
    out = q.new_zeros(q.shape[0], q.shape[1], v_cache.shape[3])
    for b, seq_len in enumerate(lens):
        s, e = qsl[b], qsl[b + 1]
        if e == s:
            continue
        kb = gather_paged(k_cache, block_table, seq_len, b).unsqueeze(0)
        vb = gather_paged(v_cache, block_table, seq_len, b).unsqueeze(0)
        qb = q[s:e].permute(1, 0, 2).unsqueeze(0)
        out[s:e] = fn(qb, kb, vb)[0].permute(1, 0, 2)
    return out

