"""A²ATS: windowed-RoPE query-aware VQ codes on the device, full K/V offloaded, top-K exact attention.

Storage per (layer, KV head): one int16 code per token in the pages (``codes [blocks, block_size,
H]``) and the full K/V in host memory laid out like the pages (``mirror = (k, v)``, each
``[blocks, block_size, H, D]``; pinned when CUDA is present). A query of more than one token
(prefill, chunked prefill) attends exactly to every token; a one-token query scores every cached
code through the windowed-RoPE lookup table, keeps each query head's ``topk`` tokens (union over
the GQA group) plus ``sink`` first and ``local`` last tokens, and attends exactly over them, read
from the host copy. Codes of the step's tokens are written before attending, so the current token
is always among the ``local`` ones.
"""

from __future__ import annotations

import torch

from .. import ops, ref
from .dense import dense_rows, write_pages
from .step import Rows, Step


def topk_tokens(topk: float, seq_len):
    """Tokens each query head keeps: ``topk`` itself when ``>= 1``, else ``round(topk * seq_len)``
    (at least 1). ``seq_len`` may be an int or an int tensor (per request, on the device)."""
    if topk >= 1:
        return int(topk)
    if isinstance(seq_len, torch.Tensor):
        return torch.clamp(torch.round(seq_len.double() * topk), min=1).to(torch.int32)
    return max(1, round(seq_len * topk))


class A2ATS:
    """One layer's A²ATS heads: their codebooks, RoPE table and host K/V."""

    name = "vq"

    def __init__(self, vq, layer: int, heads: list[int], inv_freq: torch.Tensor, scaling: float, scale: float,
                 device: torch.device):
        """``vq``: :class:`kvcomp.config.VQRetrieval`; ``heads``: global KV heads held in the code
        pages, in page order."""
        self.vq, self.scale, self.scaling = vq, scale, scaling
        idx = torch.tensor(heads, dtype=torch.long)
        self.codebook = vq.codebook[layer, idx].float().to(device)
        self.whiten = vq.whiten[layer, idx].float().to(device)
        self.inv_freq = inv_freq.to(device)
        self.n_heads = len(heads)  # the mirror's first heads (DuoAttention appends its streaming heads)

    def mirror_kv(self, store) -> tuple[torch.Tensor, torch.Tensor]:
        """The host pages ``(k, v)`` of this method's heads (the mirror's first ``n_heads``)."""
        mk, mv = store.mirror
        return mk[:, :, : self.n_heads], mv[:, :, : self.n_heads]

    def write(self, store, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, md: Step | None = None) -> None:
        """The full K/V ``[n, H, D]`` into the host pages (codes need positions: :meth:`attend`)."""
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
            dense_rows(q, *self.mirror_kv(store), md, multi.reqs, self.scale, out)
        if single is not None:
            out[single.rows] = self.decode(store, q[single.rows], single, md.max_seq_len).to(out.dtype)

    def decode(self, store, q: torch.Tensor, r: Rows, max_seq_len: int) -> torch.Tensor:
        """Windowed-RoPE LUT, top-K over the code pages, exact attention over the selected host rows."""
        lens = r.seq_lens.long()
        cos, sin = ref.rope_cos_sin(lens - 1, self.inv_freq, self.scaling)
        q_pre = ref.unapply_rope(q.float(), cos[:, None, :], sin[:, None, :])
        qw = ref.windowed_rope_query(q_pre, self.inv_freq, self.vq.rel_pos, self.scaling)
        lut = ops.vq_lut(qw.contiguous(), self.codebook, scale=self.scale)
        kw = {}
        topk = topk_tokens(self.vq.topk, lens)
        if isinstance(topk, torch.Tensor):
            kw["topk_max"] = topk_tokens(self.vq.topk, max(int(max_seq_len), 1))
        idx, count = ops.vq_topk(lut, store.codes, r.block_table, r.seq_lens, topk=topk, sink=self.vq.sink,
                                 local=self.vq.local, **kw)
        return ops.sparse_attention_host(q, *self.mirror_kv(store), idx, count, block_table=r.block_table,
                                         scale=self.scale)
