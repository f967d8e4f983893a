"""Host-mirror operators of A²ATS offloading: gather, sparse attention and scatter on CPU memory.

The full KV of offloaded heads lives in a (pinned) host mirror, either dense ``[Hkv, T, D]``
(``[B, Hkv, T, D]`` for attention) or paged ``[num_blocks, block_size, Hkv, D]`` (vLLM layout).
Each public function uses the native extension ``kvcomp._C`` when it is built and its pure-torch
twin ``*_torch`` (same signature, same errors) otherwise; ``impl="torch"|"native"`` forces one.
Bad arguments raise ``ValueError`` naming the argument, before any work.
"""

from __future__ import annotations

import math

import torch

from kvcomp._ext import ext_ops, has_ext

__all__ = [
    "gather_tokens",
    "gather_tokens_torch",
    "scatter_tokens",
    "scatter_tokens_torch",
    "sparse_attention_host",
    "sparse_attention_host_torch",
]

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
_INDEX = (torch.int32, torch.int64)


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


def _use_native(impl: str, needs_cuda_op: bool = False) -> bool:
    _require(impl in ("auto", "native", "torch"), f"impl must be 'auto', 'native' or 'torch', got {impl!r}")
    if impl == "torch":
        return False
    if impl == "native":
        ops = ext_ops()  # raises RuntimeError with the build hint when absent
        if needs_cuda_op and not hasattr(ops, "gather_tokens_uva"):
            raise RuntimeError("kvcomp._C was built without CUDA: rebuild with KVCOMP_CUDA=1 on a CUDA machine")
        return True
    return has_ext() and (not needs_cuda_op or hasattr(ext_ops(), "gather_tokens_uva"))


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
    if ids.numel():
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
        if blk.numel():
            b_lo, b_hi = int(blk.min()), int(blk.max())
            _require(b_lo >= 0 and b_hi < mirror.shape[0],
                     f"block_table maps a token to block {b_lo if b_lo < 0 else b_hi}, outside the cache's "
                     f"{mirror.shape[0]} blocks")
    return blk, ids % bs


# --------------------------------------------------------------------------------------------- gather


def gather_tokens_torch(
    src: torch.Tensor, idx: torch.Tensor, out: torch.Tensor | None = None, *, block_table: torch.Tensor | None = None
) -> torch.Tensor:
    """Pure-torch reference of :func:`gather_tokens` (same arguments, result and errors)."""
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


def gather_tokens(
    src: torch.Tensor,
    idx: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    block_table: torch.Tensor | None = None,
    check: bool = True,
    impl: str = "auto",
) -> torch.Tensor:
    """Gather the selected tokens of every KV head from a host mirror into a contiguous buffer.

    Args:
        src: host mirror, dense ``[Hkv, T, D]`` or paged ``[num_blocks, block_size, Hkv, D]``,
            any dtype; last dimension contiguous. Pinned when ``idx`` is on a GPU.
        idx: ``[Hkv, K]`` int32/int64 token ids per KV head (duplicates allowed). Dense: token
            positions. Paged with ``block_table``: token positions of one sequence; paged without
            it: flat slots ``block * block_size + offset``.
        out: optional ``[Hkv, K, D]`` destination with ``src``'s dtype; allocated on ``idx``'s
            device when omitted.
        block_table: optional ``[max_blocks]`` int32 block ids of the sequence (paged only), on
            ``idx``'s device.
        check: for a GPU ``idx`` with the native CUDA op, synchronise and raise on an out-of-range
            index (the kernel zero-fills such rows either way). CPU paths always check.
        impl: ``"auto"`` (native when built), ``"native"`` or ``"torch"``.

    Returns:
        ``out``: ``[Hkv, K, D]``, ``out[h, j] = token idx[h, j] of head h``. With ``idx`` on a GPU
        and the CUDA extension, rows are read zero-copy from pinned memory over PCIe (UVA).
    """
    if idx.is_cuda and not src.is_cuda:
        if _use_native(impl, needs_cuda_op=True):
            if out is None:
                hkv = src.shape[2] if src.dim() == 4 else src.shape[0]
                out = torch.empty((hkv, idx.shape[-1], src.shape[-1]), dtype=src.dtype, device=idx.device)
            table = None if block_table is None else block_table.contiguous()
            status = ext_ops().gather_tokens_uva(src, idx.contiguous(), out, table)
            if check and int(status.item()) != 0:
                raise ValueError("idx has an out-of-range token index (or block_table an invalid block id) for src "
                                 f"of shape {tuple(src.shape)}")
            return out
        rows = gather_tokens(src, idx.cpu(), None, block_table=None if block_table is None else block_table.cpu(),
                             impl=impl)
        if out is None:
            return rows.to(idx.device, non_blocking=True)
        out.copy_(rows, non_blocking=True)
        return out
    if not src.is_cuda and _use_native(impl):
        if out is None:
            _require(src.dim() in (3, 4) and idx.dim() == 2,
                     f"src must be [Hkv, T, D] or [num_blocks, block_size, Hkv, D] and idx [Hkv, K], got "
                     f"{tuple(src.shape)} and {tuple(idx.shape)}")
            out = src.new_empty((idx.shape[0], idx.shape[1], src.shape[-1]))
        table = None if block_table is None else block_table.contiguous()
        ext_ops().gather_tokens(src, idx.contiguous(), out, table)
        return out
    return gather_tokens_torch(src, idx, out, block_table=block_table)


