"""ThinK cache write: pack the kept channels of new keys into the narrow pages, full width into the ring.

Layout: :mod:`kvcomp.kernels.think_decode`. One program per new token (all KV heads at once): it finds its
sequence by counting ``query_start_loc[1:] <= i``, its position
``p = seq_lens[b] - q_len_b + (i - query_start_loc[b])``, gathers ``k[i, h, chan_idx[b|0, h]]`` into
slot ``p % block_size`` of block ``block_table[b, p // block_size]`` and, when ``p >= seq_lens[b] - W``,
copies the full key into ring slot ``p % W``. Reference:
:func:`kvcomp.ref.compressed_write.pack_pruned_keys_paged`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C


@triton.jit(do_not_specialize=["B"])
def _think_write_kernel(k_ptr, chan_ptr, kp_ptr, kr_ptr, bt_ptr, sl_ptr, qsl_ptr, B, HKV, DK, D, W, WR, BS,
                        s_kn, s_kh, s_cb, s_ch, s_kpn, s_kps, s_kph, s_krb, s_krh, s_krw, s_btb,
                        BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_DK: tl.constexpr,
                        BLOCK_D: tl.constexpr):
    i = tl.program_id(0)
    # the sequence of token i: count query_start_loc[1:] <= i, BLOCK_B entries at a time (a fixed tile:
    # one compiled kernel for every batch size)
    b = tl.zeros([1], dtype=tl.int32).sum(0)
    for b0 in range(0, B, BLOCK_B):
        offs_b = b0 + tl.arange(0, BLOCK_B)
        ends = tl.load(qsl_ptr + 1 + offs_b, mask=offs_b < B, other=2147483647)
        b += tl.sum((ends <= i).to(tl.int32), 0)
    b = b.to(tl.int64)  # int64: b * s_krb (Hkv * W * D per sequence) can pass 2^31
    q0 = tl.load(qsl_ptr + b)
    q1 = tl.load(qsl_ptr + b + 1)
    L = tl.load(sl_ptr + b)
    p = L - (q1 - q0) + (i - q0)
    blk = tl.load(bt_ptr + b * s_btb + p // BS).to(tl.int64)
    slot = p % BS
    offs_h = tl.arange(0, BLOCK_H)
    hmask = offs_h < HKV
    offs_dk = tl.arange(0, BLOCK_DK)
    m2 = hmask[:, None] & (offs_dk < DK)[None, :]
    chan = tl.load(chan_ptr + b * s_cb + offs_h[:, None] * s_ch + offs_dk[None, :], mask=m2, other=0)
    kg = tl.load(k_ptr + i.to(tl.int64) * s_kn + offs_h[:, None] * s_kh + chan, mask=m2, other=0.0)
    tl.store(kp_ptr + blk * s_kpn + slot * s_kps + offs_h[:, None] * s_kph + offs_dk[None, :],
             kg.to(kp_ptr.dtype.element_ty), mask=m2)
    if p >= L - W:
        offs_d = tl.arange(0, BLOCK_D)
        md = hmask[:, None] & (offs_d < D)[None, :]
        kf = tl.load(k_ptr + i.to(tl.int64) * s_kn + offs_h[:, None] * s_kh + offs_d[None, :], mask=md, other=0.0)
        tl.store(kr_ptr + b * s_krb + offs_h[:, None] * s_krh + (p % WR) * s_krw + offs_d[None, :],
                 kf.to(kr_ptr.dtype.element_ty), mask=md)


def triton_pack_pruned_keys_paged(k_new: torch.Tensor, chan_idx: torch.Tensor, kp_cache: torch.Tensor,
                                  k_recent: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                                  query_start_loc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In-place ThinK key write (contract of :func:`kvcomp.ref.compressed_write.pack_pruned_keys_paged`).

    Args:
        k_new: ``[N, Hkv, D]`` float, last dim contiguous.
        chan_idx: ``[B or 1, Hkv, Dk]`` int32/int64 (ids in ``[0, D)``, not checked on device).
        kp_cache: ``[num_blocks, block_size, Hkv, Dk]``; k_recent: ``[B, Hkv, W, D]`` (``W >= 0``).
        block_table: ``[B, max_blocks]``; seq_lens: ``[B]``; query_start_loc: ``[B+1]`` (int32/int64).
    Returns:
        ``(kp_cache, k_recent)``, written in place.
    """
    C.check_float("k_new", k_new)
    C.check_float("kp_cache", kp_cache)
    C.check_float("k_recent", k_recent, kp_cache.dtype)
    C.check_int("chan_idx", chan_idx, 3)
    C.check_int("block_table", block_table, 2)
    C.check_int("seq_lens", seq_lens, 1)
    C.check_int("query_start_loc", query_start_loc, 1)
    # the kernel reads block-table columns and the 1-D metadata at stride 1
    block_table, seq_lens, query_start_loc = block_table.contiguous(), seq_lens.contiguous(), query_start_loc.contiguous()
    if k_new.dim() != 3 or kp_cache.dim() != 4 or k_recent.dim() != 4:
        raise ValueError("k_new must be [N, Hkv, D], kp_cache [num_blocks, block_size, Hkv, Dk], "
                         "k_recent [B, Hkv, W, D]")
    n, hkv, d = k_new.shape
    nb, bs, _, dk = kp_cache.shape
    bsz = block_table.shape[0]
    C.check_shape("kp_cache", kp_cache, (None, None, hkv, None))
    C.check_shape("k_recent", k_recent, (bsz, hkv, None, d))
    C.check_shape("seq_lens", seq_lens, (bsz,))
    C.check_shape("query_start_loc", query_start_loc, (bsz + 1,))
    if chan_idx.shape[0] not in (1, bsz) or tuple(chan_idx.shape[1:]) != (hkv, dk) or chan_idx.stride(-1) != 1:
        raise ValueError(f"chan_idx must be [B={bsz} or 1, Hkv={hkv}, Dk={dk}] with a contiguous last dim, "
                         f"got {list(chan_idx.shape)}")
    if not 1 <= dk <= d:
        raise ValueError(f"kp_cache: Dk={dk} must lie in [1, D={d}]")
    C.check_device(k_new=k_new, chan_idx=chan_idx, kp_cache=kp_cache, k_recent=k_recent, block_table=block_table,
                   seq_lens=seq_lens, query_start_loc=query_start_loc)
    if n == 0:
        return kp_cache, k_recent
    w = k_recent.shape[2]
    _think_write_kernel[(n,)](
        k_new, chan_idx, kp_cache, k_recent, block_table, seq_lens, query_start_loc, bsz, hkv, dk, d, w, max(w, 1), bs,
        k_new.stride(0), k_new.stride(1), 0 if chan_idx.shape[0] == 1 else chan_idx.stride(0), chan_idx.stride(1),
        kp_cache.stride(0), kp_cache.stride(1), kp_cache.stride(2),
        k_recent.stride(0), k_recent.stride(1), k_recent.stride(2) if w else 0, block_table.stride(0),
        BLOCK_B=64, BLOCK_H=C.next_pow2(hkv), BLOCK_DK=C.next_pow2(dk), BLOCK_D=C.next_pow2(d),
        num_warps=4)
    return kp_cache, k_recent
