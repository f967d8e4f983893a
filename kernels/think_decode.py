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

Storage width: ThinK keeps ``Dk`` channels rounded up to a multiple of 16 (80 of 128 at λ = 0.4,
:func:`kvcomp.ref.think_kept_dim`), so a pruned key row is whole 16-channel vectors and starts 32-byte
aligned in 16-bit storage. ``Dk`` is a constexpr, read as two power-of-two tiles (:func:`dk_tiles`): the
largest power of two ``<= Dk``, then the rest padded to a power of two; every width that is a sum of two
powers of two >= 16 (48, 80, 96, 160, ... ; every multiple of 16 up to 96) loads without a mask, the other
multiples of 16 (112, 176, 208, 224, 240) mask whole 16-channel vectors, and any other width (a config with
``channel_multiple`` 1, e.g. 77) stays correct with a ragged mask in its second tile.

The key tile (``BLOCK_N``), warps and pipeline stages are autotuned per ``(G, D, Dk, Dv, dtype)``: never per
batch size, sequence length or split count, so serving compiles one set of variants per model geometry.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C
from .splitk import LOG2E, alloc_partials, online_update, pick_splits, splitk_combine, store_partial


def _tiles(c, nargs, meta):
    """``(reg, smem, f32)`` of :func:`C.prune_sm90`: a ``[BLOCK_N, max(D, Dv)]`` K/V tile in registers, and
    per pipeline stage the key and value tiles (``BLOCK_N x (BLOCK_D + BLOCK_DV)``)."""
    dtype = nargs["q_ptr"].dtype
    size = torch.finfo(dtype).bits // 8
    n = c.kwargs["BLOCK_N"]
    return (n * max(meta["BLOCK_D"], meta["BLOCK_DV"]) * size, n * (meta["BLOCK_D"] + meta["BLOCK_DV"]) * size,
            dtype == torch.float32)


# Configs whose K/V tiles stay in registers on sm_90. fp32 tiles stay strictly under the budget: a step
# holds a key tile of each part (pruned and full-width), and the two fp32 configs at exactly the budget
# spilled with Triton 3.6 (D = 64 at 32 rows x 4 warps, D = 128 at 16 rows x 4 warps). When none fits
# (fp32 at D = 256), 16 rows on 8 warps (compiled without spills).
_fits = C.prune_sm90(_tiles, f32_strict=True,
                     fallback=lambda c: c.kwargs["BLOCK_N"] == 16 and c.num_warps == 8)


