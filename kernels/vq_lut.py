"""A²ATS look-up table: ``lut[b, h, c] = scale * q~[b, h] . codebook[h // G, c]`` (fp32).

Built once per decode step for the whole batch: one program per (KV head, tile of ``BLOCK_C`` codes)
loads its codebook tile once and loops over every query row of that KV head, ``B * G`` rows (batch ×
GQA group) in tiles of ``BLOCK_R``, each a ``[BLOCK_R, D] x [D, BLOCK_C]`` dot. The codebook is read
once per step, not once per sequence, and the compiled kernel does not depend on the batch size (the
row count is a runtime loop bound). Reference: :func:`kvcomp.ref.vq_lut`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _common as C


def _tiles(c, nargs, meta):
    """The ``[BLOCK_C, D]`` codebook tile stays in registers for the whole row loop (in fp32, or the query
    dtype): at most 8 KiB of it per warp (64 codes at D = 256 with 8 warps); shared memory: the codebook
    and a query tile."""
    size = 4 if meta["F32"] else nargs["q_ptr"].element_size()
    tile = c.kwargs["BLOCK_C"] * meta["BLOCK_D"] * size
    return tile * 2 // c.num_warps, tile + meta["BLOCK_R"] * meta["BLOCK_D"] * size, False


# the first config is the interpreter's
_CONFIGS = [triton.Config({"BLOCK_C": 64}, num_warps=4, num_stages=2),
            triton.Config({"BLOCK_C": 32}, num_warps=4, num_stages=2),
            triton.Config({"BLOCK_C": 64}, num_warps=8, num_stages=2),
            triton.Config({"BLOCK_C": 128}, num_warps=8, num_stages=2)]


# keyed by head dim and codebook size (and dtypes): never by batch size (the rows are a runtime loop bound)
@C.autotune(_CONFIGS, key=["D", "NC"], prune=C.prune_sm90(_tiles))
@triton.jit(do_not_specialize=["NR"])
def _vq_lut_kernel(q_ptr, cb_ptr, lut_ptr, scale, NR, HQ, G, NC, D, s_qb, s_qh, s_cbh, s_cbc,
                   BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, F32: tl.constexpr):
    h = tl.program_id(0)
    cblk = tl.program_id(1)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    offs_c = cblk * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < NC
    cb = tl.load(cb_ptr + h * s_cbh + offs_c[:, None].to(tl.int64) * s_cbc + offs_d[None, :],
                 mask=cmask[:, None] & dmask[None, :], other=0.0)
    if F32:
        cbt = tl.trans(cb.to(tl.float32))
    else:
        cbt = tl.trans(cb.to(q_ptr.dtype.element_ty))
    for r0 in range(0, NR, BLOCK_R):  # query rows of KV head h: r = b * G + g
        r = r0 + tl.arange(0, BLOCK_R)
        rmask = r < NR
        b = (r // G).to(tl.int64)
        hq = h * G + r % G
        q = tl.load(q_ptr + b[:, None] * s_qb + hq[:, None] * s_qh + offs_d[None, :],
                    mask=rmask[:, None] & dmask[None, :], other=0.0)
        if F32:
            s = tl.dot(q.to(tl.float32), cbt, input_precision="ieee")
        else:
            s = tl.dot(q, cbt)
        tl.store(lut_ptr + (b * HQ + hq)[:, None] * NC + offs_c[None, :], s * scale,
                 mask=rmask[:, None] & cmask[None, :])


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
    if b == 0:
        return lut
    f32 = C.dot_f32(q_wrope.device, q_wrope.dtype) or codebook.dtype == torch.float32
    interp = C.interpreting()
    # GPU: 16-row tiles (the smallest dot), one compiled kernel for every batch size; the interpreter
    # (cost per operation) takes all rows at once
    block_r = max(16, min(64, C.next_pow2(b * g))) if interp else 16
    _vq_lut_kernel[lambda meta: (hkv, triton.cdiv(nc, meta["BLOCK_C"]))](
        q_wrope, codebook, lut, sc, b * g, hq, g, nc, d, q_wrope.stride(0), q_wrope.stride(1),
        codebook.stride(0), codebook.stride(1),
        BLOCK_R=block_r, BLOCK_D=C.next_pow2(d), F32=f32)
    return lut
