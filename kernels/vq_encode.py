"""A²ATS key encoding: nearest centroid in the whitened metric ``||(k - c) L||^2``, as int16 codes.

With ``xw = k L`` and ``cw = C L`` (precomputed once per call by the launcher, with ``|cw|^2``), the
distance is ``|xw|^2 - 2 xw.cw + |cw|^2`` (the reference's formula and order); one program takes a
tile of tokens of one KV head, computes ``xw`` with ``[T, D] x [D, D]`` dots (in K-chunks) and scans the codebook
in chunks, keeping the first minimum (lower code on ties, like ``argmin``). Two addressing modes:
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


@triton.jit(do_not_specialize=["N", "B"])
def _vq_encode_kernel(k_ptr, l_ptr, cw_ptr, c2_ptr, out_ptr, bt_ptr, sl_ptr, qsl_ptr,
                      N, T, B, NC, D, BS, s_k0, s_k1, s_kh, s_o0, s_o1, s_oh, s_btb,
                      PAGED: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_B: tl.constexpr):
    tb = tl.program_id(0)
    # int64: h * s_kh (a dense [B, Hkv, T, D] input's head stride is T * D) passes 2^31 at 1M tokens x 16 heads
    h = tl.program_id(1).to(tl.int64)
    tok = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = tok < N
    if PAGED:
        # each token's sequence: count query_start_loc[1:] <= tok, BLOCK_B entries at a time (a fixed tile:
        # one compiled kernel for every batch size)
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
        in_off = tok.to(tl.int64) * s_k0
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
    x2 = tl.sum(xw * xw, 1)
    best = tl.full([BLOCK_T], float("inf"), dtype=tl.float32)
    best_i = tl.zeros([BLOCK_T], dtype=tl.int32)
    offs_c = tl.arange(0, BLOCK_C)
    for c0 in range(0, NC, BLOCK_C):
        cc = c0 + offs_c
        cm = cc < NC
        cw = tl.load(cw_ptr + (h * NC + cc[:, None]).to(tl.int64) * D + offs_d[None, :],
                     mask=cm[:, None] & dmask[None, :], other=0.0)
        c2 = tl.load(c2_ptr + h * NC + cc, mask=cm, other=0.0)
        dist = (x2[:, None] - 2.0 * tl.dot(xw, tl.trans(cw), input_precision="ieee")) + c2[None, :]
        dist = tl.where(cm[None, :], dist, float("inf"))
        dmin = tl.min(dist, 1)
        imin = tl.argmin(dist, 1).to(tl.int32) + c0
        upd = dmin < best
        best_i = tl.where(upd, imin, best_i)
        best = tl.where(upd, dmin, best)
    tl.store(out_ptr + out_off + h * s_oh, best_i.to(tl.int16), mask=tmask)


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


def _blocks(nc: int, d: int):
    """(BLOCK_T, BLOCK_C, BLOCK_K, num_warps): big tiles for the interpreter (cost per operation),
    register-sized ones on the GPU (no spills at D=128 on sm_90)."""
    bd = C.next_pow2(d)
    if C.interpreting():
        return 16, min(max(16, C.next_pow2(nc)), 256), bd, 4
    if bd >= 256:  # D=256: 32-token tiles spill (~1.8 KB of stack per thread on sm_90)
        return 16, 16, 16, 8
    return 32, min(max(16, C.next_pow2(nc)), 32), min(bd, 32), 8


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
    bt_, bc, bk, nw = _blocks(cw.shape[1], d)
    _vq_encode_kernel[(triton.cdiv(n, bt_), hkv)](
        k_pre, lw, cw, c2, out, out, out, out, n, t, b, cw.shape[1], d, 1,
        k_pre.stride(0), k_pre.stride(2), k_pre.stride(1), out.stride(0), out.stride(2), out.stride(1), 0,
        PAGED=False, BLOCK_T=bt_, BLOCK_C=bc, BLOCK_D=C.next_pow2(d), BLOCK_K=bk, BLOCK_B=1, num_warps=nw)
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
    bt_, bc, bk, nw = _blocks(cw.shape[1], d)
    _vq_encode_kernel[(triton.cdiv(n, bt_), hkv)](
        k_new, lw, cw, c2, code_cache, block_table, seq_lens, query_start_loc, n, 1, bsz, cw.shape[1], d,
        code_cache.shape[1], k_new.stride(0), 0, k_new.stride(1), code_cache.stride(0), code_cache.stride(1), code_cache.stride(2),
        block_table.stride(0),
        PAGED=True, BLOCK_T=bt_, BLOCK_C=bc, BLOCK_D=C.next_pow2(d), BLOCK_K=bk, BLOCK_B=32,
        num_warps=nw)
    return code_cache
