"""DuoAttention: retrieval heads keep every token, streaming heads only ``sink`` + ``recent`` tokens.

Storage per layer: the retrieval heads are another method's heads (exact pages, :class:`Dense`,
ThinK's narrow pages, or A²ATS code pages); the streaming heads keep their kept tokens in a per-request ring
(``ring [blocks, n_str, capacity, D + Dv]``, position ``p`` in slot :func:`ring_slot`) — or, when
the retrieval heads are A²ATS heads, in the host pages beside theirs (nothing on the device).
Streaming heads see the first ``sink`` tokens and a window of ``recent`` tokens (counting the
query itself), in decode and in prefill.

This module is the one home of the streaming positions: which tokens a ring holds
(:func:`ring_kept`), where (:func:`ring_slot`), and the decode selection (:func:`streaming_selection`).
"""

from __future__ import annotations

import torch

from .. import ops
from ..ops._dispatch import impl_for
from ..ops.prefill import streaming_prefill_varlen
from ..ref.cache_write import streaming_slot as ring_slot
from .a2ats import A2ATS
from .dense import Dense, dense_rows, head_map, write_pages
from .step import Rows, Step, Store, concat_ranges, grow
from .think import ThinK

__all__ = ["DuoAttention", "StreamingHeads", "ring_kept", "ring_slot", "shared_ring", "streaming_selection", "think_view"]


def ring_kept(start: int, end: int, sink: int, recent: int) -> list[int]:
    """Positions of ``[0, end)`` a ring holds after writing the tokens before ``end``, restricted
    to ``[start, end)``: the sink ones and the last ``recent``."""
    tail = max(start, sink, end - recent)
    return list(range(start, min(end, sink))) + list(range(tail, end))


def shared_ring(n_str: int, n_ret: int, kept: int, think_slots: int) -> tuple[list[int], list[int], int]:
    """Where the ring DuoAttention + ThinK share (``[blocks, n_str, capacity, 2D]``) keeps ThinK's
    window: ``(ring head, first slot)`` of each retrieval head's ``think_slots`` slots (keys in their
    first ``D`` elements) and the capacity the ring needs. Slots ``[0, kept)`` are the streaming
    heads' (sink + recent K/V); past them each retrieval head takes ``think_slots`` slots of its own
    streaming head when there are enough (``n_ret <= n_str``), else of the first one, one run after
    the other, so that the windows are one strided view (:func:`think_view`) and the ring holds
    ``n_str`` heads, not ``n_str + n_ret`` heads of ``kept`` slots (vLLM makes the retrieval pages'
    blocks as large as the ring: SmolLM2 duo+think 768 -> 256 tokens)."""
    if n_ret <= n_str:
        return list(range(n_ret)), [kept] * n_ret, kept + think_slots
    return [0] * n_ret, [kept + j * think_slots for j in range(n_ret)], kept + n_ret * think_slots


def think_view(ring: torch.Tensor, n_ret: int, kept: int, think_slots: int, d: int) -> torch.Tensor:
    """ThinK's window ``[blocks, n_ret, think_slots, d]`` in a shared ring (:func:`shared_ring`), a view."""
    if n_ret <= ring.shape[1]:
        return ring[:, :n_ret, kept:kept + think_slots, :d]
    return ring[:, 0, kept:kept + n_ret * think_slots, :d].unflatten(1, (n_ret, think_slots))


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


def head_picker(heads: list[int]):
    """``f(x)`` = ``x``'s heads ``heads`` along dim 1 (``x [n, H, D]``): a strided view when they are evenly
    spaced (one op, no copy: every page and ring write reads it in place), else an index_select."""
    steps = {b - a for a, b in zip(heads, heads[1:])}  # empty for one head
    if heads and len(steps) <= 1 and min(steps, default=1) > 0:
        sl = slice(heads[0], heads[-1] + 1, min(steps, default=1))
        return lambda x: x[:, sl]
    idx = torch.tensor(heads, dtype=torch.long)
    return lambda x: x.index_select(1, idx if idx.device == x.device else idx.to(x.device))


