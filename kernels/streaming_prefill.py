"""Sink + window (streaming-head) prefill / chunked prefill attention, block-sparse — Triton.

Grid ``(B * Hq * cdiv(Tq, BLOCK_M),)`` on axis 0 (:func:`prefill_grid`; ``B * Hq`` may exceed the 65535
programs of axes 1/2): one program per query tile and query head (GQA: query head ``h`` reads KV head
``h // G``). Online softmax in fp32 over the KV tiles that can hold a visible key:

- default positions (``k_pos`` not given, keys at ``0..Tk-1``): two loops with bounds computed from the
  tile's query positions — the sink tiles ``[0, sink)`` and the window tiles
  ``[qmin - window + 1, qmax]`` — so a tile of queries touches ``O(sink + window + BLOCK_M)`` keys;
- explicit ``k_pos`` (compact storage, e.g. ring slots + a new chunk): every KV tile's position range
  is tested and tiles that are neither sink nor inside the window of any query in the tile are skipped.

Inside a visited tile the exact mask ``k <= q and (k < sink or q - k < window)`` is applied.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvcomp.kernels._common import autotune, check_device, check_float, check_head_dim, dot, dot_f32, prune_sm90

_LOG2E = 1.4426950408889634
_BIG = 1 << 30


def _tiles(c, nargs, meta):
    """Registers: the ``[BLOCK_N, D]`` key tile, or the ``[BLOCK_M, D]`` query tile (with its fp32
    accumulator) per 4 warps in 16-bit (8 warps hold twice the query rows; the fp32 budget already grows
    with the warps); shared memory: keys, values and the query tile per pipeline stage."""
    size = nargs["q_ptr"].element_size()
    d, bm, bn = meta["D"], c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
    q_rows = bm if meta["F32"] else bm * 4 // c.num_warps
    return max(bn, q_rows) * d * size, (2 * bn + bm) * d * size, meta["F32"]


# the first config is the interpreter's; (16, 16, 8 warps) fits every dtype and head dim
_CONFIGS = [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=2),
            triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=8, num_stages=2),
            triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=2),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2)]
MIN_BLOCK_M = min(c.kwargs["BLOCK_M"] for c in _CONFIGS)


@triton.jit
def _tile(q, qp, m_i, l_i, acc, k_ptr, v_ptr, kpos_ptr, n0, Tk, sink, window, qk_scale, sk_t, sv_t,
          HAS_KPOS: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, F32: tl.constexpr):
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D)
    kvalid = offs_n < Tk
    if HAS_KPOS:
        kp = tl.load(kpos_ptr + offs_n, mask=kvalid, other=0)
    else:
        kp = offs_n
    k = tl.load(k_ptr + offs_n[None, :].to(tl.int64) * sk_t + offs_d[:, None], mask=kvalid[None, :], other=0.0)
    v = tl.load(v_ptr + offs_n[:, None].to(tl.int64) * sv_t + offs_d[None, :], mask=kvalid[:, None], other=0.0)
    if F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = dot(q, k, F32) * qk_scale
    vis = (kp[None, :] <= qp[:, None]) & ((kp[None, :] < sink) | (qp[:, None] - kp[None, :] < window))
    s = tl.where(vis & kvalid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, F32)
    return m_new, l_i, acc


# keyed by head dim, GQA group and the position mode (and dtypes): never by batch size or token counts
@autotune(_CONFIGS, key=["D", "G", "HAS_QPOS", "HAS_KPOS"], prune=prune_sm90(_tiles))
@triton.jit
def _streaming_prefill_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, qpos_ptr, kpos_ptr,
    qk_scale, sink, window, Tq, Tk, HQ, G,
    sq_b, sq_h, sq_t, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, so_b, so_h, so_t, sqp_b, skp_b,
    HAS_QPOS: tl.constexpr, HAS_KPOS: tl.constexpr,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, F32: tl.constexpr,
):
    # one flat grid axis (axis 0 allows 2^31 - 1 programs; axes 1/2 only 65535): the query tiles of one
    # (sequence, query head) are adjacent, so they run together and share the KV head's tiles in L2
    pid = tl.program_id(0)
    n_m = tl.cdiv(Tq, BLOCK_M)
    pid_m = pid % n_m
    pid_bh = pid // n_m
    b = (pid_bh // HQ).to(tl.int64)
    h = (pid_bh % HQ).to(tl.int64)
    kvh = (h // G).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D)
    qvalid = offs_m < Tq
    if HAS_QPOS:
        qp = tl.load(qpos_ptr + b * sqp_b + offs_m, mask=qvalid, other=-1)
    else:
        qp = tl.where(qvalid, Tk - Tq + offs_m, -1)
    qmax = tl.max(qp, 0)
    qmin = tl.min(tl.where(qvalid, qp, 1 << 30), 0)
    q = tl.load(q_ptr + b * sq_b + h * sq_h + offs_m[:, None].to(tl.int64) * sq_t + offs_d[None, :],
                mask=qvalid[:, None], other=0.0)
    if F32:
        q = q.to(tl.float32)
    k_base = k_ptr + b * sk_b + kvh * sk_h
    v_base = v_ptr + b * sv_b + kvh * sv_h
    kp_base = kpos_ptr + b * skp_b
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D], tl.float32)
    if HAS_KPOS:
        for n0 in range(0, Tk, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            kvalid = offs_n < Tk
            kp = tl.load(kp_base + offs_n, mask=kvalid, other=0)
            kmin = tl.min(tl.where(kvalid, kp, 1 << 30), 0)
            kmax = tl.max(tl.where(kvalid, kp, -(1 << 30)), 0)
            if (kmin <= qmax) & ((kmin < sink) | (kmax > qmin - window)):
                m_i, l_i, acc = _tile(q, qp, m_i, l_i, acc, k_base, v_base, kp_base, n0, Tk, sink, window,
                                      qk_scale, sk_t, sv_t, HAS_KPOS, D, BLOCK_N, F32)
    else:
        sink_end = tl.minimum(tl.minimum(sink, Tk), qmax + 1)
        for n0 in range(0, sink_end, BLOCK_N):
            m_i, l_i, acc = _tile(q, qp, m_i, l_i, acc, k_base, v_base, kp_base, n0, Tk, sink, window,
                                  qk_scale, sk_t, sv_t, HAS_KPOS, D, BLOCK_N, F32)
        lo = tl.maximum(qmin - window + 1, 0) // BLOCK_N * BLOCK_N
        lo = tl.maximum(lo, tl.cdiv(sink_end, BLOCK_N) * BLOCK_N)
        hi = tl.minimum(Tk, qmax + 1)
        for n0 in range(lo, hi, BLOCK_N):
            m_i, l_i, acc = _tile(q, qp, m_i, l_i, acc, k_base, v_base, kp_base, n0, Tk, sink, window,
                                  qk_scale, sk_t, sv_t, HAS_KPOS, D, BLOCK_N, F32)
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(o_ptr + b * so_b + h * so_h + offs_m[:, None].to(tl.int64) * so_t + offs_d[None, :],
             o.to(o_ptr.dtype.element_ty), mask=qvalid[:, None])


def prefill_grid(bsz: int, hq: int, tq: int, block_m: int) -> tuple[int]:
    """The launch grid: every (sequence, query head, query tile) on axis 0 (CUDA allows 2^31 - 1 there)."""
    n = bsz * hq * triton.cdiv(tq, block_m)
    if n >= 2**31:
        raise ValueError(f"streaming_prefill: {n} programs exceed the 2^31 - 1 a grid axis allows")
    return (n,)


def _positions(name: str, pos, b: int, t: int, device) -> torch.Tensor:
    if not isinstance(pos, torch.Tensor) or pos.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be an int32/int64 tensor")
    if pos.dim() not in (1, 2) or pos.shape[-1] != t or (pos.dim() == 2 and pos.shape[0] != b):
        raise ValueError(f"{name} must have shape [{t}] or [{b}, {t}], got {list(pos.shape)}")
    if pos.device != device:
        raise ValueError(f"{name} is on {pos.device} but q is on {device}")
    return pos.to(torch.int32).expand(b, t).contiguous()


def streaming_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, sink: int, window: int,
                      scale: float | None = None, q_pos: torch.Tensor | None = None,
                      k_pos: torch.Tensor | None = None) -> torch.Tensor:
    """Sink + window causal attention (Triton); same contract as ``kvcomp.ref.streaming_attention``.

    Args:
        q: ``[B, Hq, Tq, D]``; k, v: ``[B, Hkv, Tk, D]`` (same dtype, last dim contiguous).
        sink, window: visible iff ``k_pos <= q_pos`` and (``k_pos < sink`` or ``q_pos - k_pos < window``).
        scale: default ``1/sqrt(D)``.
        q_pos: ``[Tq]`` or ``[B, Tq]`` int, default ``Tk - Tq + arange(Tq)`` (bottom-right).
        k_pos: ``[Tk]`` or ``[B, Tk]`` int, default ``arange(Tk)``; with explicit positions (any order)
            each KV tile's position range decides whether it is visited.
    The query and key tiles (``BLOCK_M``, ``BLOCK_N``), warps and pipeline stages are autotuned per
    (D, G, position mode, dtypes).
    Returns:
        ``[B, Hq, Tq, D]`` in q's dtype. A query row with no visible key is zero.
    """
    for name, x in (("sink", sink), ("window", window)):
        if isinstance(x, bool) or not isinstance(x, int) or x < 0:
            raise ValueError(f"{name} must be a non-negative int, got {x!r}")
    if window < 1:
        raise ValueError("window must be >= 1 (it counts the token itself)")
    check_float("q", q)
    check_float("k", k, q.dtype)
    check_float("v", v, q.dtype)
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims [B, H, T, D], got {list(t.shape)}")
    bsz, hq, tq, d = q.shape
    _, hkv, tk, _ = k.shape
    if k.shape[0] != bsz or k.shape[3] != d:
        raise ValueError(f"k shape {list(k.shape)} does not match q {list(q.shape)} in batch / head dim")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v shape {list(v.shape)} must equal k shape {list(k.shape)}")
    if hkv == 0 or hq % hkv:
        raise ValueError(f"q: {hq} query heads is not a multiple of {hkv} KV heads")
    check_head_dim("q", d)
    dev = check_device(q=q, k=k, v=v)
    if q_pos is None and tq > tk:
        raise ValueError(f"q: Tq={tq} > Tk={tk} needs explicit q_pos")
    qp = _positions("q_pos", q_pos, bsz, tq, dev) if q_pos is not None else None
    kp = _positions("k_pos", k_pos, bsz, tk, dev) if k_pos is not None else None
    scale = 1.0 / d ** 0.5 if scale is None else float(scale)
    out = torch.empty((bsz, hq, tq, d), device=dev, dtype=q.dtype)
    if out.numel() == 0:
        return out
    prefill_grid(bsz, hq, tq, MIN_BLOCK_M)  # every config's grid fits (the smallest query tile has the most)
    dummy = torch.zeros(1, device=dev, dtype=torch.int32)
    _streaming_prefill_kernel[lambda meta: prefill_grid(bsz, hq, tq, meta["BLOCK_M"])](
        q, k, v, out, qp if qp is not None else dummy, kp if kp is not None else dummy,
        scale * _LOG2E, sink, window, tq, tk, hq, hq // hkv,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        qp.stride(0) if qp is not None else 0, kp.stride(0) if kp is not None else 0,
        HAS_QPOS=qp is not None, HAS_KPOS=kp is not None,
        D=d, F32=dot_f32(dev, q.dtype))
    return out
