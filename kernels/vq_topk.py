"""A²ATS exact per-KV-head top-K selection over a paged int16 code cache.

Token ``t`` of sequence ``b`` scores ``lut[b, h, code[b, h // G, t]]`` for query head ``h``. Every
query head keeps its ``k_b = min(topk_b, L_b)`` best valid tokens, equal scores preferring the lower
position (exactly :func:`kvcomp.ref.vq_select`); the union over the group plus the first ``sink`` and
last ``local`` tokens is compacted, ascending, into ``idx [B, Hkv, Kmax]`` with ``count [B, Hkv]``
(entries past ``count`` repeat the last index, 0 for an empty row: :func:`kvcomp.ref.mask_to_indices`).

Scores take at most ``C`` distinct values per query head, so the selection threshold comes from a
histogram of codes instead of sorting ``T`` scores:

1. ``hist``: per (sequence, KV head) count of each code over the valid tokens (chunks of the sequence
   in parallel, ``tl.histogram`` per tile, one atomic add per chunk).
2. ``threshold``: per query head, the k-th largest score as a 32-bit order-preserving key ``tau``
   found bit by bit (32 masked sums of ``hist`` over the ``C`` lut entries), ``need = k - #(> tau)``.
3. ``select`` (three modes, chunks in parallel): mode 0 counts per chunk the tokens equal to ``tau``;
   mode 1 counts per chunk the selected tokens (``> tau``, or ``== tau`` with rank among equal tokens
   ``< need``, union over the group, plus sink/local); mode 2 writes their positions at
   ``prefix + cumsum``.
4. ``pad``: fills ``idx`` past ``count``.

Every pass reads only the 2-byte codes and the (cache-resident) lut. No device sync: grid sizes come
from the block-table capacity ``max_blocks * block_size``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C


@triton.jit
def _hist_kernel(code_ptr, bt_ptr, sl_ptr, hist_ptr, HKV, NC, BS, CHUNK, s_cn, s_cs, s_ch, s_btb,
                 BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    pid = tl.program_id(0)
    chunk = tl.program_id(1)
    b = pid // HKV
    h = pid % HKV
    L = tl.load(sl_ptr + b)
    start = chunk * CHUNK
    end = tl.minimum(start + CHUNK, L)
    if start < end:
        hist = tl.zeros([BLOCK_C], dtype=tl.int32)
        for t0 in range(start, end, BLOCK_T):
            tok = t0 + tl.arange(0, BLOCK_T)
            tmask = tok < end
            blk = tl.load(bt_ptr + b * s_btb + tok // BS, mask=tmask, other=0).to(tl.int64)
            code = tl.load(code_ptr + blk * s_cn + (tok % BS) * s_cs + h * s_ch, mask=tmask, other=0).to(tl.int32)
            hist += tl.histogram(code, BLOCK_C, mask=tmask)
        offs_c = tl.arange(0, BLOCK_C)
        tl.atomic_add(hist_ptr + pid.to(tl.int64) * NC + offs_c, hist, mask=(offs_c < NC) & (hist > 0))


@triton.jit
def _threshold_kernel(lut_ptr, hist_ptr, sl_ptr, topk_ptr, tau_ptr, need_ptr, NROWS, HQ, G, NC,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ONE_CHUNK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # b * HQ + hq
    rmask = rows < NROWS
    b = rows // HQ
    hrow = (rows // G).to(tl.int64)  # b * HKV + h: row of hist
    L = tl.load(sl_ptr + b, mask=rmask, other=0)
    k = tl.minimum(tl.load(topk_ptr + b, mask=rmask, other=0), L)
    offs = tl.arange(0, BLOCK_C)
    tau = tl.zeros([BLOCK_R], dtype=tl.int64)
    # u: fp32 score -> int64 key in [0, 2^32), monotone, -0.0 keyed like +0.0
    if ONE_CHUNK:
        m2 = rmask[:, None] & (offs < NC)[None, :]
        x = tl.load(lut_ptr + rows[:, None].to(tl.int64) * NC + offs[None, :], mask=m2, other=0.0)
        bits = x.to(tl.int32, bitcast=True).to(tl.int64)
        u = tl.where(x == 0.0, 2147483648, tl.where(bits < 0, -1 - bits, bits + 2147483648))
        hc = tl.load(hist_ptr + hrow[:, None] * NC + offs[None, :], mask=m2, other=0).to(tl.int64)
        for i in tl.static_range(32):
            cand = tau + (1 << (31 - i))
            cnt = tl.sum(tl.where(u >= cand[:, None], hc, 0), 1)
            tau = tl.where(cnt >= k, cand, tau)
        ngt = tl.sum(tl.where(u > tau[:, None], hc, 0), 1)
    else:
        for i in tl.static_range(32):
            cand = tau + (1 << (31 - i))
            cnt = tl.zeros([BLOCK_R], dtype=tl.int64)
            for c0 in range(0, NC, BLOCK_C):
                m2 = rmask[:, None] & ((c0 + offs) < NC)[None, :]
                x = tl.load(lut_ptr + rows[:, None].to(tl.int64) * NC + (c0 + offs)[None, :], mask=m2, other=0.0)
                bits = x.to(tl.int32, bitcast=True).to(tl.int64)
                u = tl.where(x == 0.0, 2147483648, tl.where(bits < 0, -1 - bits, bits + 2147483648))
                hc = tl.load(hist_ptr + hrow[:, None] * NC + (c0 + offs)[None, :], mask=m2, other=0).to(tl.int64)
                cnt += tl.sum(tl.where(u >= cand[:, None], hc, 0), 1)
            tau = tl.where(cnt >= k, cand, tau)
        ngt = tl.zeros([BLOCK_R], dtype=tl.int64)
        for c0 in range(0, NC, BLOCK_C):
            m2 = rmask[:, None] & ((c0 + offs) < NC)[None, :]
            x = tl.load(lut_ptr + rows[:, None].to(tl.int64) * NC + (c0 + offs)[None, :], mask=m2, other=0.0)
            bits = x.to(tl.int32, bitcast=True).to(tl.int64)
            u = tl.where(x == 0.0, 2147483648, tl.where(bits < 0, -1 - bits, bits + 2147483648))
            hc = tl.load(hist_ptr + hrow[:, None] * NC + (c0 + offs)[None, :], mask=m2, other=0).to(tl.int64)
            ngt += tl.sum(tl.where(u > tau[:, None], hc, 0), 1)
    # tau is now the largest key with #(key >= tau) >= k, i.e. the k-th largest score; k == 0 selects
    # nothing (a threshold above every key)
    tau = tl.where(k > 0, tau, 4294967296)
    need = tl.where(k > 0, k - ngt, 0)
    tl.store(tau_ptr + rows, tau, mask=rmask)
    tl.store(need_ptr + rows, need.to(tl.int32), mask=rmask)


@triton.jit
def _select_kernel(lut_ptr, code_ptr, bt_ptr, sl_ptr, tau_ptr, need_ptr, eq_ptr, cnt_ptr, idx_ptr, count_ptr,
                   HKV, G, NC, BS, CHUNK, NCHUNK, SINK, LOCAL, KMAX, s_cn, s_cs, s_ch, s_btb,
                   MODE: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_CH: tl.constexpr):
    pid = tl.program_id(0)  # b * HKV + h
    chunk = tl.program_id(1)
    b = pid // HKV
    h = pid % HKV
    L = tl.load(sl_ptr + b)
    start = chunk * CHUNK
    end = tl.minimum(start + CHUNK, L)
    offs_h = tl.arange(0, BLOCK_H)
    hmask = offs_h < G
    rows = pid * G + offs_h  # b * HQ + hq
    tau = tl.load(tau_ptr + rows, mask=hmask, other=4294967296)
    offs_ch = tl.arange(0, BLOCK_CH)
    if MODE == 0:
        eq = tl.zeros([BLOCK_H], dtype=tl.int32)
    else:
        need = tl.load(need_ptr + rows, mask=hmask, other=0)
        prev = offs_ch < chunk
        eqp = tl.load(eq_ptr + rows[:, None] * NCHUNK + offs_ch[None, :], mask=hmask[:, None] & prev[None, :], other=0)
        rank = tl.sum(eqp, 1)  # tokens equal to tau in earlier chunks, per query head
        nsel = tl.zeros([1], dtype=tl.int32).sum(0)
        if MODE == 2:
            cp = tl.load(cnt_ptr + pid * NCHUNK + offs_ch, mask=prev, other=0)
            nsel = tl.sum(cp, 0)
    for t0 in range(start, end, BLOCK_T):
        tok = t0 + tl.arange(0, BLOCK_T)
        tmask = tok < end
        blk = tl.load(bt_ptr + b * s_btb + tok // BS, mask=tmask, other=0).to(tl.int64)
        code = tl.load(code_ptr + blk * s_cn + (tok % BS) * s_cs + h * s_ch, mask=tmask, other=0).to(tl.int32)
        m2 = hmask[:, None] & tmask[None, :]
        s = tl.load(lut_ptr + rows[:, None].to(tl.int64) * NC + code[None, :], mask=m2, other=0.0)
        bits = s.to(tl.int32, bitcast=True).to(tl.int64)
        u = tl.where(s == 0.0, 2147483648, tl.where(bits < 0, -1 - bits, bits + 2147483648))
        eqm = m2 & (u == tau[:, None])
        if MODE == 0:
            eq += tl.sum(eqm.to(tl.int32), 1)
        else:
            e32 = eqm.to(tl.int32)
            r = rank[:, None] + tl.cumsum(e32, 1) - 1
            pick = m2 & ((u > tau[:, None]) | (eqm & (r < need[:, None])))
            rank += tl.sum(e32, 1)
            sel = (tl.max(pick.to(tl.int32), 0) > 0) | (tok < SINK) | (tok >= L - LOCAL)
            sel = sel & tmask
            s32 = sel.to(tl.int32)
            if MODE == 2:
                pos = nsel + tl.cumsum(s32, 0) - 1
                tl.store(idx_ptr + pid.to(tl.int64) * KMAX + pos, tok, mask=sel & (pos < KMAX))
            nsel += tl.sum(s32, 0)
    if MODE == 0:
        tl.store(eq_ptr + rows * NCHUNK + chunk, eq, mask=hmask)
    elif MODE == 1:
        tl.store(cnt_ptr + pid * NCHUNK + chunk, nsel)
    else:
        if chunk == 0:
            tot = tl.sum(tl.load(cnt_ptr + pid * NCHUNK + offs_ch, mask=offs_ch < NCHUNK, other=0), 0)
            tl.store(count_ptr + pid, tot)


@triton.jit
def _pad_kernel(idx_ptr, count_ptr, KMAX, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    blk = tl.program_id(1)
    cnt = tl.minimum(tl.load(count_ptr + pid), KMAX)
    last = tl.load(idx_ptr + pid.to(tl.int64) * KMAX + tl.maximum(cnt - 1, 0), mask=cnt > 0, other=0)
    last = tl.where(cnt > 0, last, 0)
    offs = blk * BLOCK_K + tl.arange(0, BLOCK_K)
    val = tl.zeros([BLOCK_K], dtype=tl.int32) + last
    tl.store(idx_ptr + pid.to(tl.int64) * KMAX + offs, val, mask=(offs >= cnt) & (offs < KMAX))


def default_kmax(topk, g: int, sink: int, local: int, capacity: int) -> int:
    """Static ``Kmax`` bound: ``min(capacity, G*topk + sink + local)`` (``capacity`` for tensor topk)."""
    if isinstance(topk, torch.Tensor):
        return max(1, capacity)
    return max(1, min(capacity, g * int(topk) + sink + local))


def triton_vq_topk(lut: torch.Tensor, code_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                   *, topk, sink: int, local: int, kmax: int | None = None,
                   chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact A²ATS selection (contract of :func:`kvcomp.ref.vq_paged.paged_vq_topk`).

    Args:
        lut: ``[B, Hq, C]`` fp32 from :func:`kvcomp.kernels.vq_lut.triton_vq_lut` (contiguous).
        code_cache: ``[num_blocks, block_size, Hkv]`` int16 codes in ``[0, C)`` (not checked on device), any
            strides (vLLM's head-major code pages are a permuted view).
        block_table: ``[B, max_blocks]`` int32/int64; seq_lens: ``[B]`` int32/int64 valid tokens.
        topk: int >= 0 or ``[B]`` int tensor; sink, local: ints >= 0.
        kmax: columns of ``idx``; default :func:`default_kmax` (never smaller than the true count). With a
            tensor ``topk`` the caller vouches that ``kmax >= G*max(topk) + sink + local`` (or the capacity).
        chunk: tokens per parallel chunk (default 4096 on GPU, 256 under the interpreter).
    Returns:
        ``(idx [B, Hkv, kmax] int32, count [B, Hkv] int32)``; the ref's ``Kmax = max(count)`` columns
        are a prefix of ``idx``, the rest repeat the last index.
    """
    if not isinstance(lut, torch.Tensor) or lut.dtype != torch.float32 or lut.dim() != 3 or not lut.is_contiguous():
        raise ValueError("lut must be a contiguous fp32 tensor [B, Hq, C]")
    if not isinstance(code_cache, torch.Tensor) or code_cache.dtype != torch.int16 or code_cache.dim() != 3:
        raise ValueError("code_cache must be an int16 tensor [num_blocks, block_size, Hkv]")
    C.check_int("block_table", block_table, 2)
    C.check_int("seq_lens", seq_lens, 1)
    block_table, seq_lens = block_table.contiguous(), seq_lens.contiguous()  # the kernels read columns at stride 1
    b, hq, nc = lut.shape
    nb, bs, hkv = code_cache.shape
    if hkv < 1 or hq % hkv:
        raise ValueError(f"lut: {hq} query heads is not a multiple of {hkv} KV heads (code_cache.shape[2])")
    if nc > 32768:
        raise ValueError(f"lut has C={nc} codes, more than int16 codes allow (32768)")
    C.check_shape("block_table", block_table, (b, None))
    C.check_shape("seq_lens", seq_lens, (b,))
    for name, x in (("sink", sink), ("local", local)):
        if isinstance(x, bool) or not isinstance(x, int) or x < 0:
            raise ValueError(f"{name} must be a non-negative int, got {x!r}")
    dev = C.check_device(lut=lut, code_cache=code_cache, block_table=block_table, seq_lens=seq_lens)
    if isinstance(topk, torch.Tensor):
        C.check_int("topk", topk, 1)
        C.check_shape("topk", topk, (b,))
        topk_t = topk.to(device=dev, dtype=torch.int32).contiguous()
    elif isinstance(topk, int) and not isinstance(topk, bool) and topk >= 0:
        topk_t = torch.full((b,), min(topk, 2**31 - 1), dtype=torch.int32, device=dev)
    else:
        raise ValueError(f"topk must be a non-negative int or a [B] int tensor, got {topk!r}")
    g = hq // hkv
    cap = block_table.shape[1] * bs
    need_kmax = default_kmax(topk, g, sink, local, cap)
    if kmax is None:
        kmax = need_kmax
    elif isinstance(kmax, bool) or not isinstance(kmax, int) or kmax < 1:
        raise ValueError(f"kmax must be a positive int, got {kmax!r}")
    elif not isinstance(topk, torch.Tensor) and kmax < need_kmax:
        raise ValueError(f"kmax must be >= {need_kmax} (the largest possible count), got {kmax}")
    interp = C.interpreting()
    ch = int(chunk or (256 if interp else 4096))
    block_t = min(256, C.next_pow2(ch)) if interp else 256
    ch = -(-ch // block_t) * block_t
    nchunk = max(1, -(-cap // ch))
    block_c = max(16, C.next_pow2(nc))
    hist = torch.zeros(b * hkv, nc, dtype=torch.int32, device=dev)
    _hist_kernel[(b * hkv, nchunk)](code_cache, block_table, seq_lens, hist, hkv, nc, bs, ch,
                                    code_cache.stride(0), code_cache.stride(1), code_cache.stride(2), block_table.stride(0),
                                    BLOCK_T=block_t, BLOCK_C=block_c, num_warps=4)
    tau = torch.empty(b * hq, dtype=torch.int64, device=dev)
    need = torch.empty(b * hq, dtype=torch.int32, device=dev)
    # one query head per program on the GPU; all of them in one program under the interpreter
    # (whose cost is per operation, not per element)
    block_r = min(64, C.next_pow2(b * hq)) if interp else 1
    one = block_c * block_r <= (1 << 16) if interp else block_c <= 4096
    bc_thr = block_c if one else min(block_c, 1024)
    _threshold_kernel[(triton.cdiv(b * hq, block_r),)](lut, hist, seq_lens, topk_t, tau, need, b * hq, hq, g, nc,
                                                       BLOCK_R=block_r, BLOCK_C=bc_thr, ONE_CHUNK=one,
                                                       num_warps=8)
    eq = torch.empty(b * hq, nchunk, dtype=torch.int32, device=dev)
    cnt = torch.empty(b * hkv, nchunk, dtype=torch.int32, device=dev)
    idx = torch.empty(b, hkv, kmax, dtype=torch.int32, device=dev)
    count = torch.empty(b, hkv, dtype=torch.int32, device=dev)
    for mode in (0, 1, 2):
        _select_kernel[(b * hkv, nchunk)](
            lut, code_cache, block_table, seq_lens, tau, need, eq, cnt, idx, count,
            hkv, g, nc, bs, ch, nchunk, sink, local, kmax,
            code_cache.stride(0), code_cache.stride(1), code_cache.stride(2), block_table.stride(0),
            MODE=mode, BLOCK_H=C.next_pow2(g), BLOCK_T=block_t, BLOCK_CH=C.next_pow2(nchunk), num_warps=4)
    block_k = min(1024, C.next_pow2(kmax))
    _pad_kernel[(b * hkv, triton.cdiv(kmax, block_k))](idx, count, kmax, BLOCK_K=block_k, num_warps=4)
    return idx, count