class StreamingHeads:
    """DuoAttention's streaming heads on their own: a per-request ring of ``sink + recent`` tokens
    (``store.ring``, ``store.ring_block``), or the host pages ``store.mirror`` beside A²ATS heads."""

    name = "streaming"

    def __init__(self, sink: int, recent: int, scale: float):
        self.sink, self.recent, self.scale = sink, recent, scale
        self._hm = None  # head map of the decode op (every head streaming), built on first use
        self._views = None  # (ring, d, its slot-copy key / value views, its key / value views): see ring_views

    def ring_views(self, ring: torch.Tensor, d: int) -> tuple:
        """``(pages k, pages v, ring k, ring v)``: the ring as pages of ``capacity`` slots (key and value
        parts, for the slot copy) and its key / value parts ``[blocks, H, capacity, d]`` (for the decode
        op); made once per ring tensor (vLLM binds one per layer)."""
        v = self._views
        if v is None or v[0] is not ring or v[1] != d:
            pages = ring.permute(0, 2, 1, 3)
            v = self._views = (ring, d, pages[..., :d], pages[..., d:], ring[..., :d], ring[..., d:2 * d])
        return v[2:]

    def alloc(self, store, heads: int, batch: int, tokens: int, head_dim: int, dtype, device, pin: bool) -> None:
        """A ring per request, of the kept tokens so far (at most ``sink + recent``: slot ``p`` holds
        position ``p`` until the ring is full)."""
        cap = min(tokens, self.sink + self.recent)
        store.ring = grow(store.ring, (batch, heads, cap, 2 * head_dim), 2, dtype=dtype, device=device)
        if store.ring_block is None:
            store.ring_block = torch.arange(batch, device=device)

    def write(self, store, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, md: Step | None = None) -> None:
        """Nothing before attending: the ring keeps the step's tokens in :meth:`attend` (it needs positions)."""

    def attend(self, store, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, md: Step, out: torch.Tensor) -> None:
        single, multi = md.rows()
        if single is not None:
            single.put(out, self.decode(store, single.take(q), single.take(k), single.take(v), single))
        if multi is not None:
            self.prefill(store, q, k, v, md, multi.reqs, out)

    def ring_write(self, store, r: Rows, k_new: torch.Tensor, v_new: torch.Tensor) -> torch.Tensor:
        """Put one token per request of ``r`` (``k_new, v_new [d, n, D]`` at ``seq_lens - 1``) into
        its ring; returns the requests' ring ids ``[d]`` (``store.ring`` is read in place)."""
        ring, d = store.ring, k_new.shape[-1]

        def index():  # once per step (every layer's rings share the block ids)
            rb = store.ring_block.index_select(0, r.req_index)
            slot = ring_slot(r.seq_lens.long() - 1, self.sink, self.recent)
            return rb, slot, (rb.long() * ring.shape[2] + slot).contiguous()

        rb, slot, flat = r.memo(("duo ring", self.sink, self.recent, ring.shape[2]), store.ring_block, index)
        if ring.is_cpu and impl_for(ring, "scatter_tokens") == "native":
            pk, pv, _, _ = self.ring_views(ring, d)  # each ring a page of `capacity` slots: the native slot copy
            write_pages(pk, pv, flat, k_new, v_new)
        else:
            ring[rb, :, slot, :d] = k_new.to(ring.dtype)
            ring[rb, :, slot, d:] = v_new.to(ring.dtype)
        return rb

    def decode(self, store, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, r: Rows) -> torch.Tensor:
        """One token per request over its ring, read in place: ``kvcomp::duo_decode`` with every head
        streaming."""
        rb = self.ring_write(store, r, k_new, v_new)
        ring, d = store.ring, k_new.shape[-1]
        if self._hm is None or self._hm.shape[0] != ring.shape[1] or self._hm.device != ring.device:
            self._hm = head_map([], list(range(ring.shape[1])), ring.device)
        none = ring.new_empty(0, 1, 0, d)  # no retrieval head
        _, _, rk, rv = self.ring_views(ring, d)
        return ops.triton_duo_decode_attention(q, none, none, r.block_table, r.seq_lens, rk, rv, self._hm,
                                               sink=self.sink, window=self.recent, scale=self.scale, ring_block=rb)

    def prefill(self, store, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, md: Step, reqs: list[int],
                output: torch.Tensor, heads: torch.Tensor | None = None) -> None:
        """Multi-token rows: ``q [n, Hq_str, D]`` over the kept earlier tokens (the ring, or the host
        pages ``store.mirror``) and this step's ``k_new, v_new [n, n_str, D]``, every request in one
        varlen :func:`~kvcomp.ops.prefill.streaming_prefill_varlen` call; writes ``output[rows,
        heads]`` (default: every head); then the ring keeps this step's sink and recent tokens."""
        d, ring = k_new.shape[2], store.ring
        anchor = md.block_table if ring is None else store.ring_block
        bs = store.mirror[0].shape[1] if ring is None else None  # host pages [blocks, block_size, H, D]
        _, multi = md.rows()
        if multi is not None and multi.reqs == reqs:  # the step's layers share the index tensors
            p = multi.memo(("streaming prefill", self.sink, self.recent, bs, q.device), anchor,
                           lambda: self._plan(md, reqs, anchor, q.device, bs))
        else:
            p = self._plan(md, reqs, anchor, q.device, bs)
        kv_new = torch.cat([k_new, v_new], dim=-1)  # [n, n_str, D + Dv]: like a ring slot
        if ring is not None:
            old = ring[p["old_blk"], :, p["old_slot"]]  # [m, n_str, D + Dv]: a copy, read before the writes
        else:  # gathered from the host pages (zero-copy onto a GPU with the CUDA extension)
            mk, mv = store.mirror
            idx = p["old_flat"].expand(mk.shape[2], -1)
            old = torch.cat([ops.gather_tokens(t, idx) for t in (mk, mv)], dim=-1).transpose(0, 1)
        span = p["span"]
        q_rows = q[span[0]:span[1]] if span is not None else q.index_select(0, p["rows"])
        kv = old.new_empty((p["total_k"], *old.shape[1:]), dtype=q.dtype)  # each request's kept, then new rows
        kv.index_copy_(0, p["old_dst"], old.to(q.dtype))
        new = kv_new[span[0]:span[1]] if span is not None else kv_new.index_select(0, p["rows"])
        kv.index_copy_(0, p["new_dst"], new.to(old.dtype).to(q.dtype))
        o = streaming_prefill_varlen(q_rows, kv[..., :d], kv[..., d:], p["q_pos"], p["k_pos"], p["cu_q"], p["cu_k"],
                                     sink=self.sink, window=self.recent, scale=self.scale)
        o = o.to(output.dtype)
        if span is not None and heads is None:
            output[span[0]:span[1]] = o
        elif span is not None:
            output[span[0]:span[1]].index_copy_(1, heads, o)
        elif heads is None:
            output.index_copy_(0, p["rows"], o)
        else:
            output[p["rows"][:, None], heads[None, :]] = o
        if ring is not None and p["keep_src"].numel():  # after attending: key and value of a slot in one write
            ring[p["keep_blk"], :, p["keep_slot"]] = kv_new.index_select(0, p["keep_src"]).to(ring.dtype)

    def _plan(self, md: Step, reqs: list[int], anchor: torch.Tensor, device, bs: int | None) -> dict:
        """Index tensors of :meth:`prefill` for the requests ``reqs`` of ``md`` (once per step): packed
        rows, request ``i``'s keys at ``cu_k[i] : cu_k[i + 1]`` (its kept earlier tokens, then its new
        ones), their positions, where the kept tokens are read (ring blocks and slots from ``anchor =
        store.ring_block``, or with the host pages' block size ``bs`` flat slots from ``anchor =
        md.block_table``) and which new tokens the ring keeps."""
        sink, recent = self.sink, self.recent
        qsl, lens = md.qsl_host(), md.seq_lens_host()
        starts = [qsl[b] for b in reqs]
        qlens = [qsl[b + 1] - qsl[b] for b in reqs]
        ctxs = [lens[b] - n for b, n in zip(reqs, qlens)]
        olds = [ring_kept(0, c, sink, recent) for c in ctxs]
        keeps = [ring_kept(c, lens[b], sink, recent) for b, c in zip(reqs, ctxs)]
        nold = [len(x) for x in olds]
        cu_q = torch.tensor([0, *qlens], dtype=torch.long).cumsum(0)
        cu_k = torch.tensor([0, *(a + b for a, b in zip(qlens, nold))], dtype=torch.long).cumsum(0)
        qn, on = torch.tensor(qlens), torch.tensor(nold)
        # row j of request i: new tokens at cu_k[i] + nold[i] + j, kept ones at cu_k[i] + j
        new_dst = concat_ranges(cu_k[:-1] + on, qn)
        old_dst = concat_ranges(cu_k[:-1], on)
        q_pos = concat_ranges(ctxs, qn)
        old_pos = torch.tensor([x for o in olds for x in o], dtype=torch.long)
        k_pos = torch.empty(int(cu_k[-1]), dtype=torch.long)
        k_pos[old_dst], k_pos[new_dst] = old_pos, q_pos
        first, end = starts[0], starts[-1] + qlens[-1]
        span = (first, end) if end - first == sum(qlens) else None
        rows = concat_ranges(starts, qn)
        p = {"cu_q": cu_q, "cu_k": cu_k, "total_k": int(cu_k[-1]), "span": span}
        for name, t in (("new_dst", new_dst), ("old_dst", old_dst), ("q_pos", q_pos), ("k_pos", k_pos),
                        ("rows", rows)):
            p[name] = t.to(device)
        req = torch.repeat_interleave(torch.tensor(reqs), on).to(anchor.device)
        if bs is not None:  # flat slots of the host pages: block_table[b, pos // bs] * bs + pos % bs
            op = old_pos.to(anchor.device)
            p["old_flat"] = (anchor[req, op // bs].long() * bs + op % bs).to(device)
            return p
        p["old_blk"] = anchor.index_select(0, req).long()
        p["old_slot"] = ring_slot(old_pos, sink, recent).to(anchor.device)
        kn = torch.tensor([len(x) for x in keeps])
        keep_pos = torch.tensor([x for k in keeps for x in k], dtype=torch.long)
        p["keep_src"] = (keep_pos + torch.repeat_interleave(torch.tensor(starts) - torch.tensor(ctxs), kn)).to(device)
        p["keep_blk"] = anchor.index_select(0, torch.repeat_interleave(torch.tensor(reqs), kn).to(anchor.device)).long()
        p["keep_slot"] = ring_slot(keep_pos, sink, recent).to(anchor.device)
        return p


class DuoAttention:
    """A layer's KV heads split into ``retrieval`` heads (held by ``inner``: :class:`Dense`,
    :class:`ThinK` or :class:`A2ATS`, with or without ThinK) and streaming heads
    (:class:`StreamingHeads`), sharing one page tensor (vLLM's layout: pages of the retrieval heads,
    a ring — or the host pages — for the streaming heads).

    Views per part (:meth:`stores`): with :class:`Dense` the whole store is both's (one fused decode
    op); with :class:`ThinK` the ring is shared: the streaming heads' ``sink + recent`` slots
    (``ring[:, :, :sink + recent]``), then ThinK's window of the retrieval heads (``think_slots``
    slots each: :func:`shared_ring`, :func:`think_view`); with :class:`A2ATS` the host
    pages hold the retrieval heads first (keys in their first ``key_dim`` elements: ThinK's narrow
    keys), then the streaming heads at full width, and the ring (if any) is ThinK's.
    """

    name = "duo"

    def __init__(self, inner: Dense | ThinK | A2ATS, retrieval: list[int], streaming: list[int], group: int,
                 sink: int, recent: int, scale: float, device, key_dim: int | None = None, think_slots: int = 0):
        self.inner, self.scale, self.key_dim, self.think_slots = inner, scale, key_dim, think_slots
        self.streaming = StreamingHeads(sink, recent, scale)
        self.kv_ret = torch.tensor(retrieval, device=device)
        self.kv_str = torch.tensor(streaming, device=device)
        self.q_ret = torch.tensor([h * group + i for h in retrieval for i in range(group)], device=device)
        self.q_str = torch.tensor([h * group + i for h in streaming for i in range(group)], device=device)
        self.hm = head_map(retrieval, streaming, device)
        self.in_mirror = isinstance(inner, A2ATS)  # streaming heads' K/V beside the A²ATS heads' on the host
        self.n_ret, self.n_str = len(retrieval), len(streaming)
        self.ret_heads, self.str_heads = head_picker(retrieval), head_picker(streaming)  # of k, v [n, Hkv, D]

    def stores(self, store) -> tuple[Store, Store]:
        """``(retrieval heads' store, streaming heads' store)``: views of the layer's storage."""
        n_ret, n_str = self.n_ret, self.n_str
        if self.in_mirror:
            mk, mv = store.mirror
            kd = self.key_dim or mk.shape[-1]
            inner = Store(codes=store.codes, ring=store.ring, ring_block=store.ring_block, chan=store.chan,
                          mirror=(mk[:, :, :n_ret, :kd], mv[:, :, :n_ret]))
            return inner, Store(mirror=(mk[:, :, n_ret:], mv[:, :, n_ret:]))
        if isinstance(self.inner, ThinK):
            ring, kept = store.ring, self.streaming.sink + self.streaming.recent
            shared = None if ring is None else think_view(ring, n_ret, kept, self.think_slots, store.v.shape[-1])
            inner = Store(k=store.k, v=store.v, ring=shared, ring_block=store.ring_block, chan=store.chan)
            return inner, Store(ring=None if ring is None else ring[:, :n_str, :kept], ring_block=store.ring_block)
        return store, store

    def write(self, store, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, md: Step | None = None) -> None:
        """Retrieval heads through ``inner`` (their pages, or A²ATS's host pages); with A²ATS the
        streaming heads' K/V into the host pages beside them; otherwise streaming heads enter the
        ring in :meth:`attend` (it needs positions)."""
        ret, st = self.stores(store)
        self.inner.write(ret, slots, self.ret_heads(k), self.ret_heads(v), md)
        if self.in_mirror:
            write_pages(*st.mirror, slots, self.str_heads(k), self.str_heads(v))

    def attend(self, store, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, md: Step, out: torch.Tensor) -> None:
        """Retrieval heads through ``inner``, streaming heads over their kept tokens and the step's
        own; the step's streaming keys then stay in the ring."""
        single, multi = md.rows()
        k_str, v_str = self.str_heads(k), self.str_heads(v)
        q_str = None if isinstance(self.inner, Dense) and multi is None else q.index_select(1, self.q_str)
        ret, st = self.stores(store)
        if isinstance(self.inner, Dense):  # one decode op for both kinds of heads
            if single is not None:
                single.put(out, self.decode(store, single.take(q), single.take(k_str), single.take(v_str), single))
            if multi is not None:
                dense_rows(q.index_select(1, self.q_ret), store.k, store.v, md, multi.reqs, self.scale, out,
                           heads=self.q_ret)
        else:
            n = q.shape[0]
            o = torch.empty(n, len(self.q_ret), out.shape[-1], dtype=out.dtype, device=out.device)
            self.inner.attend(ret, q.index_select(1, self.q_ret), self.ret_heads(k), self.ret_heads(v), md, o)
            out[:n].index_copy_(1, self.q_ret, o)
            if single is not None:
                if self.in_mirror:
                    idx, count = streaming_selection(single.seq_lens, self.n_str, self.streaming.sink,
                                                     self.streaming.recent)
                    o = ops.sparse_attention_host(q_str[single.rows], *st.mirror, idx, count,
                                                  block_table=single.block_table, scale=self.scale)
                else:
                    o = self.streaming.decode(st, q_str[single.rows], k_str[single.rows], v_str[single.rows], single)
                out[single.rows[:, None], self.q_str[None, :]] = o.to(out.dtype)
        if multi is not None:
            self.streaming.prefill(st, q_str, k_str, v_str, md, multi.reqs, out, heads=self.q_str)

    def decode(self, store, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, r: Rows) -> torch.Tensor:
        """One op call for both kinds of heads: retrieval heads over their pages, streaming heads over
        their ring, which takes this step's ``k_new, v_new [d, n_str, D]`` first."""
        s = self.streaming
        rb = s.ring_write(store, r, k_new, v_new)
        _, _, rk, rv = s.ring_views(store.ring, k_new.shape[-1])
        return ops.triton_duo_decode_attention(q, store.k, store.v, r.block_table, r.seq_lens, rk, rv, self.hm,
                                               sink=s.sink, window=s.recent, scale=self.scale, ring_block=rb)
