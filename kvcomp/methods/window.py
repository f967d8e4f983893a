"""A sliding-window layer, left uncompressed: every KV head attends to the last ``window`` tokens
(counting the query itself), exactly as the model's own sliding attention does (transformers:
``kv_idx > q_idx - window``; vLLM: ``window - 1`` tokens left of the query).

Hybrid models (Gemma 3's local layers, Mistral, Qwen2 past ``max_window_layers``) bound these
layers already; kvcomp's methods run on the global layers (:meth:`kvcomp.config.CompressionConfig.window`).
Storage (vLLM): exact K/V pages like :class:`~kvcomp.methods.dense.Dense` (vLLM frees the blocks
that fall out of the window: ``SlidingWindowSpec``), read only inside the window (the transformers
cache keeps only the window instead: a sink-0 :class:`~kvcomp.methods.duo.StreamingHeads` ring): a one-token query
through the sink-0 :func:`~kvcomp.methods.duo.streaming_selection` and ``ops.sparse_attention_host``,
multi-token rows through ``ops.prefill.streaming_prefill_varlen`` with sink 0 (one call per step).
"""

from __future__ import annotations

import torch

from .. import ops
from ..ops.prefill import streaming_prefill_varlen
from .dense import write_pages
from .duo import streaming_selection
from .step import Step, concat_ranges


class SlidingWindow:
    """Every KV head of a sliding-window layer, exact, over the last ``window`` tokens."""

    name = "window"

    def __init__(self, window: int, scale: float):
        if isinstance(window, bool) or not isinstance(window, int) or window < 1:
            raise ValueError(f"sliding window must be a positive int, got {window!r}")
        self.window, self.scale = window, scale

    def write(self, store, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, md: Step | None = None) -> None:
        """New tokens' ``k, v [n, Hkv, D]`` into their page slots (before :meth:`attend`)."""
        write_pages(store.k, store.v, slots, k, v)

    def attend(self, store, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, md: Step, out: torch.Tensor) -> None:
        """Windowed attention of the step's queries ``q [n, Hq, D]``; writes ``out [n, Hq, Dv]``."""
        single, multi = md.rows()
        if single is not None:
            idx, count = streaming_selection(single.seq_lens, store.k.shape[2], 0, self.window)
            out[single.rows] = ops.sparse_attention_host(q[single.rows], store.k, store.v, idx, count,
                                                         block_table=single.block_table,
                                                         scale=self.scale).to(out.dtype)
        if multi is not None:
            self.prefill(store, q, md, multi.reqs, out)

    def prefill(self, store, q: torch.Tensor, md: Step, reqs: list[int], out: torch.Tensor) -> None:
        """Multi-token rows: each request's queries over the tokens inside their windows, read from
        the pages by position (blocks before the first query's window are never touched), every
        request in one varlen :func:`~kvcomp.ops.prefill.streaming_prefill_varlen` call."""
        _, multi = md.rows()
        if multi is not None and multi.reqs == reqs:  # the step's layers share the index tensors
            p = multi.memo(("window prefill", self.window, store.k.shape[1], q.device), md.block_table,
                           lambda: self._plan(md, reqs, store.k.shape[1], store.k.device, q.device))
        else:
            p = self._plan(md, reqs, store.k.shape[1], store.k.device, q.device)
        k, v = (t[p["blk"], p["off"]].to(q.device, q.dtype) for t in (store.k, store.v))
        span = p["span"]
        q_rows = q[span[0]:span[1]] if span is not None else q.index_select(0, p["rows"])
        o = streaming_prefill_varlen(q_rows, k, v, p["q_pos"], p["k_pos"], p["cu_q"], p["cu_k"], sink=0,
                                     window=self.window, scale=self.scale).to(out.dtype)
        if span is not None:
            out[span[0]:span[1]] = o
        else:
            out.index_copy_(0, p["rows"], o)

    def _plan(self, md: Step, reqs: list[int], bs: int, kv_device, device) -> dict:
        """Index tensors of :meth:`prefill` (once per step): request ``i``'s keys are positions
        ``[max(0, first - window + 1), seq_len)`` at rows ``cu_k[i] : cu_k[i + 1]``, read from page
        ``block_table[b, pos // bs]``, offset ``pos % bs``."""
        qsl, lens = md.qsl_host(), md.seq_lens_host()
        starts = torch.tensor([qsl[b] for b in reqs])
        qlens = [qsl[b + 1] - qsl[b] for b in reqs]
        firsts = [lens[b] - n for b, n in zip(reqs, qlens)]
        k0 = [max(0, f - self.window + 1) for f in firsts]
        klens = [lens[b] - a for b, a in zip(reqs, k0)]
        cu_q = torch.tensor([0, *qlens]).cumsum(0)
        cu_k = torch.tensor([0, *klens]).cumsum(0)
        qn, kn = torch.tensor(qlens), torch.tensor(klens)
        q_pos = concat_ranges(firsts, qn)
        k_pos = concat_ranges(k0, kn)
        rows = concat_ranges(starts, qn)
        first, end = qsl[reqs[0]], qsl[reqs[-1] + 1]
        req = torch.repeat_interleave(torch.tensor(reqs), kn).to(md.block_table.device)
        kp = k_pos.to(md.block_table.device)
        blk = md.block_table[req, kp // bs].long()
        return {"cu_q": cu_q, "cu_k": cu_k, "q_pos": q_pos.to(device), "k_pos": k_pos.to(device),
                "rows": rows.to(device), "span": (first, end) if end - first == sum(qlens) else None,
                "blk": blk.to(kv_device), "off": (kp % bs).to(kv_device)}
