"""Decode attention over selected tokens gathered from pages (A²ATS exact step), split-K over the set.

Program (sequence ``b``, KV head ``h``, part ``s``) reads the positions ``idx[b, h, j]`` for ``j`` in its
slice of ``[0, count[b, h])``, gathers their keys and values from the pages (token ``p`` in slot
``p % block_size`` of block ``block_table[b, p // block_size]``) and runs an online softmax for all
``G`` query heads of the group; the parts are merged by :func:`kvcomp.kernels.splitk.splitk_combine`.
Reference: :func:`kvcomp.ref.paged_sparse_attention`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C
from .splitk import LOG2E, alloc_partials, online_update, pick_splits, splitk_combine, store_partial


def _tiles(c, nargs, meta):
    """The ``[BLOCK_N, D]`` K/V tiles in registers (the budget of :func:`C.kv_block_n`, without its 16-row
    floor: fp32 at D = 256 needs 8 warps for 16 rows); keys and values staged per pipeline stage."""
    size = nargs["q_ptr"].element_size()
    n = c.kwargs["BLOCK_N"]
    return n * max(meta["BLOCK_D"], meta["BLOCK_DV"]) * size, n * (meta["BLOCK_D"] + meta["BLOCK_DV"]) * size, meta["F32"]


_fits = C.prune_sm90(_tiles)


# the first config is the interpreter's; (16, 8 warps) fits every dtype and head dim
_CONFIGS = [triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_N": 16}, num_warps=8, num_stages=2),
            triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=2),
            triton.Config({"BLOCK_N": 32}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=2)]


# keyed by head dims and GQA group (and dtype): never by batch size, selected-token count or splits
@C.autotune(_CONFIGS, key=["G", "D", "DV"], prune=_fits)
@triton.jit(do_not_specialize=["PER", "NSPLIT"])
def _sparse_decode_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, idx_ptr, cnt_ptr, m_ptr, l_ptr, acc_ptr,
    qk_scale, HKV, G, D, DV, BS, KMAX, PER, NSPLIT,
    s_qb, s_qh, s_kn, s_ks, s_kh, s_vn, s_vs, s_vh, s_btb,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    F32: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // HKV
    h = pid % HKV
    cnt = tl.minimum(tl.load(cnt_ptr + pid), KMAX)
    start = split * PER
    end = tl.minimum(start + PER, cnt)
    offs_h = tl.arange(0, BLOCK_H)
    hmask = offs_h < G
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    offs_dv = tl.arange(0, BLOCK_DV)
    dvmask = offs_dv < DV
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)
    q = tl.load(q_ptr + b * s_qb + (h * G + offs_h)[:, None] * s_qh + offs_d[None, :],
                mask=hmask[:, None] & dmask[None, :], other=0.0)
    if F32:
        q = q.to(tl.float32)
    for j0 in range(start, end, BLOCK_N):
        j = j0 + offs_n
        nmask = j < end
        tok = tl.load(idx_ptr + pid.to(tl.int64) * KMAX + j, mask=nmask, other=0)
        blk = tl.load(bt_ptr + b * s_btb + tok // BS, mask=nmask, other=0).to(tl.int64)
        slot = tok % BS
        k = tl.load(k_ptr + blk[:, None] * s_kn + slot[:, None] * s_ks + h * s_kh + offs_d[None, :],
                    mask=nmask[:, None] & dmask[None, :], other=0.0)
        v = tl.load(v_ptr + blk[:, None] * s_vn + slot[:, None] * s_vs + h * s_vh + offs_dv[None, :],
                    mask=nmask[:, None] & dvmask[None, :], other=0.0)
        if F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        s = tl.where(nmask[None, :], s * qk_scale, float("-inf"))
        m_i, l_i, acc = online_update(m_i, l_i, acc, s, v, F32)
    store_partial(m_ptr, l_ptr, acc_ptr, pid * G, NSPLIT, split, m_i, l_i, acc, offs_h, hmask, offs_dv, DV)


def triton_paged_sparse_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  block_table: torch.Tensor, idx: torch.Tensor, count: torch.Tensor, *,
                                  scale: float | None = None, tokens_per_split: int | None = None) -> torch.Tensor:
    """Sparse decode over pages (same contract as :func:`kvcomp.ref.paged_sparse_attention`).

    Args:
        q: ``[B, Hq, D]``; k_cache ``[num_blocks, block_size, Hkv, D]``; v_cache ``[..., Dv]`` (same dtype).
        block_table: ``[B, max_blocks]`` int32/int64.
        idx: ``[B, Hkv, Kmax]`` int32 contiguous token positions; count: ``[B, Hkv]`` int32 contiguous.
            Selected positions must map to valid blocks (not checked on device).
        scale: default ``1/sqrt(D)``; tokens_per_split: split-K tuning (default fills the GPU). The key
            tile (``BLOCK_N``), warps and pipeline stages are autotuned per (G, D, Dv, dtype).
    Returns:
        ``[B, Hq, Dv]`` in ``q.dtype`` (zeros for a head with ``count == 0``).
    """
    C.check_float("q", q)
    C.check_float("k_cache", k_cache, q.dtype)
    C.check_float("v_cache", v_cache, q.dtype)
    C.check_int("block_table", block_table, 2)
    block_table = block_table.contiguous()  # the kernel reads columns at stride 1
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError("q must be [B, Hq, D] and k_cache/v_cache [num_blocks, block_size, Hkv, D]")
    b, hq, d = q.shape
    nb, bs, hkv, _ = k_cache.shape
    C.check_head_dim("q", d)
    C.check_head_dim("v_cache", v_cache.shape[3])
    C.check_shape("k_cache", k_cache, (nb, bs, hkv, d))
    C.check_shape("v_cache", v_cache, (nb, bs, hkv, None))
    C.check_shape("block_table", block_table, (b, None))
    for name, t in (("idx", idx), ("count", count)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous int32 tensor")
    C.check_shape("idx", idx, (b, hkv, None))
    C.check_shape("count", count, (b, hkv))
    if hkv < 1 or hq % hkv:
        raise ValueError(f"q: {hq} query heads is not a multiple of {hkv} KV heads")
    C.check_device(q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table, idx=idx, count=count)
    g = hq // hkv
    dv = v_cache.shape[3]
    kmax = idx.shape[2]
    sc = 1.0 / d ** 0.5 if scale is None else float(scale)
    if tokens_per_split is None:  # a multiple of the largest autotuned key tile
        nsplit, per = pick_splits(b * hkv, kmax, q.device, 64, min_tokens_per_split=128)
    else:
        per = -(-int(tokens_per_split) // 16) * 16
        nsplit = max(1, -(-kmax // per))
    m, l, acc = alloc_partials(b, hq, nsplit, dv, q.device)
    _sparse_decode_kernel[(b * hkv, nsplit)](
        q, k_cache, v_cache, block_table, idx, count, m, l, acc,
        sc * LOG2E, hkv, g, d, dv, bs, kmax, per, nsplit,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_table.stride(0),
        BLOCK_H=max(16, C.next_pow2(g)), BLOCK_D=C.next_pow2(d), BLOCK_DV=C.next_pow2(dv),
        F32=C.dot_f32(q.device, q.dtype))
    out = torch.empty(b, hq, dv, dtype=q.dtype, device=q.device)
    return splitk_combine(m, l, acc, out)
