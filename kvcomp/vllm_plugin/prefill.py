"""Multi-token rows (prefill, chunked prefill) of kvcomp's vLLM backend, one request at a time.

Each request's keys and values are gathered from its pages, then attended by one dense causal call
(:func:`kvcomp.ops.prefill.dense_prefill`: ``flash_attn`` on CUDA fp16/bf16 when installed, else
torch SDPA); the request's queries are its last tokens (bottom-right causal). ThinK's pruned keys
are scattered back to full width with zeros, which scores exactly ``q[kept] . k_kept``.
DuoAttention's streaming heads attend over their kept tokens and the chunk through
:func:`kvcomp.ops.prefill.streaming_prefill` with the tokens' positions (Triton on CUDA, SDPA with
the sink + window mask elsewhere).

Common arguments: ``q [n, Hq, D]`` (the step's query rows), ``md`` the batch metadata (its host
copies ``qsl_host()`` / ``seq_lens_host()`` address the rows), ``reqs`` the multi-token requests.
"""

from __future__ import annotations

import torch

from ..ops.prefill import dense_prefill, streaming_prefill
from ..ref.attention import gather_paged
from .ring import ring_kept, ring_slot


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of ``q [Tq, Hq, D]`` (the last ``Tq`` positions) over ``k [Hkv, Tk, D]``,
    ``v [Hkv, Tk, Dv]`` (moved to q's device and dtype: e.g. rows of the host mirror); returns
    ``[Tq, Hq, Dv]``."""
    k, v = (t.to(q.device, q.dtype, non_blocking=True) for t in (k, v))
    o = dense_prefill(q.transpose(0, 1)[None], k[None], v[None], scale=scale)
    return o[0].transpose(0, 1)


def dense_rows(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, md, reqs: list[int], scale: float,
               output: torch.Tensor, heads: torch.Tensor | None = None) -> None:
    """Full attention over the pages ``[blocks, block_size, H, D]`` (device pages, or A²ATS's host
    mirror); writes ``output[rows, heads]`` (``heads``: the query heads ``q`` holds, default all)."""
    qsl, lens = md.qsl_host(), md.seq_lens_host()
    for b in reqs:
        s0, e0 = qsl[b], qsl[b + 1]
        o = attend(q[s0:e0], gather_paged(k_cache, md.block_table, lens[b], b),
                   gather_paged(v_cache, md.block_table, lens[b], b), scale).to(output.dtype)
        if heads is None:
            output[s0:e0] = o
        else:
            output[s0:e0].index_copy_(1, heads, o)


def think_rows(q: torch.Tensor, k_new: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
               chan: torch.Tensor, ring: torch.Tensor | None, blocks: list[int], window: int, md, reqs: list[int],
               scale: float, output: torch.Tensor) -> None:
    """ThinK: keys before the last ``window`` earlier ones read pruned (``chan [Hkv, Dk]``), the
    window (ring slot ``p % window``) and this step's keys ``k_new [n, Hkv, D]`` at full width;
    then this step's keys among the last ``window`` enter the ring."""
    hkv, d = k_new.shape[1], k_new.shape[2]
    qsl, lens = md.qsl_host(), md.seq_lens_host()
    for b in reqs:
        s0, e0 = qsl[b], qsl[b + 1]
        seq_len = lens[b]
        ctx = seq_len - (e0 - s0)
        tail = min(window, ctx)
        kp = gather_paged(k_cache, md.block_table, ctx - tail, b)  # [Hkv, Tp, Dk]
        k = kp.new_zeros(hkv, kp.shape[1], d).scatter_(2, chan[:, None, :].expand(-1, kp.shape[1], -1), kp)
        kf = k_new[s0:e0].transpose(0, 1)
        if tail:
            slots = torch.tensor([p % window for p in range(ctx - tail, ctx)], device=kf.device)
            kf = torch.cat([ring[blocks[b]][:, slots].to(kf.dtype), kf], dim=1)
        k = torch.cat([k, kf.to(k.dtype)], dim=1)
        output[s0:e0] = attend(q[s0:e0], k, gather_paged(v_cache, md.block_table, seq_len, b), scale).to(output.dtype)
        keep = [p for p in range(ctx, seq_len) if p >= seq_len - window] if window else []
        if keep:  # after attending
            rows = torch.tensor([p - ctx for p in keep], device=kf.device) + s0
            slot = torch.tensor([p % window for p in keep], device=kf.device)
            ring[blocks[b]][:, slot] = k_new.index_select(0, rows).transpose(0, 1).to(ring.dtype)


def streaming_rows(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, *, sink: int, recent: int,
                   ring: torch.Tensor | None, blocks: list[int] | None, mirror_kv, md, reqs: list[int],
                   scale: float, output: torch.Tensor, heads: torch.Tensor) -> None:
    """DuoAttention's streaming heads: ``q [n, Hq_str, D]`` over the kept earlier tokens (the ring
    ``[blocks, n_str, capacity, D + Dv]``, or ``mirror_kv = (k, v)`` host pages with A²ATS) and
    this step's ``k_new, v_new [n, n_str, D]``; writes ``output[rows, heads]``; then the ring keeps
    this step's sink and recent tokens."""
    d = k_new.shape[2]
    qsl, lens = md.qsl_host(), md.seq_lens_host()
    if ring is None:
        mk, mv = mirror_kv
        bt = md.block_table.cpu()
        bsz = mk.shape[1]
    for b in reqs:
        s0, e0 = qsl[b], qsl[b + 1]
        seq_len = lens[b]
        ctx = seq_len - (e0 - s0)
        old_pos = ring_kept(0, ctx, sink, recent)
        if ring is not None:
            r = ring[blocks[b]]  # [n_str, capacity, D + Dv]
            idx = torch.tensor([ring_slot(p, sink, recent) for p in old_pos], dtype=torch.long, device=r.device)
            k_old, v_old = r[:, idx, :d], r[:, idx, d:]
        else:
            pos = torch.tensor(old_pos, dtype=torch.long)
            blk, off = bt[b, pos // bsz].long(), pos % bsz
            k_old = mk[blk, off].transpose(0, 1).to(q.device)
            v_old = mv[blk, off].transpose(0, 1).to(q.device)
        k = torch.cat([k_old, k_new[s0:e0].transpose(0, 1).to(k_old.dtype)], dim=1)[None].to(q.dtype)
        v = torch.cat([v_old, v_new[s0:e0].transpose(0, 1).to(v_old.dtype)], dim=1)[None].to(q.dtype)
        k_pos = torch.tensor(old_pos + list(range(ctx, seq_len)), device=q.device)
        o = streaming_prefill(q[s0:e0].transpose(0, 1)[None], k, v, sink=sink, window=recent, scale=scale,
                              q_pos=k_pos[len(old_pos):], k_pos=k_pos)
        output[s0:e0].index_copy_(1, heads, o[0].transpose(0, 1).to(output.dtype))
        keep = ring_kept(ctx, seq_len, sink, recent) if ring is not None else []
        if keep:
            ki = torch.tensor([p - ctx for p in keep], dtype=torch.long, device=r.device) + s0
            slot = torch.tensor([ring_slot(p, sink, recent) for p in keep], dtype=torch.long, device=r.device)
            r[:, slot, :d] = k_new.index_select(0, ki).transpose(0, 1).to(r.dtype)
            r[:, slot, d:] = v_new.index_select(0, ki).transpose(0, 1).to(r.dtype)
