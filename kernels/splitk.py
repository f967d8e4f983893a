"""Split-K (flash-decoding) pieces shared by the ThinK and VQ sparse decode kernels.

A decode kernel splits each (sequence, KV head)'s key range into ``S`` parts; part ``s`` writes, for
each of the group's query heads, its running max ``m`` (log2 domain: logits are pre-multiplied by
``scale * log2(e)``), its sum ``l = sum 2^(x - m)`` and the unnormalised ``acc = sum 2^(x - m) v``
to fp32 scratch ``m, l [B, Hq, S]`` and ``acc [B, Hq, S, Dv]``. A part that saw no key writes
``m = -inf, l = 0, acc = 0``. :func:`splitk_combine` merges the parts into ``o [B, Hq, Dv]``; a head
whose parts are all empty gets zeros (the references' convention for a row with no visible key).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import autotune, next_pow2

LOG2E = 1.4426950408889634


@triton.jit
def online_update(m_i, l_i, acc, s, v, F32: tl.constexpr):
    """One flash-attention step: ``s [BH, BN]`` log2-domain logits (``-inf`` = hidden), ``v [BN, BDV]``.

    Returns the updated ``(m_i [BH], l_i [BH], acc [BH, BDV])``; safe for all-hidden tiles.
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if F32:
        pv = tl.dot(p, v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc


@triton.jit
def store_partial(m_ptr, l_ptr, acc_ptr, row0, S, split, m_i, l_i, acc, offs_h, hmask, offs_dv, DV):
    """Write one part's ``(m, l, acc)`` for query heads ``row0 + offs_h`` (rows of ``[B*Hq]``)."""
    rows = row0 + offs_h
    tl.store(m_ptr + rows * S + split, m_i, mask=hmask)
    tl.store(l_ptr + rows * S + split, l_i, mask=hmask)
    ptrs = acc_ptr + (rows[:, None] * S + split) * DV + offs_dv[None, :]
    tl.store(ptrs, acc, mask=hmask[:, None] & (offs_dv[None, :] < DV))


# the first config is the interpreter's
_COMBINE_CONFIGS = [triton.Config({}, num_warps=4), triton.Config({}, num_warps=2), triton.Config({}, num_warps=8)]


# keyed by the value width (and dtypes): never by batch size or part count
@autotune(_COMBINE_CONFIGS, key=["DV"])
@triton.jit(do_not_specialize=["S"])
def _combine_kernel(m_ptr, l_ptr, acc_ptr, o_ptr, S, DV, HQ, stride_ob, stride_oh,
                    CHUNK_S: tl.constexpr, BLOCK_DV: tl.constexpr):
    # the parts in fixed chunks of CHUNK_S: one compiled kernel for every part count (batch size)
    row = tl.program_id(0).to(tl.int64)  # b * HQ + hq
    b = row // HQ
    h = row % HQ
    offs_c = tl.arange(0, CHUNK_S)
    m_c = tl.full([CHUNK_S], float("-inf"), tl.float32)
    for s0 in range(0, S, CHUNK_S):
        m_c = tl.maximum(m_c, tl.load(m_ptr + row * S + s0 + offs_c, mask=s0 + offs_c < S, other=float("-inf")))
    m_max = tl.max(m_c, 0)
    m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
    offs_d = tl.arange(0, BLOCK_DV)
    dmask = offs_d < DV
    num = tl.zeros([BLOCK_DV], dtype=tl.float32)
    den = tl.zeros([CHUNK_S], dtype=tl.float32)
    for s0 in range(0, S, CHUNK_S):
        ss = s0 + offs_c
        smask = ss < S
        m = tl.load(m_ptr + row * S + ss, mask=smask, other=float("-inf"))
        w = tl.where(m == float("-inf"), 0.0, tl.exp2(m - m_safe))
        l = tl.load(l_ptr + row * S + ss, mask=smask, other=0.0)
        a = tl.load(acc_ptr + (row * S + ss[:, None]) * DV + offs_d[None, :],
                    mask=smask[:, None] & dmask[None, :], other=0.0)
        num += tl.sum(a * w[:, None], 0)
        den += l * w
    tot = tl.sum(den, 0)
    o = tl.where(tot > 0, num / tl.where(tot > 0, tot, 1.0), 0.0)
    tl.store(o_ptr + b * stride_ob + h * stride_oh + offs_d, o.to(o_ptr.dtype.element_ty), mask=dmask)


def alloc_partials(b: int, hq: int, s: int, dv: int, device: torch.device):
    """fp32 scratch ``(m [B,Hq,S], l [B,Hq,S], acc [B,Hq,S,Dv])``; every entry is written by the parts."""
    m = torch.empty(b, hq, s, dtype=torch.float32, device=device)
    l = torch.empty(b, hq, s, dtype=torch.float32, device=device)
    acc = torch.empty(b, hq, s, dv, dtype=torch.float32, device=device)
    return m, l, acc


def splitk_combine(m: torch.Tensor, l: torch.Tensor, acc: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Merge split-K parts (see module doc) into ``out [B, Hq, Dv]`` (any float dtype, last dim contiguous)."""
    b, hq, s = m.shape
    dv = acc.shape[-1]
    _combine_kernel[(b * hq,)](m, l, acc, out, s, dv, hq, out.stride(0), out.stride(1),
                               CHUNK_S=min(16, max(1, 2048 // next_pow2(dv))), BLOCK_DV=next_pow2(dv))
    return out


def pick_splits(work_rows: int, max_tokens: int, device: torch.device, block_n: int,
                min_tokens_per_split: int = 256) -> tuple[int, int]:
    """Choose ``(num_splits, tokens_per_split)`` so that ``work_rows * num_splits`` programs fill the GPU.

    ``max_tokens`` is a bound known without a device sync (e.g. block-table capacity); parts past a
    sequence's real length exit at once. ``tokens_per_split`` is a multiple of ``block_n``.
    """
    from ._common import num_sms

    max_tokens = max(1, int(max_tokens))
    want = max(1, -(-2 * num_sms(device) // max(1, work_rows)))
    cap = max(1, -(-max_tokens // max(min_tokens_per_split, block_n)))
    s = max(1, min(want, cap))
    per = -(-max_tokens // s)
    per = -(-per // block_n) * block_n
    return -(-max_tokens // per), per