# the first config is the interpreter's; (16, 8 warps) fits every dtype and head dim
_CONFIGS = [triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_N": 16}, num_warps=8, num_stages=2),
            triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=2),
            triton.Config({"BLOCK_N": 32}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_N": 64}, num_warps=8, num_stages=2)]
_MAX_BLOCK_N = 64


def dk_tiles(dk: int) -> tuple[int, int]:
    """The pruned key width as two tiles ``(DK_A, BLOCK_B)`` of powers of two: channels ``[0, DK_A)`` (the
    largest power of two ``<= dk``, 16 below 16 channels) and ``[DK_A, DK_A + BLOCK_B)`` (>= 16; 0 when
    nothing is left); a tile is masked only where it passes ``dk``."""
    a = 1 << (dk.bit_length() - 1) if dk >= 16 else 16
    return a, (max(16, C.next_pow2(dk - a)) if dk > a else 0)


@triton.jit
def _q_tile(chan_row, q_row, hmask, DK: tl.constexpr, C0: tl.constexpr, WIDTH: tl.constexpr, F32: tl.constexpr):
    """The query rows (``q_row [BLOCK_H]`` pointers) at the kept channels ``[C0, C0 + WIDTH)``: ``[BLOCK_H,
    WIDTH]``, zero past ``DK`` (a mask only there)."""
    offs = C0 + tl.arange(0, WIDTH)
    if C0 + WIDTH <= DK:
        qg = tl.load(q_row[:, None] + tl.load(chan_row + offs)[None, :], mask=hmask[:, None], other=0.0)
    else:
        cmask = offs < DK
        chan = tl.load(chan_row + offs, mask=cmask, other=0)
        qg = tl.load(q_row[:, None] + chan[None, :], mask=hmask[:, None] & cmask[None, :], other=0.0)
    if F32:
        qg = qg.to(tl.float32)
    return qg


@triton.jit
def _k_tile(kp_ptr, row, nmask, DK: tl.constexpr, C0: tl.constexpr, WIDTH: tl.constexpr, F32: tl.constexpr):
    """Pruned key rows (``row [BLOCK_N]`` element offsets) at stored channels ``[C0, C0 + WIDTH)``."""
    offs = C0 + tl.arange(0, WIDTH)
    if C0 + WIDTH <= DK:
        k = tl.load(kp_ptr + row[:, None] + offs[None, :], mask=nmask[:, None], other=0.0)
    else:
        k = tl.load(kp_ptr + row[:, None] + offs[None, :], mask=nmask[:, None] & (offs < DK)[None, :], other=0.0)
    if F32:
        k = k.to(tl.float32)
    return k


# keyed by the group size and widths (and dtype): never by batch size, sequence length or split count
@C.autotune(_CONFIGS, key=["G", "D", "DK", "DV"], prune=_fits)
@triton.jit(do_not_specialize=["TOK_PER_SPLIT", "NSPLIT"])
def _think_decode_kernel(
    q_ptr, kp_ptr, chan_ptr, kr_ptr, v_ptr, bt_ptr, sl_ptr, m_ptr, l_ptr, acc_ptr,
    qk_scale, HKV, G, D, DV, W, WR, BS, TOK_PER_SPLIT, NSPLIT,
    s_qb, s_qh, s_kpn, s_kps, s_kph, s_cb, s_ch, s_krb, s_krh, s_krw, s_vn, s_vs, s_vh, s_btb,
    DK: tl.constexpr, DK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, F32: tl.constexpr,
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
        # pruned region [start, end) of this part; the kept channels in two tiles (dk_tiles)
        start = split * TOK_PER_SPLIT
        end = tl.minimum(start + TOK_PER_SPLIT, Tp)
        chan_row = chan_ptr + b * s_cb + h * s_ch
        q_row = q_ptr + b * s_qb + hq * s_qh
        qa = _q_tile(chan_row, q_row, hmask, DK, 0, DK_A, F32)
        if BLOCK_B > 0:
            qb = _q_tile(chan_row, q_row, hmask, DK, DK_A, BLOCK_B, F32)
        for n0 in range(start, end, BLOCK_N):
            tok = n0 + offs_n
            nmask = tok < end
            blk = tl.load(bt_ptr + b * s_btb + tok // BS, mask=nmask, other=0).to(tl.int64)
            slot = tok % BS
            row = blk * s_kpn + slot * s_kps + h * s_kph
            s = C.dot(qa, tl.trans(_k_tile(kp_ptr, row, nmask, DK, 0, DK_A, F32)), F32)
            if BLOCK_B > 0:
                s += C.dot(qb, tl.trans(_k_tile(kp_ptr, row, nmask, DK, DK_A, BLOCK_B, F32)), F32)
            v = tl.load(v_ptr + blk[:, None] * s_vn + slot[:, None] * s_vs + h * s_vh + offs_dv[None, :],
                        mask=nmask[:, None] & dvmask[None, :], other=0.0)
            if F32:
                v = v.to(tl.float32)
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
                        max_seq_len: int | None = None) -> torch.Tensor:
    """Decode attention over a ThinK cache (layout in the module doc).

    Args:
        q: ``[B, Hq, D]`` one post-RoPE query per sequence (full head dim).
        kp_cache: ``[num_blocks, block_size, Hkv, Dk]`` pruned key pages.
        chan_idx: ``[B or 1, Hkv, Dk]`` int32/int64 kept channel ids (``0 <= id < D``; not checked on device).
        k_recent: ``[B, Hkv, W, D]`` full-width ring (``W >= 0``).
        v_cache: ``[num_blocks, block_size, Hkv, Dv]``.
        block_table: ``[B, max_blocks]`` int32/int64; seq_lens: ``[B]`` (>= 1) tokens incl. the new one.
        scale: default ``1/sqrt(D)``.
        tokens_per_split: pruned tokens per split-K part (default: sized to fill the GPU). The key tile
            (``BLOCK_N``), warps and stages are autotuned per (G, D, Dk, Dv, dtype).
        max_seq_len: optional host-known bound on ``seq_lens`` (e.g. vLLM's ``max_seq_len``); the split
            count is sized from it instead of the block-table capacity. Must be ``>= max(seq_lens)``.
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
    cap = block_table.shape[1] * bs
    if max_seq_len is not None:
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 1:
            raise ValueError(f"max_seq_len must be a positive int or None, got {max_seq_len!r}")
        cap = min(cap, max_seq_len)
    if tokens_per_split is None:  # a multiple of the largest autotuned key tile
        nsplit, per = pick_splits(b * hkv, cap, q.device, _MAX_BLOCK_N)
    else:
        per = -(-int(tokens_per_split) // 16) * 16
        nsplit = max(1, -(-cap // per))
    m, l, acc = alloc_partials(b, hq, nsplit + 1, dv, q.device)
    f32 = C.dot_f32(q.device, q.dtype)
    cb = 0 if chan_idx.shape[0] == 1 else chan_idx.stride(0)
    dk_a, block_b = dk_tiles(dk)
    _think_decode_kernel[(b * hkv, nsplit + 1)](
        q, kp_cache, chan_idx, k_recent, v_cache, block_table, seq_lens, m, l, acc,
        sc * LOG2E, hkv, g, d, dv, w, max(w, 1), bs, per, nsplit,
        q.stride(0), q.stride(1), kp_cache.stride(0), kp_cache.stride(1), kp_cache.stride(2),
        cb, chan_idx.stride(1), k_recent.stride(0), k_recent.stride(1), k_recent.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_table.stride(0),
        DK=dk, DK_A=dk_a, BLOCK_B=block_b, BLOCK_H=max(16, C.next_pow2(g)), BLOCK_D=C.next_pow2(d),
        BLOCK_DV=C.next_pow2(dv), F32=f32,
    )
    out = torch.empty(b, hq, dv, dtype=q.dtype, device=q.device)
    return splitk_combine(m, l, acc, out)
