"""What a layer stores and which method object runs it, from a serving :class:`~kvcomp.vllm_plugin.plan.Plan`.

The vLLM backend asks this module (and never branches on a method itself): the page each token
takes (:func:`page_changes`), the per-request ring a layer needs (:func:`ring_request`), whether it
keeps a host copy (:func:`mirror_heads`, :func:`mirror_key_dim`), and the method object of a layer
(:func:`build_layer`; query-driven ThinK channels per request: :class:`RequestChannels`).
Page views for one step are :class:`Store` (the transformers cache builds the same from its own
tensors).
"""

from __future__ import annotations

import math

import torch

from .a2ats import A2ATS
from .dense import Dense
from .duo import DuoAttention, StreamingHeads, shared_ring
from .step import Step, Store
from .think import ThinK
from .window import SlidingWindow

__all__ = ["RequestChannels", "Split", "Store", "build_hf_layer", "build_layer", "code_cell_bytes", "code_view", "mirror_heads",
           "mirror_key_dim", "page_changes", "page_store", "ring_capacity", "ring_id_cells", "ring_request"]


def code_view(kv_cache: torch.Tensor) -> torch.Tensor:
    """``[num_blocks, block_size, Hkv]`` int16 view of a code page ``[blocks, Hkv, block_size, C]``."""
    return kv_cache.view(torch.int16)[..., 0].permute(0, 2, 1)


def page_store(plan, kv_cache: torch.Tensor, head_size: int) -> Store:
    """Views of vLLM's page ``[blocks, H, block_size, C]`` as the plan lays it out."""
    if plan.vq is not None:
        return Store(codes=code_view(kv_cache))
    dk = plan.key_dim or head_size
    kv = kv_cache.permute(0, 2, 1, 3)
    return Store(k=kv[..., :dk], v=kv[..., dk:])


def code_cell_bytes(elem: int) -> int:
    """Bytes of one A²ATS code cell (an int16) in a page of ``elem``-byte elements: one element, or
    two of fp8's 1-byte elements."""
    return max(2, elem)


def page_changes(plan, num_kv_heads: int, head_size: int, head_size_v: int, elem: int, num_streaming: int) -> dict:
    """Changes to vLLM's attention spec: retrieval heads only (DuoAttention: ``num_head_slots``),
    ``D_keep + Dv`` elements (ThinK), one int16 code cell per KV head (A²ATS)."""
    changes = {}
    if plan.streaming is not None:
        changes["num_head_slots"] = num_kv_heads - num_streaming
    if plan.vq is not None:
        changes["state_content_bytes"] = code_cell_bytes(elem)
    elif plan.key_dim is not None:
        changes["state_content_bytes"] = (plan.key_dim + head_size_v) * elem
    return changes


