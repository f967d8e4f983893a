"""A²ATS look-up table: ``lut[b, h, c] = scale * q~[b, h] . codebook[h // G, c]`` (fp32).

One program per (sequence, KV head, block of codes) computes the whole query group at once with a
``[G (padded to 16), D] x [D, BLOCK_C]`` dot. Reference: :func:`kvcomp.ref.vq_lut`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C


@triton.jit
def _vq_lut_kernel(q_ptr, cb_ptr, lut_ptr, scale, HKV, G, NC, D, s_qb, s_qh, s_cbh, s_cbc,
                   BLOCK_H: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, F32: tl.constexpr):
    pid = tl.program_id(0)
    cblk = tl.program_id(1)
    b = pid // HKV
    h = pid % HKV
    offs_h = tl.arange(0, BLOCK_H)
    hmask = offs_h < G
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    offs_c = cblk * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < NC
    q = tl.load(q_ptr + b * s_qb + (h * G + offs_h)[:, None] * s_qh + offs_d[None, :],
                mask=hmask[:, None] & dmask[None, :], other=0.0)
    cb = tl.load(cb_ptr + h * s_cbh + offs_c[:, None].to(tl.int64) * s_cbc + offs_d[None, :],
                 mask=cmask[:, None] & dmask[None, :], other=0.0)
    if F32:
        s = tl.dot(q.to(tl.float32), tl.trans(cb.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(cb.to(q.dtype)))
    rows = b * HKV * G + h * G + offs_h
    tl.store(lut_ptr + rows[:, None].to(tl.int64) * NC + offs_c[None, :], s * scale,
             mask=hmask[:, None] & cmask[None, :])


def triton_vq_lut(q_wrope: torch.Tensor, codebook: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """Score of every centroid for every query head (same contract as :func:`kvcomp.ref.vq_lut`).

    Args:
        q_wrope: ``[B, Hq, D]`` windowed-RoPE decode queries (fp32/fp16/bf16, last dim contiguous).
        codebook: ``[Hkv, C, D]`` float (any of the three dtypes), last dim contiguous.
        scale: default ``1/sqrt(D)``.
    Returns:
        ``[B, Hq, C]`` fp32.
    """
    C.check_float("q_wrope", q_wrope)
    C.check_float("codebook", codebook)
    if q_wrope.dim() != 3 or codebook.dim() != 3:
        raise ValueError(f"q_wrope must be [B, Hq, D] and codebook [Hkv, C, D], got {list(q_wrope.shape)} "
                         f"and {list(codebook.shape)}")
    b, hq, d = q_wrope.shape
    hkv, nc, _ = codebook.shape
    C.check_head_dim("q_wrope", d)
    C.check_shape("codebook", codebook, (None, None, d))
    if hkv < 1 or hq % hkv:
        raise ValueError(f"q_wrope: {hq} query heads is not a multiple of {hkv} KV heads (codebook.shape[0])")
    if nc < 1:
        raise ValueError("codebook must hold at least one centroid")
    C.check_device(q_wrope=q_wrope, codebook=codebook)
    g = hq // hkv
    sc = 1.0 / d ** 0.5 if scale is None else float(scale)
    lut = torch.empty(b, hq, nc, dtype=torch.float32, device=q_wrope.device)
    f32 = C.dot_f32(q_wrope.device, q_wrope.dtype) or codebook.dtype == torch.float32
    interp = C.interpreting()
    block_c = max(16, min(C.next_pow2(nc), 64))  # sm_90, D=128: 64 codes x 8 warps, no spills
    _vq_lut_kernel[(b * hkv, triton.cdiv(nc, block_c))](
        q_wrope, codebook, lut, sc, hkv, g, nc, d, q_wrope.stride(0), q_wrope.stride(1),
        codebook.stride(0), codebook.stride(1),
        BLOCK_H=max(16, C.next_pow2(g)), BLOCK_C=block_c, BLOCK_D=C.next_pow2(d), F32=f32,
        num_warps=4 if interp else 8)
    return lut
