"""ThinK pruned-key paged decode: split-K flash-decoding over channel-pruned keys + a full-width ring.

Cache layout (one layer; ``W`` = full-width recent window, ``Dk`` = kept channels per KV head):

- ``kp_cache [num_blocks, block_size, Hkv, Dk]``: channel-pruned keys. Token ``p`` of sequence ``b``
  sits in slot ``p % block_size`` of block ``block_table[b, p // block_size]`` (the same pages and
  block table as the values). Every appended token is written here (a slot write,
  :func:`kvcomp.methods.dense.write_pages`), but decode reads it only for the pruned region ``p < T_p``.
- ``chan_idx [B or 1, Hkv, Dk]``: kept channel ids per KV head (per request, or one static set per
  layer broadcast over the batch when the first dim is 1).
- ``k_recent [B, Hkv, W, D]``: full-width ring; token ``p`` sits in slot ``p % W``. It holds the
  last ``min(seq_len, W)`` tokens, ``p >= T_p = max(seq_len - W, 0)``. ``W = 0`` (no recent window)
  is allowed: then every token is read pruned.
- ``v_cache [num_blocks, block_size, Hkv, Dv]``: ordinary value pages for every token.

Decode of one query per sequence: logits of pruned tokens are ``q[chan_idx] . k_pruned``, of recent
tokens ``q . k``, all scaled by ``scale`` (default ``1/sqrt(D)`` with the full ``D``). The pruned
range is split into ``S`` parts (grid axis 1) plus one extra part for the ring; parts are merged by
:func:`kvcomp.kernels.splitk.splitk_combine`. Each program handles one (sequence, KV head) and all
``G`` query heads of its group (padded to 16 rows for ``tl.dot``), so a key tile is read once per
group. Reference: :func:`kvcomp.ref.think_paged.paged_pruned_key_attention`.

Storage width: ``Dk`` is stored as is (e.g. 77 of 128 channels), the layout the vLLM backend and the HF
path share. A pruned key row then starts on a 2-byte boundary and its ``BLOCK_DK``-wide load is masked,
so the loads are not 16-byte vectorised; padding ``Dk`` to a multiple of 16 in storage (about +4% of the
pruned bytes at 77 -> 80) would need that shared layout to change with it and is not done here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C
from .splitk import LOG2E, alloc_partials, online_update, pick_splits, splitk_combine, store_partial


@triton.jit(do_not_specialize=["TOK_PER_SPLIT", "NSPLIT"])
def _think_decode_kernel(
    q_ptr, kp_ptr, chan_ptr, kr_ptr, v_ptr, bt_ptr, sl_ptr, m_ptr, l_ptr, acc_ptr,
    qk_scale, HKV, G, DK, D, DV, W, WR, BS, TOK_PER_SPLIT, NSPLIT,
    s_qb, s_qh, s_kpn, s_kps, s_kph, s_cb, s_ch, s_krb, s_krh, s_krw, s_vn, s_vs, s_vh, s_btb,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr, F32: tl.constexpr,
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid // HKV).to(tl.int64)  # int64: b * s_krb (Hkv * W * D per sequence) can pass 2^31
    h = pid % HKV
    L = tl.load(sl_ptr + b)
    Tp = tl.maximum(L - W, 0)
    offs_h = tl.arange(0, BLOCK_H)
    hmask = offs_h < G
    hq = h * G + offs_h
    offs_n = tl.arange(0, BLOCK_N)
    offs_dv = tl.arange(0, BLOCK_DV)
    dvmask = offs_dv < DV
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], dtype=tl.float32)
    if split < NSPLIT:
        # pruned region [start, end) of this part
        start = split * TOK_PER_SPLIT
        end = tl.minimum(start + TOK_PER_SPLIT, Tp)
        offs_dk = tl.arange(0, BLOCK_DK)
        dkmask = offs_dk < DK
        chan = tl.load(chan_ptr + b * s_cb + h * s_ch + offs_dk, mask=dkmask, other=0)
        qg = tl.load(q_ptr + b * s_qb + hq[:, None] * s_qh + chan[None, :],
                     mask=hmask[:, None] & dkmask[None, :], other=0.0)
        if F32:
            qg = qg.to(tl.float32)
        for n0 in range(start, end, BLOCK_N):
            tok = n0 + offs_n
            nmask = tok < end
            blk = tl.load(bt_ptr + b * s_btb + tok // BS, mask=nmask, other=0).to(tl.int64)
            slot = tok % BS
            k = tl.load(kp_ptr + blk[:, None] * s_kpn + slot[:, None] * s_kps + h * s_kph + offs_dk[None, :],
                        mask=nmask[:, None] & dkmask[None, :], other=0.0)
            v = tl.load(v_ptr + blk[:, None] * s_vn + slot[:, None] * s_vs + h * s_vh + offs_dv[None, :],
                        mask=nmask[:, None] & dvmask[None, :], other=0.0)
            if F32:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
                s = tl.dot(qg, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(qg, tl.trans(k))
            s = tl.where(nmask[None, :], s * qk_scale, float("-inf"))
            m_i, l_i, acc = online_update(m_i, l_i, acc, s, v, F32)
    else:
        # full-width ring: tokens [Tp, L), token p in slot p % W
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        qf = tl.load(q_ptr + b * s_qb + hq[:, None] * s_qh + offs_d[None, :],
                     mask=hmask[:, None] & dmask[None, :], other=0.0)
        if F32:
            qf = qf.to(tl.float32)
        for n0 in range(Tp, L, BLOCK_N):
            tok = n0 + offs_n
            nmask = tok < L
            ring = tok % WR
            blk = tl.load(bt_ptr + b * s_btb + tok // BS, mask=nmask, other=0).to(tl.int64)
            slot = tok % BS
            k = tl.load(kr_ptr + b * s_krb + h * s_krh + ring[:, None] * s_krw + offs_d[None, :],
                        mask=nmask[:, None] & dmask[None, :], other=0.0)
            v = tl.load(v_ptr + blk[:, None] * s_vn + slot[:, None] * s_vs + h * s_vh + offs_dv[None, :],
                        mask=nmask[:, None] & dvmask[None, :], other=0.0)
            if F32:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
                s = tl.dot(qf, tl.trans(k), input_precision="ieee")
            else:
                s = tl.dot(qf, tl.trans(k))
            s = tl.where(nmask[None, :], s * qk_scale, float("-inf"))
            m_i, l_i, acc = online_update(m_i, l_i, acc, s, v, F32)
    store_partial(m_ptr, l_ptr, acc_ptr, b * HKV * G + h * G, NSPLIT + 1, split, m_i, l_i, acc,
                  offs_h, hmask, offs_dv, DV)


def _check(q, kp_cache, chan_idx, k_recent, v_cache, block_table, seq_lens):
    C.check_float("q", q)
    C.check_float("kp_cache", kp_cache, q.dtype)
    C.check_float("k_recent", k_recent, q.dtype)
    C.check_float("v_cache", v_cache, q.dtype)
    C.check_int("chan_idx", chan_idx, 3)
    C.check_int("block_table", block_table, 2)
    C.check_int("seq_lens", seq_lens, 1)
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, D], got shape {list(q.shape)}")
    if kp_cache.dim() != 4 or v_cache.dim() != 4 or k_recent.dim() != 4:
        raise ValueError("kp_cache, v_cache must be [num_blocks, block_size, Hkv, *] and k_recent [B, Hkv, W, D]")
    b, hq, d = q.shape
    nb, bs, hkv, dk = kp_cache.shape
    C.check_head_dim("q", d)
    C.check_head_dim("v_cache", v_cache.shape[3])
    C.check_shape("v_cache", v_cache, (nb, bs, hkv, None))
    C.check_shape("k_recent", k_recent, (b, hkv, None, d))
    C.check_shape("block_table", block_table, (b, None))
    C.check_shape("seq_lens", seq_lens, (b,))
    if chan_idx.shape[0] not in (1, b) or tuple(chan_idx.shape[1:]) != (hkv, dk):
        raise ValueError(f"chan_idx must be [B={b} or 1, Hkv={hkv}, D_keep={dk}], got {list(chan_idx.shape)}")
    if chan_idx.stride(-1) != 1:
        raise ValueError("chan_idx must be contiguous in its last dim")
    if not 1 <= dk <= d:
        raise ValueError(f"kp_cache: D_keep={dk} must lie in [1, D={d}]")
    if hkv < 1 or hq % hkv:
        raise ValueError(f"q: {hq} query heads is not a multiple of {hkv} KV heads")
    C.check_device(q=q, kp_cache=kp_cache, chan_idx=chan_idx, k_recent=k_recent, v_cache=v_cache,
                   block_table=block_table, seq_lens=seq_lens)


def triton_think_decode(q: torch.Tensor, kp_cache: torch.Tensor, chan_idx: torch.Tensor, k_recent: torch.Tensor,
                        v_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, *,
                        scale: float | None = None, tokens_per_split: int | None = None,
                        max_seq_len: int | None = None, block_n: int | None = None) -> torch.Tensor:
    """Decode attention over a ThinK cache (layout in the module doc).

    Args:
        q: ``[B, Hq, D]`` one post-RoPE query per sequence (full head dim).
        kp_cache: ``[num_blocks, block_size, Hkv, Dk]`` pruned key pages.
        chan_idx: ``[B or 1, Hkv, Dk]`` int32/int64 kept channel ids (``0 <= id < D``; not checked on device).
        k_recent: ``[B, Hkv, W, D]`` full-width ring (``W >= 0``).
        v_cache: ``[num_blocks, block_size, Hkv, Dv]``.
        block_table: ``[B, max_blocks]`` int32/int64; seq_lens: ``[B]`` (>= 1) tokens incl. the new one.
        scale: default ``1/sqrt(D)``.
        tokens_per_split: pruned tokens per split-K part (default: sized to fill the GPU).
        max_seq_len: optional host-known bound on ``seq_lens`` (e.g. vLLM's ``max_seq_len``); the split
            count is sized from it instead of the block-table capacity. Must be ``>= max(seq_lens)``.
        block_n: key tile (default ``kv_block_n`` at 8 warps: 64 at bf16 D=128, 32 at fp32; 16 under the
            interpreter).
    Returns:
        ``[B, Hq, Dv]`` in ``q.dtype``.
    """
    _check(q, kp_cache, chan_idx, k_recent, v_cache, block_table, seq_lens)
    block_table, seq_lens = block_table.contiguous(), seq_lens.contiguous()  # the kernel reads columns at stride 1
    b, hq, d = q.shape
    nb, bs, hkv, dk = kp_cache.shape
    w = k_recent.shape[2]
    dv = v_cache.shape[3]
    g = hq // hkv
    sc = 1.0 / d ** 0.5 if scale is None else float(scale)
    interp = C.interpreting()
    bn = block_n or (16 if interp else C.kv_block_n(d, q.dtype, num_warps=8))
    cap = block_table.shape[1] * bs
    if max_seq_len is not None:
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
            raise ValueError(f"max_seq_len must be a positive int or None, got {max_seq_len!r}")
        cap = min(cap, max_seq_len)
    if tokens_per_split is None:
        nsplit, per = pick_splits(b * hkv, cap, q.device, bn)
    else:
        per = -(-int(tokens_per_split) // bn) * bn
        nsplit = max(1, -(-cap // per))
    m, l, acc = alloc_partials(b, hq, nsplit + 1, dv, q.device)
    f32 = C.dot_f32(q.device, q.dtype)
    cb = 0 if chan_idx.shape[0] == 1 else chan_idx.stride(0)
    _think_decode_kernel[(b * hkv, nsplit + 1)](
        q, kp_cache, chan_idx, k_recent, v_cache, block_table, seq_lens, m, l, acc,
        sc * LOG2E, hkv, g, dk, d, dv, w, max(w, 1), bs, per, nsplit,
        q.stride(0), q.stride(1), kp_cache.stride(0), kp_cache.stride(1), kp_cache.stride(2),
        cb, chan_idx.stride(1), k_recent.stride(0), k_recent.stride(1), k_recent.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_table.stride(0),
        BLOCK_H=max(16, C.next_pow2(g)), BLOCK_N=bn, BLOCK_DK=max(16, C.next_pow2(dk)),
        BLOCK_D=C.next_pow2(d), BLOCK_DV=C.next_pow2(dv), F32=f32, num_warps=4 if interp else 8,
    )
    out = torch.empty(b, hq, dv, dtype=q.dtype, device=q.device)
    return splitk_combine(m, l, acc, out)
