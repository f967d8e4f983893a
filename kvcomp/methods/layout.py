"""What a layer stores and which method object runs it, from a serving :class:`~kvcomp.vllm_plugin.plan.Plan`.

The vLLM backend asks this module (and never branches on a method itself): the page each token
takes (:func:`page_changes`), the per-request ring a layer needs (:func:`ring_request`), whether it
keeps a host copy (:func:`mirror_heads`), and the method object of a layer (:func:`build_layer`).
Page views for one step are :class:`Store` (the transformers cache builds the same from its own
tensors).
"""

from __future__ import annotations

import math

import torch

from .a2ats import A2ATS
from .dense import Dense
from .duo import DuoAttention, StreamingHeads
from .step import Store
from .think import ThinK

__all__ = ["Split", "Store", "build_hf_layer", "build_layer", "code_view", "mirror_heads", "page_changes", "page_store", "ring_capacity",
           "ring_request"]


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


def page_changes(plan, num_kv_heads: int, head_size: int, head_size_v: int, elem: int, num_streaming: int) -> dict:
    """Changes to vLLM's attention spec: retrieval heads only (DuoAttention: ``num_head_slots``),
    ``D_keep + Dv`` elements (ThinK), one int16 code cell per KV head (A²ATS)."""
    changes = {}
    if plan.streaming is not None:
        changes["num_head_slots"] = num_kv_heads - num_streaming
    if plan.vq is not None:
        changes["state_content_bytes"] = max(2, elem)
    elif plan.key_dim is not None:
        changes["state_content_bytes"] = (plan.key_dim + head_size_v) * elem
    return changes


def ring_capacity(tokens: int, ring_heads: int, page_heads: int, block_size: int | None) -> int:
    """Ring slots for ``tokens`` kept tokens, rounded up so that a ring block is a whole number of
    page blocks (same per-token content: DuoAttention's full K/V).

    vLLM unifies page sizes across KV-cache groups by enlarging the smaller page's block size when
    the larger page is a multiple of it, and by padding every smaller page otherwise. A ring
    larger than a page that is not a multiple would pad every retrieval-head page (measured: 20%
    of the pool lost on SmolLM2); a multiple only enlarges the page's block size.
    """
    if not block_size or page_heads < 1:
        return tokens
    unit = page_heads * block_size  # token-heads of one page
    step = unit // math.gcd(unit, ring_heads)
    return -(-tokens // step) * step


def ring_request(plan, num_kv_heads: int, head_size: int, num_streaming: int,
                 block_size: int | None) -> tuple[int, int, int] | None:
    """``(heads, slots, content elements)`` of the per-request ring a layer needs, or None:
    DuoAttention's streaming heads keep ``sink + recent`` tokens of K and V (not with A²ATS: they
    read the host pages) in a ring of whole pages (:func:`ring_capacity`), ThinK keeps its
    ``window`` full-width keys."""
    if plan.streaming is not None and plan.vq is None:
        return (num_streaming, ring_capacity(plan.sink + plan.recent, num_streaming, num_kv_heads - num_streaming,
                                             block_size), 2 * head_size)
    if plan.key_dim is not None and plan.think_window > 0:
        return num_kv_heads, plan.think_window, head_size
    return None


def mirror_heads(plan, num_kv_heads: int) -> int:
    """KV heads a layer keeps in host pages (every local head with A²ATS, else 0)."""
    return num_kv_heads if plan.vq is not None else 0


def build_layer(plan, layer: int, num_heads: int, num_kv_heads: int, head_start: int, scale: float,
                device, rope: tuple[torch.Tensor, float] | None = None):
    """The method object of one layer on a rank holding global KV heads ``[head_start, head_start +
    num_kv_heads)``."""
    g = num_heads // num_kv_heads
    paged = list(range(num_kv_heads))
    stream: list[int] = []
    if plan.streaming is not None:
        paged, stream = plan.rank_heads(layer, head_start, head_start + num_kv_heads)
    if plan.vq is not None:
        if rope is None:
            raise RuntimeError("kvcomp A2ATS: the model's RoPE table was not read for this layer")
        inner = A2ATS(plan.vq, layer, [head_start + h for h in paged], rope[0], rope[1], scale, device)
    elif plan.key_dim is not None:
        return ThinK(plan.layer_channels(layer, head_start, head_start + num_kv_heads).to(device), plan.think_window,
                     scale)
    else:
        inner = Dense(len(paged), scale, device)
    if stream:
        return DuoAttention(inner, paged, stream, g, plan.sink, plan.recent, scale, device)
    return inner


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
    :class:`~kvcomp.config.CompressionConfig` (its head groups: full, think, streaming, vq, vq_think)."""
    g = num_heads // cfg.num_kv_heads
    t = cfg.think
    parts = []
    for name, heads in cfg.layer_groups(layer).items():
        if not heads:
            continue
        think = None
        if name in ("think", "vq_think"):
            chan = None if t.channels is None else t.channels[layer, heads].long().to(device)
            think = ThinK(chan, t.window, scale, prune_ratio=t.prune_ratio)
        if name == "full":
            m = Dense(len(heads), scale, device)
        elif name == "think":
            m = think
        elif name == "streaming":
            m = StreamingHeads(cfg.duo.sink, cfg.duo.recent, scale)
        else:
            m = A2ATS(cfg.vq, layer, heads, rope[0], rope[1], scale, device, think=think)
        parts.append((heads, m))
    return Split(parts, g)
