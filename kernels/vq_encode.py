"""A²ATS key encoding: nearest centroid in the whitened metric ``||(k - c) L||^2``, as int16 codes.

With ``xw = k L`` and ``cw = C L`` (precomputed once per call by the launcher, with ``|cw|^2``), the
distance is ``|xw|^2 - 2 xw.cw + |cw|^2`` (the reference's formula and order). The work is parallel over
the codebook: a program takes a tile of tokens of one KV head and one split of the codebook (grid
``(token tiles, Hkv, splits)``, splits sized for two programs per SM, so a decode step of a few tokens
still fills the GPU), computes ``xw`` with IEEE fp32 ``[T, D] x [D, D]`` dots (in K-chunks), and the
distances to its codes with ``[T, D] x [D, BLOCK_C]`` TF32 dots on the tensor cores (a matmul under
the interpreter), keeping each token's two nearest (an argmin reduction, lower code on ties). A second
kernel merges the splits' pairs in code order and re-ranks the final two exactly (IEEE fp32 distances,
lower code on an exact tie, like ``argmin``); with one split the first kernel does that itself. The
code equals the reference's argmin whenever the TF32 error is smaller than the gap between the second
and third nearest centroid (always under the interpreter, where the dots are fp32). Two addressing modes:
dense ``k [B, Hkv, T, D] -> codes [B, Hkv, T]`` (:func:`triton_vq_encode`, contract of
:func:`kvcomp.ref.vq_encode`) and paged ``k_new [N, Hkv, D] -> code_cache [num_blocks, block_size, Hkv]``
(:func:`triton_vq_encode_paged`, contract of :func:`kvcomp.ref.compressed_write.vq_encode_paged`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvcomp.defaults import MAX_CODES

from . import _common as C


@triton.jit
def _rows(k_ptr, l_ptr, bt_ptr, sl_ptr, qsl_ptr, tb, h, N, T, B, D, BS, s_k0, s_k1, s_kh, s_o0, s_o1, s_btb,
          PAGED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
          BLOCK_B: tl.constexpr, OUT: tl.constexpr):
    """The tile's tokens: ``(tmask, out_off, xw [BLOCK_T, BLOCK_D] fp32)``, ``xw = k L`` by IEEE fp32 dots
    in K-chunks; ``out_off`` (each token's code slot) only when ``OUT``."""
    tok = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = tok < N
    out_off = tl.zeros([BLOCK_T], dtype=tl.int64)
    if PAGED:
        in_off = tok.to(tl.int64) * s_k0
        if OUT:
            # each token's sequence: count query_start_loc[1:] <= tok, BLOCK_B entries at a time (a fixed
            # tile: one compiled kernel for every batch size)
            b = tl.zeros([BLOCK_T], dtype=tl.int32)
            for b0 in range(0, B, BLOCK_B):
                offs_b = b0 + tl.arange(0, BLOCK_B)
                ends = tl.load(qsl_ptr + 1 + offs_b, mask=offs_b < B, other=2147483647)
                b += tl.sum((ends[None, :] <= tok[:, None]).to(tl.int32), 1)
            b = tl.where(tmask, b, 0)
            q0 = tl.load(qsl_ptr + b, mask=tmask, other=0)
            q1 = tl.load(qsl_ptr + b + 1, mask=tmask, other=0)
            L = tl.load(sl_ptr + b, mask=tmask, other=0)
            p = L - (q1 - q0) + (tok - q0)
            blk = tl.load(bt_ptr + b * s_btb + p // BS, mask=tmask, other=0).to(tl.int64)
            out_off = blk * s_o0 + (p % BS) * s_o1
    else:
        bb = (tok // T).to(tl.int64)
        tt = (tok % T).to(tl.int64)
        in_off = bb * s_k0 + tt * s_k1
        out_off = bb * s_o0 + tt * s_o1
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    offs_k = tl.arange(0, BLOCK_K)
    xw = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for k0 in tl.static_range(0, BLOCK_D, BLOCK_K):
        kk = k0 + offs_k
        x = tl.load(k_ptr + in_off[:, None] + h * s_kh + kk[None, :], mask=tmask[:, None] & (kk < D)[None, :],
                    other=0.0).to(tl.float32)
        lw = tl.load(l_ptr + h * D * D + kk[:, None] * D + offs_d[None, :], mask=(kk < D)[:, None] & dmask[None, :],
                     other=0.0)
        xw += tl.dot(x, lw, input_precision="ieee")
    return tmask, out_off, xw


@triton.jit
def _merge(b1, i1, b2, i2, t1, j1, t2, j2):
    """Best two of two ``(dist, index)`` pairs, each sorted; the ``t`` pair holds later codes, so it wins
    only when strictly nearer (lower code on ties)."""
    first = t1 < b1
    n1 = tl.where(first, t1, b1)
    k1 = tl.where(first, j1, i1)
    n2 = tl.where(first, tl.where(b1 <= t2, b1, t2), tl.where(b2 <= t1, b2, t1))
    k2 = tl.where(first, tl.where(b1 <= t2, i1, j2), tl.where(b2 <= t1, i2, j1))
    return n1, k1, n2, k2


@triton.jit
def _rerank(xw, cw_ptr, c2_ptr, h, NC, D, i1, i2, b2, tmask, BLOCK_D: tl.constexpr):
    """The exact (IEEE fp32) nearer of the two candidates, lower code on an exact tie."""
    i2 = tl.where(b2 < float("inf"), i2, i1)  # fewer than two codes: the first one twice
    offs_d = tl.arange(0, BLOCK_D)
    m2 = tmask[:, None] & (offs_d < D)[None, :]
    x2 = tl.sum(xw * xw, 1)
    c1 = tl.load(cw_ptr + (h * NC + i1[:, None]).to(tl.int64) * D + offs_d[None, :], mask=m2, other=0.0)
    c2 = tl.load(cw_ptr + (h * NC + i2[:, None]).to(tl.int64) * D + offs_d[None, :], mask=m2, other=0.0)
    d1 = (x2 - 2.0 * tl.sum(xw * c1, 1)) + tl.load(c2_ptr + h * NC + i1, mask=tmask, other=0.0)
    d2 = (x2 - 2.0 * tl.sum(xw * c2, 1)) + tl.load(c2_ptr + h * NC + i2, mask=tmask, other=0.0)
    return tl.where((d2 < d1) | ((d2 == d1) & (i2 < i1)), i2, i1)


def _tiles(c, nargs, meta):
    """The fp32 ``[BLOCK_T, D]`` whitened keys and ``[BLOCK_C, D]`` centroid tile in registers: at most
    6 KiB per warp (32 tokens x 64 codes at D = 128 with 8 warps); the centroid tile staged per stage."""
    bd = meta["BLOCK_D"]
    tile = (c.kwargs["BLOCK_T"] + c.kwargs["BLOCK_C"]) * bd * 4
    return tile * 8 // (3 * c.num_warps), c.kwargs["BLOCK_C"] * bd * 4, False  # 16 KiB of budget = 6 KiB x 8 / 3


# the first config is the interpreter's and fits every head dim (D = 256 with 8 warps)
# (64 tokens x 32 codes spills 500+ bytes at D = 128 with 8 warps on sm_90)
_CONFIGS = [triton.Config({"BLOCK_T": 16, "BLOCK_C": 32}, num_warps=8, num_stages=2),
            triton.Config({"BLOCK_T": 32, "BLOCK_C": 64}, num_warps=8, num_stages=2)]
# the launcher sizes the codebook splits (and their scratch) with these, never with the tuned tiles
SPLIT_T, SPLIT_C = 32, 64


# keyed by head dim, codebook size, addressing and whether the program writes the code (and dtypes): never
# by the token count or batch size
@C.autotune(_CONFIGS, key=["D", "NC", "PAGED", "FINAL"], prune=C.prune_sm90(_tiles))
@triton.jit(do_not_specialize=["N", "B"])
def _vq_encode_kernel(k_ptr, l_ptr, cw_ptr, c2_ptr, out_ptr, bt_ptr, sl_ptr, qsl_ptr, cand_ptr, cdist_ptr,
                      N, T, B, NC, D, BS, CSPLIT, s_k0, s_k1, s_kh, s_o0, s_o1, s_oh, s_btb,
                      PAGED: tl.constexpr, FINAL: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
                      BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr):
    tb = tl.program_id(0)
    # int64: h * s_kh (a dense [B, Hkv, T, D] input's head stride is T * D) passes 2^31 at 1M tokens x 16 heads
    h = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2)
    tmask, out_off, xw = _rows(k_ptr, l_ptr, bt_ptr, sl_ptr, qsl_ptr, tb, h, N, T, B, D, BS, s_k0, s_k1, s_kh,
                               s_o0, s_o1, s_btb, PAGED, BLOCK_T, BLOCK_D, BLOCK_K, BLOCK_B, FINAL)
    x2 = tl.sum(xw * xw, 1)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    b1 = tl.full([BLOCK_T], float("inf"), dtype=tl.float32)
    b2 = b1
    i1 = tl.zeros([BLOCK_T], dtype=tl.int32)
    i2 = i1
    offs_c = tl.arange(0, BLOCK_C)
    c_end = tl.minimum(split * CSPLIT + CSPLIT, NC)
    for c0 in range(split * CSPLIT, c_end, BLOCK_C):
        cc = c0 + offs_c
        cm = cc < c_end
        cw = tl.load(cw_ptr + (h * NC + cc[:, None]).to(tl.int64) * D + offs_d[None, :],
                     mask=cm[:, None] & dmask[None, :], other=0.0)
        c2 = tl.load(c2_ptr + h * NC + cc, mask=cm, other=0.0)
        # candidate distances on the tensor cores (TF32; a matmul under the interpreter)
        dist = (x2[:, None] - 2.0 * tl.dot(xw, tl.trans(cw), input_precision="tf32")) + c2[None, :]
        dist = tl.where(cm[None, :], dist, float("inf"))
        j1 = tl.argmin(dist, 1).to(tl.int32)
        t1 = tl.min(dist, 1)
        rest = tl.where(offs_c[None, :] == j1[:, None], float("inf"), dist)
        j2 = tl.argmin(rest, 1).to(tl.int32)
        t2 = tl.min(rest, 1)
        b1, i1, b2, i2 = _merge(b1, i1, b2, i2, t1, j1 + c0, t2, j2 + c0)
    if FINAL:
        code = _rerank(xw, cw_ptr, c2_ptr, h, NC, D, i1, i2, b2, tmask, BLOCK_D)
        tl.store(out_ptr + out_off + h * s_oh, code.to(tl.int16), mask=tmask)
    else:
        tok = tb * BLOCK_T + tl.arange(0, BLOCK_T)
        slot = ((split * tl.num_programs(1) + h) * N + tok) * 2
        tl.store(cand_ptr + slot, i1, mask=tmask)
        tl.store(cand_ptr + slot + 1, i2, mask=tmask)
        tl.store(cdist_ptr + slot, b1, mask=tmask)
        tl.store(cdist_ptr + slot + 1, b2, mask=tmask)


@triton.jit(do_not_specialize=["N", "B"])
def _vq_rerank_kernel(k_ptr, l_ptr, cw_ptr, c2_ptr, out_ptr, bt_ptr, sl_ptr, qsl_ptr, cand_ptr, cdist_ptr,
                      N, T, B, NC, D, BS, NSPLIT, s_k0, s_k1, s_kh, s_o0, s_o1, s_oh, s_btb,
                      PAGED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_B: tl.constexpr):
    """Merges the splits' best two (in code order) and writes the exact nearer of the overall two."""
    tb = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    tmask, out_off, xw = _rows(k_ptr, l_ptr, bt_ptr, sl_ptr, qsl_ptr, tb, h, N, T, B, D, BS, s_k0, s_k1, s_kh,
                               s_o0, s_o1, s_btb, PAGED, BLOCK_T, BLOCK_D, BLOCK_K, BLOCK_B, True)
    tok = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    b1 = tl.full([BLOCK_T], float("inf"), dtype=tl.float32)
    b2 = b1
    i1 = tl.zeros([BLOCK_T], dtype=tl.int32)
    i2 = i1
    for s in range(0, NSPLIT):
        slot = ((s * tl.num_programs(1) + h) * N + tok) * 2
        t1 = tl.load(cdist_ptr + slot, mask=tmask, other=float("inf"))
        t2 = tl.load(cdist_ptr + slot + 1, mask=tmask, other=float("inf"))
        j1 = tl.load(cand_ptr + slot, mask=tmask, other=0)
        j2 = tl.load(cand_ptr + slot + 1, mask=tmask, other=0)
        j2 = tl.where(t2 < float("inf"), j2, j1)
        b1, i1, b2, i2 = _merge(b1, i1, b2, i2, t1, j1, t2, j2)
    code = _rerank(xw, cw_ptr, c2_ptr, h, NC, D, i1, i2, b2, tmask, BLOCK_D)
    tl.store(out_ptr + out_off + h * s_oh, code.to(tl.int16), mask=tmask)


def _prepare(codebook: torch.Tensor, whiten: torch.Tensor, hkv: int, d: int):
    for name, t in (("codebook", codebook), ("whiten", whiten)):
        if not isinstance(t, torch.Tensor) or t.dtype not in C.SUPPORTED_DTYPES:
            raise ValueError(f"{name} must be a float32/float16/bfloat16 tensor")
    if codebook.dim() != 3 or codebook.shape[0] != hkv or codebook.shape[2] != d or codebook.shape[1] < 1:
        raise ValueError(f"codebook must be [Hkv={hkv}, C>=1, D={d}], got {list(codebook.shape)}")
    if codebook.shape[1] > MAX_CODES:
        raise ValueError(f"codebook has {codebook.shape[1]} entries, more than int16 codes allow (32768)")
    C.check_shape("whiten", whiten, (hkv, d, d))
    lw = whiten.float().contiguous()
    cw = torch.matmul(codebook.float(), lw).contiguous()
    return lw, cw, (cw * cw).sum(-1).contiguous()


def _blocks(d: int):
    """(BLOCK_K, re-rank BLOCK_T): the K-chunk of ``k L`` (one chunk under the interpreter, whose cost is
    per operation) and the re-rank kernel's token tile (register-sized on the GPU: no spills on sm_90,
    checked by tests/kernels/test_sm90_compile.py); the candidate kernel's tiles are autotuned."""
    bd = C.next_pow2(d)
    if C.interpreting():
        return bd, 16
    return (16, 16) if bd >= 256 else (min(bd, 32), 32)


def _encode(k, lw, cw, c2, out, bt, sl, qsl, n, t, bsz, bs, strides, paged: bool) -> None:
    """Launches the candidate kernel over (token tiles, KV heads, codebook splits) and, with more than
    one split, the merge / re-rank kernel. Splits: enough programs for two per SM (a decode step has a
    handful of token tiles), at least ``BLOCK_C`` codes each."""
    hkv, nc, d = cw.shape
    bk, rerank_t = _blocks(d)
    want = max(1, triton.cdiv(2 * C.num_sms(k.device), triton.cdiv(n, SPLIT_T) * hkv))
    csplit = triton.cdiv(triton.cdiv(nc, min(want, triton.cdiv(nc, SPLIT_C))), SPLIT_C) * SPLIT_C
    nsplit = triton.cdiv(nc, csplit)
    cand = torch.empty(nsplit if nsplit > 1 else 0, hkv, n, 2, dtype=torch.int32, device=k.device)
    cdist = torch.empty(cand.shape, dtype=torch.float32, device=k.device)
    common = dict(PAGED=paged, BLOCK_D=C.next_pow2(d), BLOCK_K=bk, BLOCK_B=32 if paged else 1)
    _vq_encode_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_T"]), hkv, nsplit)](
        k, lw, cw, c2, out, bt, sl, qsl, cand, cdist, n, t, bsz, nc, d, bs, csplit, *strides, FINAL=nsplit == 1,
        **common)
    if nsplit > 1:
        _vq_rerank_kernel[(triton.cdiv(n, rerank_t), hkv)](k, lw, cw, c2, out, bt, sl, qsl, cand, cdist, n, t, bsz,
                                                            nc, d, bs, nsplit, *strides, BLOCK_T=rerank_t,
                                                            num_warps=4 if C.interpreting() else 8, **common)


def triton_vq_encode(k_pre: torch.Tensor, codebook: torch.Tensor, whiten: torch.Tensor) -> torch.Tensor:
    """Codes of dense keys (same contract as :func:`kvcomp.ref.vq_encode`).

    Args:
        k_pre: ``[B, Hkv, T, D]`` pre-RoPE keys (last dim contiguous).
        codebook: ``[Hkv, C, D]``; whiten: ``[Hkv, D, D]``.
    Returns:
        ``[B, Hkv, T]`` int16.
    """
    C.check_float("k_pre", k_pre)
    if k_pre.dim() != 4:
        raise ValueError(f"k_pre must be [B, Hkv, T, D], got {list(k_pre.shape)}")
    b, hkv, t, d = k_pre.shape
    C.check_head_dim("k_pre", d)
    C.check_device(k_pre=k_pre, codebook=codebook, whiten=whiten)
    lw, cw, c2 = _prepare(codebook, whiten, hkv, d)
    out = torch.empty(b, hkv, t, dtype=torch.int16, device=k_pre.device)
    n = b * t
    if n == 0:
        return out
    _encode(k_pre, lw, cw, c2, out, out, out, out, n, t, b, 1, (k_pre.stride(0), k_pre.stride(2), k_pre.stride(1),
                                                                 out.stride(0), out.stride(2), out.stride(1), 0),
            paged=False)
    return out


def triton_vq_encode_paged(k_new: torch.Tensor, codebook: torch.Tensor, whiten: torch.Tensor,
                           code_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                           query_start_loc: torch.Tensor) -> torch.Tensor:
    """Encode new keys into a paged code cache, in place (contract of
    :func:`kvcomp.ref.compressed_write.vq_encode_paged`).

    Args:
        k_new: ``[N, Hkv, D]`` pre-RoPE keys (last dim contiguous).
        codebook: ``[Hkv, C, D]``; whiten: ``[Hkv, D, D]``.
        code_cache: ``[num_blocks, block_size, Hkv]`` int16, any strides.
        block_table: ``[B, max_blocks]``; seq_lens: ``[B]`` incl. the new tokens; query_start_loc: ``[B+1]``.
    Returns:
        ``code_cache``.
    """
    C.check_float("k_new", k_new)
    if k_new.dim() != 3:
        raise ValueError(f"k_new must be [N, Hkv, D], got {list(k_new.shape)}")
    if not isinstance(code_cache, torch.Tensor) or code_cache.dtype != torch.int16 or code_cache.dim() != 3:
        raise ValueError("code_cache must be an int16 tensor [num_blocks, block_size, Hkv]")
    C.check_int("block_table", block_table, 2)
    C.check_int("seq_lens", seq_lens, 1)
    C.check_int("query_start_loc", query_start_loc, 1)
    # the kernel reads block-table columns and the 1-D metadata at stride 1
    block_table, seq_lens, query_start_loc = block_table.contiguous(), seq_lens.contiguous(), query_start_loc.contiguous()
    n, hkv, d = k_new.shape
    C.check_head_dim("k_new", d)
    C.check_shape("code_cache", code_cache, (None, None, hkv))
    bsz = block_table.shape[0]
    C.check_shape("seq_lens", seq_lens, (bsz,))
    C.check_shape("query_start_loc", query_start_loc, (bsz + 1,))
    C.check_device(k_new=k_new, codebook=codebook, whiten=whiten, code_cache=code_cache, block_table=block_table,
                   seq_lens=seq_lens, query_start_loc=query_start_loc)
    lw, cw, c2 = _prepare(codebook, whiten, hkv, d)
    if n == 0:
        return code_cache
    _encode(k_new, lw, cw, c2, code_cache, block_table, seq_lens, query_start_loc, n, 1, bsz, code_cache.shape[1],
            (k_new.stride(0), 0, k_new.stride(1), code_cache.stride(0), code_cache.stride(1), code_cache.stride(2),
             block_table.stride(0)), paged=True)
    return code_cache
