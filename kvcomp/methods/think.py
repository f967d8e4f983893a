"""ThinK: query-driven pruning of key channels, with the pruned keys stored narrower.

Storage per (layer, KV head): pages hold ``D_keep`` key channels + the full value of every token
(``D_keep`` rounded up to a multiple of ``kvcomp.defaults.THINK_CHANNEL_MULTIPLE`` with the next-best
channels by ThinK's score, :func:`kvcomp.ref.think_kept_dim`: 80 of 128 at λ=0.4)
(``k [blocks, block_size, Hkv, D_keep]``, ``v [..., Dv]``); the last ``window`` keys before the
current step also stay at full width in a per-request ring (``ring [blocks, Hkv, >= window, D]``,
position ``p`` in slot ``p % window``). Attention scores ``q[kept] . k_kept`` for the older keys
and ``q . k`` for the window and the step's own keys, as ThinK does.
"""

from __future__ import annotations

import math

import torch

from .. import ops, ref
from ..defaults import THINK_CHANNEL_MULTIPLE
from ..ref.attention import gather_paged
from .dense import attend, write_pages
from .step import Rows, Step, grow


def tail_source(seq_lens: torch.Tensor, window: int) -> torch.Tensor:
    """``[d, window + 1]``: for each slot of :func:`full_width_tail`'s output, its source among the
    ring's ``window`` slots followed by this step's key (index ``window``)."""
    last = seq_lens.long()[:, None] - 1
    first = last - window
    s = torch.arange(window + 1, device=seq_lens.device)[None, :]
    p = first + torch.remainder(s - first, window + 1)  # the position slot s holds
    return torch.where(p == last, window, torch.remainder(p, window))  # negative p: never read