# ---------------------------------------------------------------------------------------- attention


def sparse_attention_host_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    count: torch.Tensor,
    *,
    block_table: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Pure-torch reference of :func:`sparse_attention_host` (same arguments, result and errors)."""
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
    if cnt.numel():
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


def sparse_attention_host(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    count: torch.Tensor,
    *,
    block_table: torch.Tensor | None = None,
    scale: float | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """Exact decode attention computed on the CPU over the selected tokens of a host mirror.

    A²ATS runs the attention of offloaded heads where their KV lives, so only the query (in) and
    the output (back) cross PCIe, never the cached KV.

    Args:
        q: ``[B, Hq, D]`` decode queries (any device; moved to the CPU and back).
        k, v: host mirror, dense ``[B, Hkv, T, D]`` / ``[B, Hkv, T, Dv]`` or paged
            ``[num_blocks, block_size, Hkv, D|Dv]`` with ``block_table``; same dtype as ``q``
            (fp32, bf16 or fp16), last dimension contiguous.
        idx: ``[B, Hkv, K]`` int32/int64 token positions per KV head; the first ``count[b, h]`` are
            used (each listed entry is one key: duplicates count twice), the rest are ignored.
        count: ``[B, Hkv]`` int32/int64, ``1 <= count <= K``.
        block_table: ``[B, max_blocks]`` int32 (paged layout only).
        scale: softmax scale, default ``1/sqrt(D)``.
        impl: ``"auto"`` (native when built), ``"native"`` or ``"torch"``.

    Returns:
        ``[B, Hq, Dv]`` in ``q``'s dtype on ``q``'s device; query head ``h`` reads KV head
        ``h // (Hq // Hkv)``; softmax and accumulation in fp32.
    """
    if k.is_cuda or not _use_native(impl):
        return sparse_attention_host_torch(q, k, v, idx, count, block_table=block_table, scale=scale)
    d = q.shape[-1] if q.dim() else 1
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    table = None if block_table is None else block_table.cpu().contiguous()
    out = ext_ops().sparse_attention(q.cpu(), k, v, idx.cpu().contiguous(), count.cpu().contiguous(), table, scale)
    return out.to(q.device, non_blocking=True)


# ------------------------------------------------------------------------------------------ scatter


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


def scatter_tokens_torch(cache: torch.Tensor, new_tokens: torch.Tensor, slots: torch.Tensor) -> None:
    """Pure-torch reference of :func:`scatter_tokens` (same arguments, effect and errors)."""
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


def scatter_tokens(cache: torch.Tensor, new_tokens: torch.Tensor, slots: torch.Tensor, *, impl: str = "auto") -> None:
    """Write new tokens into a host mirror in place (``cache[slot of n][h] = new_tokens[n, h]``).

    Args:
        cache: host mirror, dense ``[Hkv, T, D]`` (slot = token position) or paged
            ``[num_blocks, block_size, Hkv, D]`` (slot = ``block * block_size + offset``).
        new_tokens: ``[N, Hkv, D]`` with ``cache``'s dtype, any device (copied to the host first).
        slots: ``[N]`` int32/int64; negative slots are skipped (vLLM padding), a slot may appear at
            most once.
        impl: ``"auto"`` (native when built), ``"native"`` or ``"torch"``.
    """
    if cache.is_cuda or not _use_native(impl):
        scatter_tokens_torch(cache, new_tokens, slots)
        return
    ext_ops().scatter_tokens(cache, new_tokens.to(cache.device), slots.cpu().contiguous())
