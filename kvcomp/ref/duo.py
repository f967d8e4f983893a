"""Reference DuoAttention decode over a head-split cache (pure PyTorch).

Storage (see docs/kernels.md):
- retrieval ("full") KV heads: paged cache ``[num_blocks, block_size, n_ret, D]`` + ``block_table`` /
  ``seq_lens``;
- streaming KV heads: rings ``[num_rings, n_str, capacity, D]``, request ``b``'s ring at
  ``ring_block[b]`` (default: ring ``b``), position ``p`` in slot ``streaming_slot(p)`` (see
  ``kvcomp.ref.cache_write``); read in place (vLLM's ring pages, the transformers cache's rings), the
  valid slots ``[0, min(seq_len, sink + window))`` only, so ``capacity`` may exceed ``sink + window``
  (vLLM's page-size unification) or fall short of it while no request has filled it;
- ``head_map [Hkv, 2] int32``: row ``h`` = ``(kind, index)`` of KV head ``h`` — kind 0 = retrieval
  (index into the paged cache's heads), kind 1 = streaming (index into the ring's heads). Query head
  ``q`` reads KV head ``q // G``.
"""

from __future__ import annotations

import torch

from kvcomp.ref import _validate as V
from kvcomp.ref.cache_write import streaming_slot

RETRIEVAL = 0
STREAMING = 1


def duo_head_map(streaming: torch.Tensor) -> torch.Tensor:
    """Build ``head_map [Hkv, 2] int32`` from a per-KV-head bool ``streaming [Hkv]`` (True = streaming).

    Retrieval heads get indices ``0..n_ret-1`` and streaming heads ``0..n_str-1`` in head order.
    """
    V.tensor("streaming", streaming, ndim=1, kind="bool")
    s = streaming.to(torch.int32)
    idx_str = torch.cumsum(s, 0) - s
    idx_ret = torch.cumsum(1 - s, 0) - (1 - s)
    return torch.stack([s, torch.where(streaming, idx_str, idx_ret)], dim=1).to(torch.int32)


def streaming_positions(seq_len: int, sink: int, window: int) -> tuple[list[int], list[int]]:
    """Valid ``(slots, positions)`` of a ring holding the first ``seq_len`` tokens."""
    slots, pos = [], []
    for p in list(range(min(seq_len, sink))) + list(range(max(sink, seq_len - window), seq_len)):
        slots.append(streaming_slot(p, sink, window))
        pos.append(p)
    return slots, pos


def check_duo_inputs(q, k_cache, v_cache, block_table, seq_lens, k_stream, v_stream, head_map, sink, window,
                     ring_block=None):
    """Shape/dtype checks shared by the reference and the kernel launcher; returns ``(G, n_ret, n_str)``."""
    V.tensor("q", q, ndim=3, kind="float")
    V.tensor("k_cache", k_cache, ndim=4, kind="float")
    V.tensor("v_cache", v_cache, ndim=4, kind="float")
    V.tensor("block_table", block_table, ndim=2, kind="int")
    V.tensor("seq_lens", seq_lens, ndim=1, kind="int")
    V.tensor("k_stream", k_stream, ndim=4, kind="float")
    V.tensor("v_stream", v_stream, ndim=4, kind="float")
    V.tensor("head_map", head_map, ndim=2, kind="int")
    V.nonneg_int("sink", sink)
    V.nonneg_int("window", window)
    if window < 1:
        raise ValueError("window must be >= 1 (it counts the token itself)")
    bsz, hq, d = q.shape
    nb, bs, n_ret, dk = k_cache.shape
    if tuple(v_cache.shape) != (nb, bs, n_ret, dk):
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} != k_cache shape {tuple(k_cache.shape)}")
    V.dim_eq("k_cache", dk, d, "head dim (last) equal to q's")
    rings, n_str, cap, ds = k_stream.shape
    if tuple(v_stream.shape) != (rings, n_str, cap, ds):
        raise ValueError(f"v_stream shape {tuple(v_stream.shape)} != k_stream shape {tuple(k_stream.shape)}")
    V.dim_eq("k_stream", ds, d, "head dim (last) equal to q's")
    if cap < 1:
        raise ValueError(f"k_stream must have >= 1 ring slot (shape [num_rings, n_str, capacity, D]), got "
                         f"{list(k_stream.shape)}")
    if ring_block is None:
        if rings != bsz:
            raise ValueError(f"k_stream must have one ring per request without ring_block: shape [B={bsz}, n_str, "
                             f"capacity, D], got {list(k_stream.shape)}")
    else:
        V.tensor("ring_block", ring_block, ndim=1, kind="int")
        V.dim_eq("ring_block", ring_block.shape[0], bsz, "length (batch)")
    hkv = n_ret + n_str
    if tuple(head_map.shape) != (hkv, 2):
        raise ValueError(f"head_map must have shape [n_ret + n_str = {hkv}, 2], got {list(head_map.shape)}")
    g = V.gqa("q", hq, hkv)
    V.dim_eq("block_table", block_table.shape[0], bsz, "batch (rows)")
    V.dim_eq("seq_lens", seq_lens.shape[0], bsz, "length (batch)")
    return g, n_ret, n_str


