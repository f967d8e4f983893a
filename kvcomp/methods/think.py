"""ThinK: query-driven pruning of key channels, with the pruned keys stored narrower.

Storage per (layer, KV head): pages hold ``D_keep`` key channels + the full value of every token
(``k [blocks, block_size, Hkv, D_keep]``, ``v [..., Dv]``); the last ``window`` keys before the
current step also stay at full width in a per-request ring (``ring [blocks, Hkv, >= window, D]``,
position ``p`` in slot ``p % window``). Attention scores ``q[kept] . k_kept`` for the older keys
and ``q . k`` for the window and the step's own keys, as ThinK does.
"""

from __future__ import annotations

import torch

from .. import ops
from ..ref.attention import gather_paged
from .dense import attend, write_pages
from .step import Rows, Step


def full_width_tail(k_new: torch.Tensor, ring: torch.Tensor | None, ring_block: torch.Tensor | None,
                    seq_lens: torch.Tensor, window: int) -> torch.Tensor:
    """ThinK's full-width keys of a decode step, ``[d, Hkv, window + 1, D]`` in the layout of
    :func:`kvcomp.ops.think_decode` (token ``p`` in slot ``p % (window + 1)``).

    The ring (slot ``p % window``) gives the ``window`` keys before this step, ``k_new [d, Hkv, D]``
    this step's key.
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


class ThinK:
    """Static kept channels ``chan [Hkv, D_keep]`` (ascending) for every KV head of a layer."""

    name = "think"

    def __init__(self, channels: torch.Tensor, window: int, scale: float):
        self.chan, self.window, self.scale = channels, window, scale

    def write(self, store, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, md: Step | None = None) -> None:
        """The kept channels of the new keys ``[n, Hkv, D]`` and the values into their page slots."""
        write_pages(store.k, store.v, slots, k.gather(2, self.chan.unsqueeze(0).expand(k.shape[0], -1, -1)), v)

    def attend(self, store, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, md: Step, out: torch.Tensor) -> None:
        single, multi = md.rows()
        if single is not None:
            out[single.rows] = self.decode(store, q[single.rows], k[single.rows], single, md.max_seq_len).to(out.dtype)
        if multi is not None:
            self.prefill(store, q, k, md, multi.reqs, out)

    def decode(self, store, q: torch.Tensor, k_new: torch.Tensor, r: Rows, max_seq_len: int) -> torch.Tensor:
        """Keys before the last ``window + 1`` read pruned from the pages, the rest at full width;
        then this step's key enters the ring (slot ``p % window``)."""
        w = self.window
        rb = None if not w else store.ring_block.index_select(0, r.req_index)
        tail = full_width_tail(k_new, store.ring, rb, r.seq_lens, w).to(q.dtype)
        o = ops.think_decode(q, store.k, self.chan.unsqueeze(0), tail, store.v, r.block_table, r.seq_lens,
                             scale=self.scale, max_seq_len=max_seq_len)
        if w:
            store.ring[rb, :, torch.remainder(r.seq_lens.long() - 1, w)] = k_new.to(store.ring.dtype)
        return o

    def prefill(self, store, q: torch.Tensor, k_new: torch.Tensor, md: Step, reqs: list[int],
                output: torch.Tensor) -> None:
        """Multi-token rows: older keys pruned (scattered back to full width with zeros, which scores
        exactly ``q[kept] . k_kept``), the window and this step's keys at full width; then this
        step's keys among the last ``window`` enter the ring."""
        hkv, d = k_new.shape[1], k_new.shape[2]
        w, ring = self.window, store.ring
        blocks = [] if not w else store.ring_block.tolist()
        qsl, lens = md.qsl_host(), md.seq_lens_host()
        for b in reqs:
            s0, e0 = qsl[b], qsl[b + 1]
            seq_len = lens[b]
            ctx = seq_len - (e0 - s0)
            tail = min(w, ctx)
            kp = gather_paged(store.k, md.block_table, ctx - tail, b)  # [Hkv, Tp, Dk]
            kk = kp.new_zeros(hkv, kp.shape[1], d).scatter_(2, self.chan[:, None, :].expand(-1, kp.shape[1], -1), kp)
            kf = k_new[s0:e0].transpose(0, 1)
            if tail:
                slots = torch.tensor([p % w for p in range(ctx - tail, ctx)], device=kf.device)
                kf = torch.cat([ring[blocks[b]][:, slots].to(kf.dtype), kf], dim=1)
            kk = torch.cat([kk, kf.to(kk.dtype)], dim=1)
            output[s0:e0] = attend(q[s0:e0], kk, gather_paged(store.v, md.block_table, seq_len, b),
                                   self.scale).to(output.dtype)
            keep = [p for p in range(ctx, seq_len) if p >= seq_len - w] if w else []
            if keep:  # after attending
                rows = torch.tensor([p - ctx for p in keep], device=kf.device) + s0
                slot = torch.tensor([p % w for p in keep], device=kf.device)
                ring[blocks[b]][:, slot] = k_new.index_select(0, rows).transpose(0, 1).to(ring.dtype)