def _row_steps(ring: torch.Tensor) -> tuple[int, int, int, int]:
    """``(unit, block, head, slot)``: the row stride of :func:`ring_rows` (the gcd of the strides of the
    ring's block / head / slot dims that have more than one entry) and each dim's stride in rows."""
    if ring.stride(3) != 1:
        raise ValueError(f"ThinK ring of shape {list(ring.shape)} and strides {list(ring.stride())}: "
                         "needs a contiguous last dim")
    used = [ring.stride(i) for i in range(3) if ring.shape[i] > 1]
    unit = math.gcd(*used) if used else ring.shape[3]
    return (unit,) + tuple(ring.stride(i) // unit if ring.shape[i] > 1 else 0 for i in range(3))


def ring_rows(ring: torch.Tensor) -> torch.Tensor:
    """``ring [blocks, H, capacity, D]`` seen as rows ``[N, D]`` (a view, no copy; rows may overlap in
    memory, they are only read): slot ``s`` of head ``h`` of block ``b`` is row ``b * block + h * head +
    s * slot`` in the steps of :func:`_row_steps` (vLLM's ring pages, slot-major with the value beside the
    key, and their head / element slices; the transformers cache's rings).

    Raises:
        ValueError: a ring whose last dim is strided.
    """
    unit, sb, sh, ss = _row_steps(ring)
    n = (ring.shape[0] - 1) * sb + (ring.shape[1] - 1) * sh + (ring.shape[2] - 1) * ss + 1
    return ring.as_strided((n, ring.shape[3]), (unit, 1))


def tail_index(ring: torch.Tensor, ring_block: torch.Tensor, seq_lens: torch.Tensor,
               window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows [d * H * (window + 1)], requests [d], new [d], new_slots [d])`` for :func:`full_width_tail`:
    the :func:`ring_rows` row of each output slot (the ring slot of an older key; the new key's slot reads
    any row, then takes the key), the slot of each request's new key, and that slot as a flat slot of the
    tail seen as pages of ``window + 1`` slots (for the slot copy)."""
    dev = ring.device
    _, sb, sh, ss = _row_steps(ring)
    lens = seq_lens.to(dev)
    src = tail_source(lens, window).clamp(max=window - 1)
    heads = torch.arange(ring.shape[1], device=dev)[None, :, None] * sh
    rows = ring_block.to(dev).long()[:, None, None] * sb + heads + src[:, None, :] * ss
    new = torch.remainder(lens.long() - 1, window + 1)
    reqs = torch.arange(len(lens), device=dev)
    return rows.flatten(), reqs, new, (reqs * (window + 1) + new).contiguous()


def full_width_tail(k_new: torch.Tensor, ring: torch.Tensor | None, ring_block: torch.Tensor | None,
                    seq_lens: torch.Tensor, window: int, index: tuple | None = None,
                    rows_view: torch.Tensor | None = None) -> torch.Tensor:
    """ThinK's full-width keys of a decode step, ``[d, Hkv, window + 1, D]`` in the layout of
    :func:`kvcomp.ops.think_decode` (token ``p`` in slot ``p % (window + 1)``).

    The ring (slot ``p % window``) gives the ``window`` keys before this step (one row gather from
    :func:`ring_rows`), ``k_new [d, Hkv, D]`` this step's key; ``index``: :func:`tail_index` when
    already made for the step; ``rows_view``: ``ring_rows(ring)`` when the caller keeps it.
    """
    if window == 0:
        return k_new.unsqueeze(2)
    rows, reqs, new, new_slots = tail_index(ring, ring_block, seq_lens, window) if index is None else index
    d, h = k_new.shape[:2]
    tail = (ring_rows(ring) if rows_view is None else rows_view).index_select(0, rows).view(d, h, window + 1,
                                                                                           ring.shape[3])
    k_new = k_new if k_new.dtype == tail.dtype else k_new.to(tail.dtype)
    if tail.is_cpu:  # the native slot copy: each request's tail a page of window + 1 slots
        ops.scatter_tokens(tail.permute(0, 2, 1, 3), k_new, new_slots)
    else:
        tail[reqs, :, new] = k_new
    return tail


class ThinK:
    """Kept key channels per KV head of a layer: static ``channels [Hkv, D_keep]`` (ascending, e.g.
    calibrated), or None: chosen per request from its own prompt (ThinK's observation window of
    the last ``window`` queries, pruning ``prune_ratio`` of the channels, the kept count rounded up to a
    multiple of ``multiple``) into ``store.chan``."""

    name = "think"

    def __init__(self, channels: torch.Tensor | None, window: int, scale: float, prune_ratio: float | None = None,
                 multiple: int = THINK_CHANNEL_MULTIPLE):
        if channels is None and prune_ratio is None:
            raise ValueError("ThinK: give static channels or a prune_ratio to choose them per request")
        self.chan, self.window, self.scale, self.prune_ratio = channels, window, scale, prune_ratio
        self.multiple = multiple
        self._chan1 = None if channels is None else channels.unsqueeze(0)
        self._ring = None  # (ring, ring_rows(ring), the ring as pages [blocks, capacity, H, D]), once per ring tensor

    def channels(self, store) -> torch.Tensor:
        """``[num_reqs or 1, Hkv, D_keep]`` kept channels."""
        return self._chan1 if self._chan1 is not None else store.chan

    def ring_views(self, ring: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ring_rows(ring), ring as pages [blocks, capacity, H, D])``, made once per ring tensor (vLLM
        binds one per layer)."""
        v = self._ring
        if v is None or v[0] is not ring:
            v = self._ring = (ring, ring_rows(ring), ring.permute(0, 2, 1, 3))
        return v[1], v[2]

    def prepare(self, store, q: torch.Tensor, k: torch.Tensor, md: Step) -> None:
        """Query-driven channels, chosen at a request's first chunk from its last ``window`` queries
        (``q [n, Hq, D]``) and its keys ``k [n, Hkv, D]`` (ThinK's observation window)."""
        if self.chan is not None or store.chan is not None:
            return
        qsl = md.qsl_host()
        chans = []
        for b in range(md.num_reqs):
            qb, kb = q[qsl[b]:qsl[b + 1]].transpose(0, 1)[None], k[qsl[b]:qsl[b + 1]].transpose(0, 1)[None]
            w = min(self.window, qb.shape[2])
            scores = ref.think_channel_scores(qb[:, :, -w:], kb)
            chans.append(ref.think_keep_channels(scores, self.prune_ratio, self.multiple)[0])
        store.chan = torch.stack(chans).contiguous()

    def alloc(self, store, heads: int, batch: int, tokens: int, head_dim: int, dtype, device, pin: bool) -> None:
        """Narrow key pages, value pages and the window ring, one block per request."""
        dk = self.channels(store).shape[-1]
        store.k = grow(store.k, (batch, tokens, heads, dk), 1, dtype=dtype, device=device, pin=pin)
        store.v = grow(store.v, (batch, tokens, heads, head_dim), 1, dtype=dtype, device=device, pin=pin)
        if self.window and store.ring is None:
            store.ring = torch.zeros(batch, heads, self.window, head_dim, dtype=dtype, device=device,
                                     pin_memory=pin)
            store.ring_block = torch.arange(batch, device=device)

    def write(self, store, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, md: Step | None = None) -> None:
        """The kept channels of the new keys ``[n, Hkv, D]`` and the values into their page slots."""
        c = self.channels(store)
        c = c.expand(k.shape[0], -1, -1) if c.shape[0] == 1 else c.index_select(0, md.token_requests())
        write_pages(store.k, store.v, slots, k.gather(2, c), v)

    def attend(self, store, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, md: Step, out: torch.Tensor) -> None:
        single, multi = md.rows()
        if single is not None:
            single.put(out, self.decode(store, single.take(q), single.take(k), single, md.max_seq_len))
        if multi is not None:
            self.prefill(store, q, k, md, multi.reqs, out)

    def decode(self, store, q: torch.Tensor, k_new: torch.Tensor, r: Rows, max_seq_len: int) -> torch.Tensor:
        """Keys before the last ``window + 1`` read pruned from the pages, the rest at full width;
        then this step's key enters the ring (slot ``p % window``)."""
        w, ring = self.window, store.ring
        rb = tix = flat = None
        if w:
            def index():  # once per step (every layer's rings share the block ids and strides)
                b = store.ring_block.index_select(0, r.req_index)
                slot = torch.remainder(r.seq_lens.long() - 1, w)
                return b, tail_index(ring, b, r.seq_lens, w), slot, (b.long() * ring.shape[2] + slot).contiguous()

            rb, tix, slot, flat = r.memo(("think ring", w, ring.shape, ring.stride()), store.ring_block, index)
            rows_view, ring_pages = self.ring_views(ring)
            tail = full_width_tail(k_new, ring, rb, r.seq_lens, w, tix, rows_view)
        else:
            tail = full_width_tail(k_new, ring, rb, r.seq_lens, w)
        tail = tail if tail.dtype == q.dtype else tail.to(q.dtype)
        c = self.channels(store)
        c = c if c.shape[0] == 1 else c.index_select(0, r.req_index)
        o = ops.think_decode(q, store.k, c, tail, store.v, r.block_table, r.seq_lens, scale=self.scale,
                             max_seq_len=max_seq_len)
        if w:
            k_ring = k_new if k_new.dtype == ring.dtype else k_new.to(ring.dtype)
            if ring.is_cpu:  # each ring a page of `capacity` slots: the (native) slot copy
                ops.scatter_tokens(ring_pages, k_ring, flat)
            else:
                ring[rb, :, slot] = k_ring
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
        chan = self.channels(store)
        for b in reqs:
            s0, e0 = qsl[b], qsl[b + 1]
            seq_len = lens[b]
            ctx = seq_len - (e0 - s0)
            tail = min(w, ctx)
            cb = chan[0 if chan.shape[0] == 1 else b].to(store.k.device)
            kp = gather_paged(store.k, md.block_table, ctx - tail, b)  # [Hkv, Tp, Dk]
            kk = kp.new_zeros(hkv, kp.shape[1], d).scatter_(2, cb[:, None, :].expand(-1, kp.shape[1], -1), kp)
            kf = k_new[s0:e0].transpose(0, 1)
            if tail:
                slots = torch.tensor([p % w for p in range(ctx - tail, ctx)], device=ring.device)
                kf = torch.cat([ring[blocks[b]][:, slots].to(kf.device, kf.dtype), kf], dim=1)
            kk = torch.cat([kk, kf.to(kk.device, kk.dtype)], dim=1)
            output[s0:e0] = attend(q[s0:e0], kk, gather_paged(store.v, md.block_table, seq_len, b),
                                   self.scale).to(output.dtype)
            keep = [p for p in range(ctx, seq_len) if p >= seq_len - w] if w else []
            if keep:  # after attending
                rows = torch.tensor([p - ctx for p in keep], device=k_new.device) + s0
                slot = torch.tensor([p % w for p in keep], device=ring.device)
                ring[blocks[b]][:, slot] = k_new.index_select(0, rows).transpose(0, 1).to(ring.device, ring.dtype)
