"""A²ATS: windowed-RoPE query-aware VQ codes on the device, full K/V offloaded, top-K exact attention.

Storage per (layer, KV head): one int16 code per token in the pages (``codes [blocks, block_size,
H]``) and the full K/V in host memory laid out like the pages (``mirror = (k, v)``, each
``[blocks, block_size, H, D]``; pinned when CUDA is present). A query of more than one token
(prefill, chunked prefill) attends exactly to every token; a one-token query scores every cached
code through the windowed-RoPE lookup table, keeps each query head's ``topk`` tokens (union over
the GQA group) plus ``sink`` first and ``local`` last tokens, and attends exactly over them, read
from the host copy. Codes of the step's tokens are written before attending, so the current token
is always among the ``local`` ones. ``vq.select == "oracle"`` ranks by the exact logits of the host
keys instead (:func:`kvcomp.ref.paged_exact_topk`): an analysis baseline, not a product path.
"""

from __future__ import annotations

import torch

from .. import ops, ref
from .dense import dense_rows, write_pages
from .step import Rows, Step, Store, grow
from .think import full_width_tail


def topk_tokens(topk: float, seq_len):
    """Tokens each query head keeps: ``topk`` itself when ``>= 1``, else ``round(topk * seq_len)``
    (at least 1). ``seq_len`` may be an int or an int tensor (per request, on the device)."""
    if topk >= 1:
        return int(topk)
    if isinstance(seq_len, torch.Tensor):
        return torch.clamp(torch.round(seq_len.double() * topk), min=1).to(torch.int32)
    return max(1, round(seq_len * topk))


