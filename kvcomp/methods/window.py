"""A sliding-window layer, left uncompressed: every KV head attends to the last ``window`` tokens
(counting the query itself), exactly as the model's own sliding attention does (transformers:
``kv_idx > q_idx - window``; vLLM: ``window - 1`` tokens left of the query).

Hybrid models (Gemma 3's local layers, Mistral, Qwen2 past ``max_window_layers``) bound these
layers already; kvcomp's methods run on the global layers (:meth:`kvcomp.config.CompressionConfig.window`).
Storage (vLLM): exact K/V pages like :class:`~kvcomp.methods.dense.Dense` (vLLM frees the blocks
that fall out of the window: ``SlidingWindowSpec``), read only inside the window (the transformers
cache keeps only the window instead: a sink-0 :class:`~kvcomp.methods.duo.StreamingHeads` ring): a one-token query
through the sink-0 :func:`~kvcomp.methods.duo.streaming_selection` and ``ops.sparse_attention_host``,
multi-token rows through ``ops.prefill.streaming_prefill`` with sink 0.
"""

from __future__ import annotations

import torch

from .. import ops
from ..ops.prefill import streaming_prefill
from .dense import write_pages
from .duo import streaming_selection
from .step import Step


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
        the pages by position (blocks before the first query's window are never touched)."""
        qsl, lens = md.qsl_host(), md.seq_lens_host()
        bs = store.k.shape[1]
        table = md.block_table.to(torch.long)
        for b in reqs:
            s0, e0 = qsl[b], qsl[b + 1]
            first = lens[b] - (e0 - s0)
            pos = torch.arange(max(0, first - self.window + 1), lens[b], device=table.device)
            blk, off = table[b, pos // bs].to(store.k.device), (pos % bs).to(store.k.device)
            k, v = (t[blk, off].transpose(0, 1)[None].to(q.device, q.dtype) for t in (store.k, store.v))
            pos = pos.to(q.device)
            o = streaming_prefill(q[s0:e0].transpose(0, 1)[None], k, v, sink=0, window=self.window,
                                  scale=self.scale, q_pos=pos[pos.shape[0] - (e0 - s0):], k_pos=pos)
            out[s0:e0] = o[0].transpose(0, 1).to(out.dtype)
