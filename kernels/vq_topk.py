"""A²ATS exact per-KV-head top-K selection over a paged int16 code cache.

Token ``t`` of sequence ``b`` scores ``lut[b, h, code[b, h // G, t]]`` for query head ``h``. Every
query head keeps its ``k_b = min(topk_b, L_b)`` best valid tokens, equal scores preferring the lower
position (exactly :func:`kvcomp.ref.vq_select`); the union over the group plus the first ``sink`` and
last ``local`` tokens is compacted, ascending, into ``idx [B, Hkv, Kmax]`` with ``count [B, Hkv]``
(entries past ``count`` repeat the last index, 0 for an empty row: :func:`kvcomp.ref.mask_to_indices`).

The selection threshold comes from a radix select over the scores' 32-bit order-preserving keys,
8 bits per pass, so every histogram has 256 bins:

1. ``radix`` (4 passes, chunks of the sequence in parallel): per query head, pass ``p`` counts digit
   ``p`` (bits ``31-8p .. 24-8p``) of the keys of the valid tokens whose first ``p`` digits equal those
   of the k-th largest key (decided from the histograms of the earlier passes), ``tl.histogram`` of
   256 bins per tile, one atomic add per chunk.
2. ``threshold``: from the four histograms, the k-th largest key ``tau`` and ``need = k - #(> tau)``.
3. ``select`` (three modes, chunks in parallel): mode 0 counts per chunk the tokens equal to ``tau``;
   mode 1 counts per chunk the selected tokens (``> tau``, or ``== tau`` with rank among equal tokens
   ``< need``, union over the group, plus sink/local); mode 2 writes their positions at
   ``prefix + cumsum``.
4. ``pad``: fills ``idx`` past ``count``.

Why radix over the token scores and not a histogram of codes (the earlier design: ``C`` = 4096 bins
per (sequence, KV head), then a search over the ``C`` lut entries): Triton lowers ``tl.histogram`` to
one warp ballot per bin-index bit plus, per lane, ``bins / 32`` popcounts and shared-memory atomics at
``lane * bins / 32 + i``; at 4096 bins that is 128 same-bank atomics per lane and per tile, at 256
bins 8. The radix passes cost 4 reads of the 2-byte codes (instead of 1) and are per query head
instead of per KV head (the lut gather hits L1: a row is ``4 C`` bytes), and they need no ``C``-sized
scratch or ``C``-long threshold search (any ``C`` up to 32768 takes the same path). A code histogram
kept by the cache write (``vq_encode_paged``) would save the first pass but needs per-request state
in the cache, which the paged layout (shared prefix blocks) does not have.

Every pass reads only the 2-byte codes and the (cache-resident) lut. No device sync: grid sizes come
from the block-table capacity ``max_blocks * block_size``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C


def _select_tiles(c, nargs, meta):
    """The ``[BLOCK_H, BLOCK_T]`` int64 keys of the select kernel, per 4 warps."""
    return meta["BLOCK_H"] * c.kwargs["BLOCK_T"] * 8 * 4 // c.num_warps, 0, False


# token tiles and warps (the first config is the interpreter's); the chunk a program scans (the launcher's,
# which sizes the per-chunk scratch) does not depend on the tile
_RADIX_CONFIGS = [triton.Config({"BLOCK_T": 256}, num_warps=4, num_stages=2),
                  triton.Config({"BLOCK_T": 512}, num_warps=4, num_stages=2),
                  triton.Config({"BLOCK_T": 1024}, num_warps=8, num_stages=2)]
_SELECT_CONFIGS = [triton.Config({"BLOCK_T": 256}, num_warps=4, num_stages=2),
                   triton.Config({"BLOCK_T": 128}, num_warps=4, num_stages=2),
                   triton.Config({"BLOCK_T": 512}, num_warps=8, num_stages=2)]


@triton.jit
def _key(s):
    """fp32 score -> int64 key in [0, 2^32), monotone, -0.0 keyed like +0.0."""
    bits = s.to(tl.int32, bitcast=True).to(tl.int64)
    return tl.where(s == 0.0, 2147483648, tl.where(bits < 0, -1 - bits, bits + 2147483648))


@triton.jit
def _prefix(hist_ptr, rows, k, NROWS, NPASS: tl.constexpr):
    """Key bits decided by the first ``NPASS`` radix passes for ``rows`` (``[R]``, each looking for its
    ``k``-th largest key): ``(prefix, kk)``, ``prefix`` holding the top ``8 * NPASS`` bits of the k-th
    largest key and ``kk`` its rank among the keys that share them (``k`` minus those above)."""
    digits = tl.arange(0, 256)
    prefix = tl.zeros_like(k).to(tl.int64)
    kk = k
    for p in tl.static_range(NPASS):
        h = tl.load(hist_ptr + (p * NROWS + rows.to(tl.int64))[:, None] * 256 + digits[None, :])
        ge = tl.sum(h, 1)[:, None] - tl.cumsum(h, 1) + h  # keys with this digit or a larger one
        d = tl.max(tl.where(ge >= kk[:, None], digits[None, :], 0), 1)
        above = tl.sum(tl.where(digits[None, :] > d[:, None], h, 0), 1)
        prefix = prefix + (d.to(tl.int64) << (24 - 8 * p))
        kk = kk - above
    return prefix, kk


# keyed by GQA group and codebook size (and dtypes), tuned on the first pass: never by batch size or length;
# the histograms the benchmark runs add to are restored after each
@C.autotune(_RADIX_CONFIGS, key=["G", "NC"], restore=["hist_ptr"])
@triton.jit
def _radix_kernel(lut_ptr, code_ptr, bt_ptr, sl_ptr, topk_ptr, hist_ptr, NROWS, HQ, G, NC, BS, CHUNK,
                  s_cn, s_cs, s_ch, s_btb, PASS: tl.constexpr, BLOCK_T: tl.constexpr):
    row = tl.program_id(0)  # b * HQ + hq
    chunk = tl.program_id(1)
    b = row // HQ
    h = (row % HQ) // G
    L = tl.load(sl_ptr + b)
    start = chunk * CHUNK
    end = tl.minimum(start + CHUNK, L)
    k = tl.minimum(tl.load(topk_ptr + b), L)
    if (start < end) & (k > 0):
        rows = row + tl.arange(0, 1)
        prefix, kk = _prefix(hist_ptr, rows, rows * 0 + k, NROWS, PASS)
        prefix = tl.sum(prefix, 0)
        hist = tl.zeros([256], dtype=tl.int32)
        for t0 in range(start, end, BLOCK_T):
            tok = t0 + tl.arange(0, BLOCK_T)
            tmask = tok < end
            blk = tl.load(bt_ptr + b * s_btb + tok // BS, mask=tmask, other=0).to(tl.int64)
            code = tl.load(code_ptr + blk * s_cn + (tok % BS) * s_cs + h * s_ch, mask=tmask, other=0).to(tl.int32)
            u = _key(tl.load(lut_ptr + row.to(tl.int64) * NC + code, mask=tmask, other=0.0))
            m = tmask & ((u >> (32 - 8 * PASS)) == (prefix >> (32 - 8 * PASS)))
            hist += tl.histogram(((u >> (24 - 8 * PASS)) & 255).to(tl.int32), 256, mask=m)
        offs = tl.arange(0, 256)
        tl.atomic_add(hist_ptr + (PASS * NROWS + row.to(tl.int64)) * 256 + offs, hist, mask=hist > 0)


@triton.jit
def _threshold_kernel(hist_ptr, sl_ptr, topk_ptr, tau_ptr, need_ptr, NROWS, HQ, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)  # b * HQ + hq
    rmask = rows < NROWS
    b = rows // HQ
    L = tl.load(sl_ptr + b, mask=rmask, other=0)
    k = tl.minimum(tl.load(topk_ptr + b, mask=rmask, other=0), L)
    tau, need = _prefix(hist_ptr, tl.where(rmask, rows, 0), k, NROWS, 4)
    # tau is the k-th largest key, need = k - #(key > tau); k == 0 selects nothing (a threshold above
    # every key)
    tau = tl.where(k > 0, tau, 4294967296)
    need = tl.where(k > 0, need, 0)
    tl.store(tau_ptr + rows, tau, mask=rmask)
    tl.store(need_ptr + rows, need.to(tl.int32), mask=rmask)


@C.autotune(_SELECT_CONFIGS, key=["G", "NC"], prune=C.prune_sm90(_select_tiles))
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
        u = _key(tl.load(lut_ptr + rows[:, None].to(tl.int64) * NC + code[None, :], mask=m2, other=0.0))
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
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    ch = chunk or (256 if interp else 4096)
    nchunk = max(1, -(-cap // ch))
    # four radix passes over the 32-bit score keys, 8 bits (256 bins) each; pass p counts the digit p of
    # the tokens whose first p digits match the k-th largest key's (decided by passes < p)
    hist = torch.zeros(4, b * hq, 256, dtype=torch.int32, device=dev)
    for p in range(4):
        _radix_kernel[(b * hq, nchunk)](lut, code_cache, block_table, seq_lens, topk_t, hist, b * hq, hq, g, nc, bs,
                                        ch, code_cache.stride(0), code_cache.stride(1), code_cache.stride(2),
                                        block_table.stride(0), PASS=p)
    tau = torch.empty(b * hq, dtype=torch.int64, device=dev)
    need = torch.empty(b * hq, dtype=torch.int32, device=dev)
    block_r = min(64, C.next_pow2(b * hq)) if interp else 4
    _threshold_kernel[(triton.cdiv(b * hq, block_r),)](hist, seq_lens, topk_t, tau, need, b * hq, hq,
                                                       BLOCK_R=block_r, num_warps=4)
    eq = torch.empty(b * hq, nchunk, dtype=torch.int32, device=dev)
    cnt = torch.empty(b * hkv, nchunk, dtype=torch.int32, device=dev)
    idx = torch.empty(b, hkv, kmax, dtype=torch.int32, device=dev)
    count = torch.empty(b, hkv, dtype=torch.int32, device=dev)
    for mode in (0, 1, 2):
        _select_kernel[(b * hkv, nchunk)](
            lut, code_cache, block_table, seq_lens, tau, need, eq, cnt, idx, count,
            hkv, g, nc, bs, ch, nchunk, sink, local, kmax,
            code_cache.stride(0), code_cache.stride(1), code_cache.stride(2), block_table.stride(0),
            MODE=mode, BLOCK_H=C.next_pow2(g), BLOCK_CH=C.next_pow2(nchunk))
    block_k = min(1024, C.next_pow2(kmax))
    _pad_kernel[(b * hkv, triton.cdiv(kmax, block_k))](idx, count, kmax, BLOCK_K=block_k, num_warps=4)
    return idx, count