def check_duo_values(head_map, block_table, seq_lens, n_ret, n_str, block_size, num_blocks, ring_block=None,
                     ring_shape=(0, 0), sink=0, window=1):
    """Value checks (host sync): head_map is a bijection onto both head sets, lengths and blocks fit,
    and (with streaming heads) each request's ring id is one of the ``ring_shape = (num_rings,
    capacity)`` rings, with a slot for each of its ``min(seq_len, sink + window)`` kept tokens."""
    hm = head_map.cpu().long()
    kinds, idx = hm[:, 0], hm[:, 1]
    if ((kinds != RETRIEVAL) & (kinds != STREAMING)).any():
        raise ValueError("head_map[:, 0] must be 0 (retrieval) or 1 (streaming)")
    for kind, n, what in ((RETRIEVAL, n_ret, "k_cache heads"), (STREAMING, n_str, "k_stream heads")):
        got = sorted(idx[kinds == kind].tolist())
        if got != list(range(n)):
            raise ValueError(f"head_map indices of kind {kind} must be a permutation of range({n}) ({what}), got {got}")
    rings, cap = ring_shape
    blocks = None if ring_block is None or not n_str else ring_block.tolist()
    for b, length in enumerate(int(x) for x in seq_lens.tolist()):
        if length < 1:
            raise ValueError(f"seq_lens[{b}]={length}: decode needs at least the new token")
        if n_ret:
            V.check_blocks(block_table, b, length, block_size, num_blocks)
        if blocks is not None and not 0 <= blocks[b] < rings:
            raise ValueError(f"ring_block[{b}] = {blocks[b]} is outside k_stream's {rings} rings")
        if n_str and min(length, sink + window) > cap:
            raise ValueError(f"k_stream has {cap} ring slots but request {b} (seq_lens[{b}] = {length}) keeps "
                             f"min(seq_len, sink + window = {sink + window}) = {min(length, sink + window)} tokens")


def duo_decode_attention(q, k_cache, v_cache, block_table, seq_lens, k_stream, v_stream, head_map, *,
                         sink: int, window: int, scale: float | None = None, num_splits: int | None = None,
                         ring_block: torch.Tensor | None = None):
    """One decode step of DuoAttention (reference).

    Args:
        q: ``[B, Hq, D]`` the new token's queries (position ``seq_lens[b] - 1``).
        k_cache, v_cache: ``[num_blocks, block_size, n_ret, D]`` retrieval heads, paged.
        block_table: ``[B, max_blocks]`` int; seq_lens: ``[B]`` int (tokens incl. the new one, >= 1).
        k_stream, v_stream: ``[num_rings, n_str, capacity, D]`` streaming rings (new token already
            written; position ``p`` in slot ``streaming_slot(p, sink, window)``), read in place: each
            request reads its ``min(seq_len, sink + window)`` kept slots, so ``capacity`` is at least that.
        head_map: ``[n_ret + n_str, 2]`` int ``(kind, index)`` per KV head.
        sink, window: streaming pattern (window counts the token itself).
        scale: softmax scale, default ``1/sqrt(D)``.
        num_splits: ignored (kernel tuning knob, kept for the shared signature).
        ring_block: ``[B]`` int, request ``b``'s ring ``k_stream[ring_block[b]]`` (vLLM's ring block
            ids); ``None``: ring ``b`` (``num_rings == B``).
    Returns:
        ``[B, Hq, D]`` in q's dtype.
    """
    from kvcomp.ref.attention import attention, gather_paged
    from kvcomp.ref.streaming import streaming_attention

    g, n_ret, n_str = check_duo_inputs(q, k_cache, v_cache, block_table, seq_lens, k_stream, v_stream,
                                       head_map, sink, window, ring_block)
    check_duo_values(head_map, block_table, seq_lens, n_ret, n_str, k_cache.shape[1], k_cache.shape[0], ring_block,
                     (k_stream.shape[0], k_stream.shape[2]), sink, window)
    scale = V.scale_or_default(scale, q.shape[-1])
    out = torch.empty_like(q)
    hm = head_map.cpu().tolist()
    rings = list(range(q.shape[0])) if ring_block is None else ring_block.tolist()
    for b, length in enumerate(int(x) for x in seq_lens.tolist()):
        full_k = gather_paged(k_cache, block_table, length, b) if n_ret else None
        full_v = gather_paged(v_cache, block_table, length, b) if n_ret else None
        slots, pos = streaming_positions(length, sink, window)
        slot_t = torch.tensor(slots, dtype=torch.long, device=q.device)
        pos_t = torch.tensor(pos, dtype=torch.long, device=q.device)
        for h, (kind, idx) in enumerate(hm):
            qh = q[b, h * g:(h + 1) * g].unsqueeze(0).unsqueeze(2)  # [1, G, 1, D]
            if kind == RETRIEVAL:
                o = attention(qh, full_k[idx][None, None], full_v[idx][None, None], scale=scale, causal=True)
            else:
                ks = k_stream[rings[b], idx, slot_t][None, None]
                vs = v_stream[rings[b], idx, slot_t][None, None]
                o = streaming_attention(qh, ks, vs, sink=sink, window=window, scale=scale,
                                        q_pos=torch.tensor([length - 1], device=q.device), k_pos=pos_t)
            out[b, h * g:(h + 1) * g] = o[0, :, 0].to(q.dtype)
    return out


def ring_positions(seq_lens: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """Absolute position held by each ring slot after ``seq_lens[b]`` tokens, ``[B, sink + window]`` int64.

    Empty slots get ``2**30`` (beyond any query, so a causal mask hides them). With these positions a
    ring can be passed as compact keys to ``streaming_attention`` (e.g. ``cat(ring, chunk)`` for a
    chunked-prefill step whose chunk starts at position ``seq_lens[b]``).
    """
    V.tensor("seq_lens", seq_lens, ndim=1, kind="int")
    slot = torch.arange(sink + window, device=seq_lens.device)[None, :]
    length = seq_lens.long()[:, None]
    r = torch.remainder(length - 1 - slot, window)
    pos = torch.where(slot < sink, slot, length - 1 - r)
    ok = (pos < length) & (pos >= 0) & ((slot < sink) | (pos >= sink))
    return torch.where(ok, pos, torch.full_like(pos, 1 << 30))
