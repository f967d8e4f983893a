"""References of the host-mirror operators (:mod:`kvcomp.ops.host_mirror`): gather, sparse
attention and scatter over a dense ``[Hkv, T, D]`` (``[B, Hkv, T, D]`` for attention) or paged
``[num_blocks, block_size, Hkv, D]`` mirror, on any device. Bad arguments raise ``ValueError``
naming the argument, before any work.
"""

from __future__ import annotations

import math

import torch

__all__ = ["gather_tokens", "scatter_tokens", "sparse_attention_host"]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_INDEX = (torch.int32, torch.int64)


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _check_table(block_table: torch.Tensor, dim: int, layout: str) -> None:
    _require(block_table.dim() == dim, f"block_table must be {layout}, got shape {tuple(block_table.shape)}")
    _require(block_table.dtype == torch.int32, f"block_table must be int32, got {block_table.dtype}")


def _token_rows(
    mirror: torch.Tensor, paged: bool, ids: torch.Tensor, table: torch.Tensor | None, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate token ids ``ids`` (int64, any shape) and return their (block, offset) or (0, token)."""
    if not paged:
        limit, what = mirror.shape[-2], ""
    elif table is not None:
        limit, what = table.shape[-1] * mirror.shape[1], ", i.e. max_blocks * block_size"
    else:
        limit, what = mirror.shape[0] * mirror.shape[1], ", i.e. num_blocks * block_size"
    # value checks read data on the host: eager only (a traced decode step stays free of host syncs)
    if ids.numel() and not torch.compiler.is_compiling():
        lo, hi = int(ids.min()), int(ids.max())
        bad = lo if lo < 0 else hi
        _require(lo >= 0 and hi < limit, f"{name} has an out-of-range token index {bad} (valid: 0 <= index < {limit}{what})")
    if not paged:
        return torch.zeros_like(ids), ids
    bs = mirror.shape[1]
    blk = ids // bs
    if table is not None:
        blk = torch.gather(table.long(), -1, blk.reshape(table.shape[0], -1)).reshape(ids.shape) if table.dim() == 2 \
            else table.long()[blk]
        if blk.numel() and not torch.compiler.is_compiling():
            b_lo, b_hi = int(blk.min()), int(blk.max())
            _require(b_lo >= 0 and b_hi < mirror.shape[0],
                     f"block_table maps a token to block {b_lo if b_lo < 0 else b_hi}, outside the cache's "
                     f"{mirror.shape[0]} blocks")
    return blk, ids % bs


def gather_tokens(
    src: torch.Tensor, idx: torch.Tensor, out: torch.Tensor | None = None, *, block_table: torch.Tensor | None = None
) -> torch.Tensor:
    """Gather the selected tokens of every KV head from a host mirror: ``out[h, j]`` = token
    ``idx[h, j]`` of head ``h``, ``[Hkv, K, D]``; reference of :func:`kvcomp.ops.gather_tokens`.

    ``src`` dense ``[Hkv, T, D]`` or paged ``[num_blocks, block_size, Hkv, D]``; ``idx [Hkv, K]``
    int32/int64 token positions (dense, or paged with ``block_table [max_blocks]`` of one sequence)
    or flat slots ``block * block_size + offset`` (paged without a table); ``out`` optional
    ``[Hkv, K, D]`` with ``src``'s dtype (allocated on ``idx``'s device when omitted).
    """
    _require(src.dim() in (3, 4), f"src must be a dense [Hkv, T, D] or paged [num_blocks, block_size, Hkv, D] "
                                  f"mirror, got shape {tuple(src.shape)}")
    paged = src.dim() == 4
    hkv, d = (src.shape[2] if paged else src.shape[0]), src.shape[-1]
    _require(idx.dim() == 2, f"idx must be [Hkv, K], got shape {tuple(idx.shape)}")
    _require(idx.dtype in _INDEX, f"idx must be int32 or int64, got {idx.dtype}")
    _require(idx.shape[0] == hkv, f"idx has {idx.shape[0]} heads but src has Hkv={hkv}")
    k = idx.shape[1]
    if out is not None:
        _require(tuple(out.shape) == (hkv, k, d), f"out must have shape [Hkv, K, D] = [{hkv}, {k}, {d}], "
                                                  f"got {list(out.shape)}")
        _require(out.dtype == src.dtype, f"out dtype {out.dtype} differs from src dtype {src.dtype}")
    if block_table is not None:
        _require(paged, "block_table is only valid with a paged src [num_blocks, block_size, Hkv, D]")
        _check_table(block_table, 1, "[max_blocks] (one sequence)")
        block_table = block_table.to(src.device)
    ids = idx.to(src.device, torch.long)
    blk, tok = _token_rows(src, paged, ids, block_table, "idx")
    heads = torch.arange(hkv, device=src.device)[:, None]
    rows = src[blk, tok, heads] if paged else src[heads, tok]
    if out is None:
        return rows.to(idx.device)
    out.copy_(rows)
    return out


def sparse_attention_host(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, count: torch.Tensor, *,
                          block_table: torch.Tensor | None = None, scale: float | None = None) -> torch.Tensor:
    """Exact decode attention over the selected tokens of a mirror; reference of
    :func:`kvcomp.ops.sparse_attention_host` (same arguments, result and errors).

    ``q [B, Hq, D]``; ``k, v`` dense ``[B, Hkv, T, D|Dv]`` or paged ``[num_blocks, block_size, Hkv,
    D|Dv]`` with ``block_table [B, max_blocks]`` int32; the first ``count[b, h]`` (``1 <= count <=
    K``) entries of ``idx [B, Hkv, K]`` are the keys of KV head ``h``. Returns ``[B, Hq, Dv]`` in
    ``q``'s dtype on ``q``'s device (softmax in fp32).
    """
    _require(q.dim() == 3, f"q must be [B, Hq, D] (one decode query per sequence), got shape {tuple(q.shape)}")
    _require(q.dtype in _FLOATS, f"q must be float32, bfloat16 or float16, got {q.dtype}")
    _require(k.dtype == q.dtype and v.dtype == q.dtype,
             f"q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    _require(k.dim() == 4 and v.dim() == 4, "k and v must both be dense [B, Hkv, T, D] or paged [num_blocks, "
                                            f"block_size, Hkv, D], got k {tuple(k.shape)}, v {tuple(v.shape)}")
    paged = block_table is not None
    b, hq, d = q.shape
    hkv, dv = (k.shape[2] if paged else k.shape[1]), v.shape[3]
    _require(k.shape[3] == d, f"k head dim {k.shape[3]} differs from q head dim {d}")
    _require(hkv > 0 and hq % hkv == 0, f"q heads Hq={hq} must be a multiple of the KV heads Hkv={hkv}")
    if paged:
        _require(tuple(v.shape[:3]) == tuple(k.shape[:3]),
                 f"paged v must be [num_blocks, block_size, Hkv, Dv] matching k {tuple(k.shape)}, got {tuple(v.shape)}")
    else:
        _require(k.shape[0] == b and v.shape[0] == b and v.shape[1] == hkv and v.shape[2] == k.shape[2],
                 f"dense k, v must be [B, Hkv, T, D|Dv] with B={b}, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    _require(idx.dim() == 3 and idx.dtype in _INDEX, f"idx must be [B, Hkv, K] int32/int64, got {tuple(idx.shape)} "
                                                     f"{idx.dtype}")
    _require(tuple(idx.shape[:2]) == (b, hkv), f"idx must be [B, Hkv, K] = [{b}, {hkv}, K], got {list(idx.shape)}")
    _require(count.dim() == 2 and count.dtype in _INDEX and tuple(count.shape) == (b, hkv),
             f"count must be [B, Hkv] = [{b}, {hkv}] int32/int64, got {list(count.shape)} {count.dtype}")
    kmax = idx.shape[2]
    cnt = count.to(k.device, torch.long)
    if cnt.numel() and not torch.compiler.is_compiling():
        lo, hi = int(cnt.min()), int(cnt.max())
        _require(lo >= 1 and hi <= kmax, f"count has {lo if lo < 1 else hi}, must be in [1, K] with K={kmax} (every "
                                         f"query sees at least one token)")
    if paged:
        _check_table(block_table, 2, "[B, max_blocks]")
        _require(block_table.shape[0] == b, f"block_table has {block_table.shape[0]} rows but q has B={b}")
        block_table = block_table.to(k.device)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    _require(math.isfinite(scale) and scale > 0, f"scale must be a positive finite number, got {scale}")

    valid = torch.arange(kmax, device=k.device) < cnt[..., None]  # [B, Hkv, K]
    # Padding entries (beyond count) are never read: point them at a valid entry before checking.
    ids = torch.where(valid, idx.to(k.device, torch.long), idx.to(k.device, torch.long)[..., :1])
    blk, tok = _token_rows(k, paged, ids, block_table, "idx")
    heads = torch.arange(hkv, device=k.device)[None, :, None]
    if paged:
        ks, vs = k[blk, tok, heads], v[blk, tok, heads]  # [B, Hkv, K, D]
    else:
        bi = torch.arange(b, device=k.device)[:, None, None]
        ks, vs = k[bi, heads, tok], v[bi, heads, tok]
    g = hq // hkv
    qf = q.to(k.device).float().reshape(b, hkv, g, d)
    logits = torch.einsum("bhgd,bhkd->bhgk", qf, ks.float()) * scale
    logits = logits.masked_fill(~valid[:, :, None, :], float("-inf"))
    p = torch.softmax(logits, dim=-1)
    o = torch.einsum("bhgk,bhkd->bhgd", p, vs.float())
    return o.reshape(b, hq, dv).to(q.dtype).to(q.device)


def _check_scatter(cache: torch.Tensor, new_tokens: torch.Tensor, slots: torch.Tensor) -> None:
    _require(cache.dim() in (3, 4), "cache must be a dense [Hkv, T, D] or paged [num_blocks, block_size, Hkv, D] "
                                    f"mirror, got shape {tuple(cache.shape)}")
    hkv = cache.shape[2] if cache.dim() == 4 else cache.shape[0]
    _require(new_tokens.dim() == 3 and tuple(new_tokens.shape[1:]) == (hkv, cache.shape[-1]),
             f"new_tokens must have shape [N, Hkv, D] = [N, {hkv}, {cache.shape[-1]}], got {list(new_tokens.shape)}")
    _require(slots.dim() == 1 and slots.dtype in _INDEX, f"slots must be [N] int32/int64, got {tuple(slots.shape)} "
                                                         f"{slots.dtype}")
    _require(slots.shape[0] == new_tokens.shape[0],
             f"slots has {slots.shape[0]} entries but new_tokens has N={new_tokens.shape[0]}")
    _require(new_tokens.dtype == cache.dtype, f"new_tokens dtype {new_tokens.dtype} differs from cache dtype "
                                              f"{cache.dtype}")


def scatter_tokens(cache: torch.Tensor, new_tokens: torch.Tensor, slots: torch.Tensor) -> None:
    """Write ``new_tokens [N, Hkv, D]`` into a mirror in place at ``slots [N]`` (dense: token
    positions; paged: ``block * block_size + offset``; negative: skipped; each slot at most once);
    reference of :func:`kvcomp.ops.scatter_tokens`."""
    _check_scatter(cache, new_tokens, slots)
    paged = cache.dim() == 4
    num_slots = cache.shape[0] * cache.shape[1] if paged else cache.shape[1]
    s = slots.to(cache.device, torch.long)
    keep = s >= 0
    s = s[keep]
    if s.numel():
        hi = int(s.max())
        _require(hi < num_slots, f"slots has an out-of-range slot {hi} (the cache has {num_slots} "
                                 f"{'slots = num_blocks * block_size' if paged else 'token positions'})")
        uniq, counts = torch.unique(s, return_counts=True)
        if bool((counts > 1).any()):
            raise ValueError(f"slots has the slot {int(uniq[counts > 1][0])} more than once (which token wins "
                             "would be undefined)")
    rows = new_tokens.to(cache.device)[keep]
    if paged:
        bs = cache.shape[1]
        cache[s // bs, s % bs] = rows
    else:
        cache[:, s] = rows.transpose(0, 1)