class A2ATS:
    """One layer's A²ATS heads: their codebooks, RoPE table and host K/V.

    With ``think`` (a :class:`~kvcomp.methods.think.ThinK`), the host keys are stored ThinK's way
    (narrow pages + a full-width window ring, ``store.ring``, on the host) and the selected keys are
    widened back with zeros, which scores exactly ``q[kept] . k_kept``.
    """

    name = "vq"

    def __init__(self, vq, layer: int, heads: list[int], inv_freq: torch.Tensor, scaling: float, scale: float,
                 device: torch.device, think=None):
        """``vq``: :class:`kvcomp.config.VQRetrieval`; ``heads``: global KV heads held in the code
        pages, in page order."""
        self.vq, self.scale, self.scaling, self.think = vq, scale, scaling, think
        idx = torch.tensor(heads, dtype=torch.long)
        self.codebook = vq.codebook[layer, idx].float().to(device)
        self.whiten = vq.whiten[layer, idx].float().to(device)
        self.inv_freq = inv_freq.to(device)
        self.n_heads = len(heads)  # the mirror's first heads (DuoAttention appends its streaming heads)
        if vq.select != "codes" and think is not None:
            raise ValueError(f"vq.select={vq.select!r} ranks full-width keys: not with ThinK-pruned host keys")

    def mirror_kv(self, store) -> tuple[torch.Tensor, torch.Tensor]:
        """The host pages ``(k, v)`` of this method's heads (the mirror's first ``n_heads``)."""
        mk, mv = store.mirror
        return mk[:, :, : self.n_heads], mv[:, :, : self.n_heads]

    def alloc(self, store, heads: int, batch: int, tokens: int, head_dim: int, dtype, device, pin: bool) -> None:
        """Code pages on the device, K/V pages on the host (ThinK's narrow keys + window ring with
        ``think``), one block per request."""
        store.codes = grow(store.codes, (batch, tokens, heads), 1, dtype=torch.int16, device=device)
        if self.think is not None:
            hs = self.host_store(store)
            self.think.alloc(hs, heads, batch, tokens, head_dim, dtype, "cpu", pin)
            store.mirror, store.ring, store.ring_block, store.host_ring = (hs.k, hs.v), hs.ring, hs.ring_block, True
            return
        mk, mv = store.mirror or (None, None)
        store.mirror = tuple(grow(t, (batch, tokens, heads, head_dim), 1, dtype=dtype, device="cpu", pin=pin)
                             for t in (mk, mv))

    def host_store(self, store) -> Store:
        """The host pages as a ThinK store (narrow keys, values, window ring, channels)."""
        mk, mv = store.mirror or (None, None)
        return Store(k=mk, v=mv, ring=store.ring, ring_block=store.ring_block, chan=store.chan)

    def prepare(self, store, q: torch.Tensor, k: torch.Tensor, md: Step) -> None:
        """ThinK's per-request channels, when the host keys are pruned."""
        if self.think is not None:
            hs = self.host_store(store)
            self.think.prepare(hs, q, k, md)
            store.chan = hs.chan

    def write(self, store, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, md: Step | None = None) -> None:
        """The K/V ``[n, H, D]`` into the host pages (codes need positions: :meth:`attend`)."""
        if self.think is not None:
            self.think.write(self.host_store(store), slots, k, v, md)
        else:
            write_pages(*store.mirror, slots, k, v)

    def write_codes(self, store, key: torch.Tensor, md: Step) -> None:
        """Encode the step's (post-RoPE) keys ``[n, H, D]`` into their code slots."""
        cos, sin = ref.rope_cos_sin(md.positions(), self.inv_freq, self.scaling)
        k_pre = ref.unapply_rope(key.float(), cos[:, None, :], sin[:, None, :])
        ops.vq_encode_paged(k_pre, self.codebook, self.whiten, store.codes, md.block_table, md.seq_lens,
                            md.query_start_loc)

    def attend(self, store, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, md: Step, out: torch.Tensor) -> None:
        """Write the step's codes, then exact attention for multi-token rows and top-K sparse
        attention for one-token rows; ``q [n, Hq', D]`` holds the query heads of this method's KV
        heads (GQA groups in page order)."""
        self.write_codes(store, k, md)
        single, multi = md.rows()
        if multi is not None:  # each request's K/V from the host pages to q's device, one dense call
            if self.think is not None:
                self.think.prefill(self.host_store(store), q, k, md, multi.reqs, out)
            else:
                dense_rows(q, *self.mirror_kv(store), md, multi.reqs, self.scale, out)
        if single is not None:
            out[single.rows] = self.decode(store, q[single.rows], single, md.max_seq_len,
                                           None if k is None else k[single.rows]).to(out.dtype)

    def decode(self, store, q: torch.Tensor, r: Rows, max_seq_len: int, k_new: torch.Tensor | None = None
               ) -> torch.Tensor:
        """Windowed-RoPE LUT, top-K over the code pages, exact attention over the selected host rows."""
        lens = r.seq_lens.long()
        topk = topk_tokens(self.vq.topk, lens)
        if self.vq.select == "oracle":  # exact q.k ranking over the host keys (reference code: analysis only)
            idx, count = ref.paged_exact_topk(q.cpu(), self.mirror_kv(store)[0], r.block_table.cpu(),
                                              r.seq_lens.cpu(), topk=topk.cpu() if isinstance(topk, torch.Tensor)
                                              else topk, sink=self.vq.sink, local=self.vq.local, scale=self.scale)
            idx, count = idx.to(lens.device), count.to(lens.device)
        else:
            cos, sin = ref.rope_cos_sin(lens - 1, self.inv_freq, self.scaling)
            q_pre = ref.unapply_rope(q.float(), cos[:, None, :], sin[:, None, :])
            qw = ref.windowed_rope_query(q_pre, self.inv_freq, self.vq.rel_pos, self.scaling)
            lut = ops.vq_lut(qw.contiguous(), self.codebook, scale=self.scale)
            kw = {}
            if isinstance(topk, torch.Tensor):
                kw["topk_max"] = topk_tokens(self.vq.topk, max(int(max_seq_len), 1))
            idx, count = ops.vq_topk(lut, store.codes, r.block_table, r.seq_lens, topk=topk, sink=self.vq.sink,
                                     local=self.vq.local, **kw)
        self.last_selected = count.float().mean() / lens.float().mean()  # fraction attended (a tensor: no sync)
        if self.think is None:
            return ops.sparse_attention_host(q, *self.mirror_kv(store), idx, count, block_table=r.block_table,
                                             scale=self.scale)
        k_sel, v_sel = self._widened_rows(store, idx, r, k_new)
        table = torch.arange(k_sel.shape[0], dtype=torch.int32)[:, None]
        local = torch.arange(k_sel.shape[1], dtype=torch.int32).expand(idx.shape).contiguous()
        return ops.sparse_attention_host(q, k_sel, v_sel, local, count, block_table=table, scale=self.scale)

    def _widened_rows(self, store, idx: torch.Tensor, r: Rows, k_new: torch.Tensor):
        """ThinK host keys of the selected positions ``idx [d, H, K]`` at full width, and their values,
        as one host page per request ``[d, K, H, D]``; then the step's key enters the window ring."""
        hs = self.host_store(store)
        t = self.think
        mk, mv = hs.k, hs.v
        bs = mk.shape[1]
        pos = idx.long().cpu()
        d_rows, h, kmax = pos.shape
        bt = r.block_table.cpu().long()
        blk = torch.gather(bt, 1, (pos // bs).view(d_rows, -1)).view_as(pos)
        head = torch.arange(h)[None, :, None].expand_as(pos)
        narrow, v_sel = mk[blk, pos % bs, head], mv[blk, pos % bs, head]  # [d, H, K, Dk], [d, H, K, Dv]
        c = t.channels(hs).cpu()
        c = c if c.shape[0] == 1 else c.index_select(0, r.req_index.cpu())
        dim = k_new.shape[-1]
        wide = narrow.new_zeros(d_rows, h, kmax, dim).scatter_(3, c[:, :, None, :].expand(d_rows, -1, kmax, -1),
                                                                 narrow)
        w = t.window
        rb = None if not w else hs.ring_block.index_select(0, r.req_index.to(hs.ring_block.device))
        ring_dev = hs.ring.device if w else torch.device("cpu")  # the HF path's host ring, or vLLM's device ring
        tail = full_width_tail(k_new.to(ring_dev, hs.v.dtype), hs.ring, rb, r.seq_lens.to(ring_dev), w).cpu()
        last = r.seq_lens.long().cpu()[:, None, None] - 1
        in_tail = pos >= last - w
        from_tail = torch.gather(tail, 2, torch.remainder(pos, w + 1)[..., None].expand(-1, -1, -1, dim))
        k_sel = torch.where(in_tail[..., None], from_tail.to(wide.dtype), wide)
        if w:  # after selecting: the step's key takes its window slot
            hs.ring[rb, :, torch.remainder(last[:, 0, 0], w).to(ring_dev)] = k_new.to(ring_dev, hs.ring.dtype)
        return k_sel.transpose(1, 2).contiguous(), v_sel.transpose(1, 2).contiguous()