def ring_capacity(tokens: int, ring_heads: int, page_heads: int, block_size: int | None, ring_content: int = 1,
                  page_content: int = 1) -> int:
    """Ring slots for ``tokens`` kept tokens, rounded up so that a ring block is a whole number of
    page blocks (elements per head slot: ``ring_content`` in the ring, ``page_content`` in a page;
    equal by default: DuoAttention's full K/V).

    vLLM unifies page sizes across KV-cache groups by enlarging the smaller page's block size when
    the larger page is a multiple of it, and by padding every smaller page otherwise. A ring
    larger than a page that is not a multiple would pad every retrieval-head page (measured: 20%
    of the pool lost on SmolLM2); a multiple only enlarges the page's block size.
    """
    if not block_size or page_heads < 1:
        return tokens
    unit = page_heads * block_size * page_content  # elements of one page
    step = unit // math.gcd(unit, ring_heads * ring_content)
    return -(-tokens // step) * step


def ring_request(plan, num_kv_heads: int, head_size: int, num_streaming: int, block_size: int | None,
                 elem: int) -> tuple[int, int, int] | None:
    """``(heads, slots, content elements)`` of the per-request ring a layer needs, or None:
    DuoAttention's streaming heads keep ``sink + recent`` tokens of K and V (not with A²ATS: they
    read the host pages) in a ring of whole pages (:func:`ring_capacity`); ThinK's heads (every
    retrieval head) keep their ``window`` full-width keys, plus, with query-driven channels, one slot
    holding the request's kept channel ids (:class:`RequestChannels`). DuoAttention + ThinK share
    one ring of the streaming heads: their ``sink + recent`` slots of K and V, then ThinK's window
    slots of each retrieval head (keys in the first ``head_size`` elements of a slot:
    :func:`kvcomp.methods.duo.shared_ring`). ThinK's ring is rounded to whole
    pages too: one larger than a code page (A²ATS) or a narrow page and not a multiple of it would
    pad every page (measured: think+vq 4.5x fewer tokens than vq alone). ``elem``: bytes of one
    element of the pages and the ring (the page dtype: 1 with ``--kv-cache-dtype fp8``); a code
    cell takes :func:`code_cell_bytes`, so 2 ring elements with fp8."""
    n_page = num_kv_heads - num_streaming
    think = 0 if plan.key_dim is None else plan.think_window + int(plan.per_request_channels)
    if plan.streaming is not None and plan.vq is None:
        if think:
            slots = shared_ring(num_streaming, n_page, plan.sink + plan.recent, think)[2]
            return (num_streaming, ring_capacity(slots, num_streaming, n_page, block_size, 2 * head_size,
                                                 plan.key_dim + head_size), 2 * head_size)
        return num_streaming, ring_capacity(plan.sink + plan.recent, num_streaming, n_page, block_size), 2 * head_size
    if think:
        # elements (of the ring's dtype, the page's) per head slot of a page: an int16 code cell, or D_keep + Dv
        page = code_cell_bytes(elem) // elem if plan.vq is not None else plan.key_dim + head_size
        return n_page, ring_capacity(think, n_page, n_page, block_size, head_size, page), head_size
    return None


def per_layer_ring_slots(plan, num_streaming: int) -> int:
    """Ring slots of a layer with ``num_streaming`` streaming heads under a per-layer DuoAttention
    pattern (:attr:`~kvcomp.vllm_plugin.plan.Plan.streaming_per_layer`): ``sink + recent``, plus
    ``num_streaming - 1`` unused slots so that rings of different head counts have different block
    sizes. vLLM 0.32 buckets rings of equal block size together and, when it splits a bucket whose
    page sizes differ, drops the layers past the shortest page size's count
    (``_get_packed_kv_cache_groups``: ``zip(*page_size_layers.values())``); one block size per head
    count gives one page size per bucket. No rounding to pages: the block-outermost layout packs
    pages of any size."""
    return plan.sink + plan.recent + num_streaming - 1


def ring_id_cells(plan, num_kv_heads: int, num_streaming: int) -> tuple[list[int], list[int], int] | None:
    """``(ring heads, slots, elements)`` of the ring cells holding query-driven ThinK's kept channel
    ids (:class:`RequestChannels`: slot ``window`` of each ThinK head's window, which in a ring
    shared with DuoAttention's streaming heads follows theirs: :func:`~kvcomp.methods.duo.shared_ring`),
    cell ``i`` at ``(heads[i], slots[i])``, or None without them."""
    if not plan.per_request_channels:
        return None
    n_page, w = num_kv_heads - num_streaming, plan.think_window
    if plan.streaming is not None and plan.vq is None:
        heads, first, _ = shared_ring(num_streaming, n_page, plan.sink + plan.recent, w + 1)
        return heads, [f + w for f in first], plan.key_dim
    return list(range(n_page)), [w] * n_page, plan.key_dim


def mirror_heads(plan, num_kv_heads: int) -> int:
    """KV heads a layer keeps in host pages (every local head with A²ATS, else 0)."""
    return num_kv_heads if plan.vq is not None else 0


def mirror_key_dim(plan, head_size: int) -> int:
    """Key elements per head in the host pages: ThinK's ``D_keep`` with A²ATS + ThinK, else the head
    size (with DuoAttention the streaming heads there need full keys: ThinK uses the first ``D_keep``)."""
    return plan.key_dim if plan.vq is not None and plan.key_dim is not None and plan.streaming is None else head_size


def build_layer(plan, layer: int, num_heads: int, num_kv_heads: int, head_start: int, scale: float,
                device, rope: tuple[torch.Tensor, float] | None = None, window: int | None = None):
    """The method object of one layer on a rank holding global KV heads ``[head_start, head_start +
    num_kv_heads)``; a sliding-window layer (``window``: the model's) stays exact, windowed."""
    if window is not None:
        return SlidingWindow(window, scale)
    g = num_heads // num_kv_heads
    paged = list(range(num_kv_heads))
    stream: list[int] = []
    if plan.streaming is not None:
        paged, stream = plan.rank_heads(layer, head_start, head_start + num_kv_heads)
    think = None
    if plan.key_dim is not None:
        chan = plan.layer_channels(layer, head_start, head_start + num_kv_heads)
        chan = None if chan is None else chan[paged].to(device)
        think = ThinK(chan, plan.think_window, scale, prune_ratio=plan.think_prune_ratio,
                      multiple=plan.think_channel_multiple)
    if plan.vq is not None:
        if rope is None:
            raise RuntimeError("kvcomp A2ATS: the model's RoPE table was not read for this layer")
        inner = A2ATS(plan.vq, layer, [head_start + h for h in paged], rope[0], rope[1], scale, device, think=think)
    elif think is not None:
        inner = think
    else:
        inner = Dense(len(paged), scale, device)
    method = inner
    if stream:
        method = DuoAttention(inner, paged, stream, g, plan.sink, plan.recent, scale, device, key_dim=plan.key_dim,
                              think_slots=plan.think_window + int(plan.per_request_channels))
    if plan.per_request_channels:
        q_heads = None if not stream else method.q_ret
        return RequestChannels(method, think, plan.key_dim, None if not stream else method.kv_ret, q_heads)
    return method


class RequestChannels:
    """Query-driven ThinK in vLLM: each request's kept channels, chosen at the end of its first
    prefill chunk and used by every later step, kept in its ring.

    ``method`` (ThinK, A²ATS with ThinK, or DuoAttention around either) runs the layer; ``think``
    is its :class:`ThinK`, whose heads are the KV heads ``kv_heads`` and query heads ``q_heads``
    of the layer (None: all). When a request's first chunk arrives (no cached tokens), ThinK's
    :meth:`~kvcomp.methods.think.ThinK.prepare` chooses its channels per KV head from the last
    ``window`` queries of that chunk (ThinK's observation window) and the chunk's keys, and the ids
    are stored in slot ``window`` of the request's ring (``ring [blocks, H_think, window + 1, D]``,
    the first ``D_keep`` elements, as values of the ring's dtype: exact for head sizes <= 256 in
    every float dtype). A prompt prefilled in one step (the HF path's case) uses its own last
    ``window`` queries; one longer than ``max_num_batched_tokens`` uses the last ``window`` queries
    of its first chunk, since that chunk's keys enter the narrow pages right away. Keys are written
    here, after the channels (vLLM's ``do_kv_cache_update`` has no queries), not in :meth:`write`.
    """

    def __init__(self, method, think: ThinK, key_dim: int, kv_heads: torch.Tensor | None,
                 q_heads: torch.Tensor | None):
        self.method, self.think, self.key_dim = method, think, key_dim
        self.kv_heads, self.q_heads = kv_heads, q_heads
        self.name = method.name

    def think_ring(self, store) -> torch.Tensor:
        """ThinK's ring ``[blocks, H_think, slots, D]`` (DuoAttention's view when shared)."""
        stores = getattr(self.method, "stores", None)
        return (store if stores is None else stores(store)[0]).ring

    def write(self, store, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, md: Step | None = None) -> None:
        """Nothing: the keys need the request's channels, which need its queries (:meth:`attend`)."""

    def attend(self, store, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, md: Step, out: torch.Tensor) -> None:
        """Channels of the step's requests (chosen now for those at their first chunk), then the
        step's K/V into the pages and the method's attention."""
        if store.ring is None:
            raise RuntimeError("kvcomp query-driven ThinK: the layer has no per-request ring")
        slots = md.slot_mapping
        if md.has_padded_slots():
            raise RuntimeError("kvcomp query-driven ThinK: padded slots among the step's tokens are not supported")
        ring, w, dk = self.think_ring(store), self.think.window, self.key_dim
        rb = store.ring_block
        chan = ring[rb, :, w, :dk].round().long()  # [num_reqs, H_think, D_keep]
        qsl, lens = md.qsl_host(), md.seq_lens_host()
        first = [b for b in range(md.num_reqs) if qsl[b + 1] - qsl[b] == lens[b] > 0]
        if first:
            rows = torch.cat([torch.arange(qsl[b], qsl[b + 1]) for b in first]).to(q.device)
            qf, kf = q.index_select(0, rows), k.index_select(0, rows)
            if self.q_heads is not None:
                qf, kf = qf.index_select(1, self.q_heads), kf.index_select(1, self.kv_heads)
            sub_qsl = [0]
            for b in first:
                sub_qsl.append(sub_qsl[-1] + qsl[b + 1] - qsl[b])
            chosen = Store()
            self.think.prepare(chosen, qf, kf, Step(len(first), len(rows), 0, 0, None, None, None, None, sub_qsl))
            idx = torch.tensor(first, device=rb.device)
            ring[rb.index_select(0, idx), :, w, :dk] = chosen.chan.to(ring.device, ring.dtype)
            chan[idx.to(chan.device)] = chosen.chan.to(chan.device)
        store.chan = chan
        self.method.write(store, slots, k, v, md)
        self.method.attend(store, q, k, v, md, out)


class Split:
    """A layer's KV heads split over several method objects, each over its own storage (the
    transformers cache's head groups: e.g. DuoAttention's streaming heads beside exact, ThinK or
    A²ATS heads). ``parts``: ``(KV heads, method)`` pairs covering every head once."""

    def __init__(self, parts: list, group: int):
        self.parts = [(torch.tensor(kv, dtype=torch.long),
                       torch.tensor([h * group + i for h in kv for i in range(group)], dtype=torch.long), m)
                      for kv, m in parts]
        self.stores = [Store() for _ in parts]

    def tensors(self):
        for st in self.stores:
            yield from st.tensors()

    def methods(self):
        return [m for _, _, m in self.parts]

    def step(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, md, *, head_dim: int, pin: bool) -> torch.Tensor:
        """One step of every part: ``q [n, Hq, D]``, ``k, v [n, Hkv, D]`` (packed rows of ``md``,
        whose requests each hold one block of ``md.max_seq_len`` slots); returns ``[n, Hq, D]``."""
        out = torch.empty_like(q)
        for (kv, qh, m), st in zip(self.parts, self.stores):
            kv, qh = kv.to(q.device), qh.to(q.device)
            qp, kp, vp = q.index_select(1, qh), k.index_select(1, kv), v.index_select(1, kv)
            if hasattr(m, "prepare"):
                m.prepare(st, qp, kp, md)
            m.alloc(st, len(kv), md.num_reqs, md.max_seq_len, head_dim, k.dtype, k.device, pin)
            m.write(st, md.slot_mapping, kp, vp, md)
            o = torch.empty_like(qp)
            m.attend(st, qp, kp, vp, md, o)
            out.index_copy_(1, qh, o)
        return out


def build_hf_layer(cfg, layer: int, num_heads: int, scale: float, rope: tuple[torch.Tensor, float] | None,
                   device) -> Split:
    """The transformers cache's method objects of one layer of a
    :class:`~kvcomp.config.CompressionConfig` (its head groups: full, think, streaming, vq, vq_think,
    window: every head of a sliding-window layer, kept as a ring of its last ``window`` tokens —
    the bytes the layer needs, where vLLM's :class:`SlidingWindow` pages are freed by vLLM itself)."""
    g = num_heads // cfg.num_kv_heads
    t = cfg.think
    parts = []
    for name, heads in cfg.layer_groups(layer).items():
        if not heads:
            continue
        think = None
        if name in ("think", "vq_think"):
            chan = None if t.channels is None else t.channels[layer, heads].long().to(device)
            think = ThinK(chan, t.window, scale, prune_ratio=t.prune_ratio, multiple=t.channel_multiple)
        if name == "full":
            m = Dense(len(heads), scale, device)
        elif name == "think":
            m = think
        elif name == "streaming":
            m = StreamingHeads(cfg.duo.sink, cfg.duo.recent, scale)
        elif name == "window":  # the cache keeps the window only: a sink-0 streaming ring of W tokens
            m = StreamingHeads(0, cfg.window(layer), scale)
        else:
            m = A2ATS(cfg.vq, layer, heads, rope[0], rope[1], scale, device, think=think)
        parts.append((heads, m))
    return Split(parts, g)
