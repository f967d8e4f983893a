"""Prefill attention for DuoAttention: :func:`streaming_prefill` for the streaming heads (sink + window:
the Triton ``kvcomp::streaming_prefill`` on CUDA, the native ``torch.ops.kvcomp_C.streaming_prefill`` on
CPU, csrc/streaming_prefill_cpu.cpp; :func:`streaming_prefill_varlen`: several requests' packed rows
in one native call) and the dense causal path for retrieval heads (``flash_attn`` when
installed and the inputs are CUDA fp16/bf16, otherwise torch SDPA).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch

from kvcomp.defaults import SUPPORTED_HEAD_DIMS
from kvcomp.ops._dispatch import impl_for


@torch.library.custom_op("kvcomp::streaming_prefill", mutates_args=())
def _streaming_prefill_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: int, window: int, scale: float,
                          q_pos: Optional[torch.Tensor], k_pos: Optional[torch.Tensor]) -> torch.Tensor:
    from kvcomp.kernels.streaming_prefill import streaming_prefill

    return streaming_prefill(q, k, v, sink=sink, window=window, scale=scale, q_pos=q_pos, k_pos=k_pos)


@_streaming_prefill_op.register_fake
def _streaming_prefill_fake(q, k, v, sink, window, scale, q_pos, k_pos):
    return torch.empty_like(q)


def triton_streaming_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, sink: int, window: int,
                               scale: float | None = None, q_pos: torch.Tensor | None = None,
                               k_pos: torch.Tensor | None = None) -> torch.Tensor:
    """Sink + window causal attention through ``kvcomp::streaming_prefill``; same contract as
    ``kvcomp.ref.streaming_attention``: q ``[B, Hq, Tq, D]``, k/v ``[B, Hkv, Tk, D]``, positions ``[T]`` or
    ``[B, T]`` (default bottom-right / ``arange``). Chunked prefill over a ring buffer: pass
    ``k = cat(ring, chunk)`` with ``k_pos = cat(ring_positions(...), chunk positions)``. Returns
    ``[B, Hq, Tq, D]`` in q's dtype."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-dim tensor [B, H, T, D]")
    scale = 1.0 / q.shape[-1] ** 0.5 if scale is None else float(scale)
    return torch.ops.kvcomp.streaming_prefill(q, k, v, sink, window, scale, q_pos, k_pos)


@functools.cache
def _flash_attn():
    try:
        import flash_attn
    except ImportError:
        return None
    return flash_attn


def _use_flash(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _flash_attn() is not None


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Bottom-right causal SDPA on ``[1|B, H, T, D]``."""
    tq, tk = q.shape[-2], k.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    if tq == tk:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    qpos = torch.arange(tk - tq, tk, device=q.device)
    mask = torch.arange(tk, device=q.device)[None, :] <= qpos[:, None]
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


def dense_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """Dense causal (bottom-right) attention for retrieval heads.

    Args: q ``[B, Hq, Tq, D]``, k/v ``[B, Hkv, Tk, D]`` with ``Tq <= Tk``, ``Hq % Hkv == 0``.
    Returns ``[B, Hq, Tq, D]``. Uses ``flash_attn.flash_attn_func`` for CUDA fp16/bf16 when installed,
    else ``torch.nn.functional.scaled_dot_product_attention``. Reference: ``kvcomp.ref.attention``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-dim tensor [B, H, T, D]")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"q: Tq={q.shape[2]} > Tk={k.shape[2]}")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"q: {q.shape[1]} query heads is not a multiple of {k.shape[1]} KV heads")
    scale = 1.0 / q.shape[-1] ** 0.5 if scale is None else float(scale)
    if _use_flash(q):
        o = _flash_attn().flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          softmax_scale=scale, causal=True)
        return o.transpose(1, 2)
    return _sdpa(q, k, v, scale)


def streaming_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, sink: int, window: int,
                      scale: float | None = None, q_pos: torch.Tensor | None = None,
                      k_pos: torch.Tensor | None = None) -> torch.Tensor:
    """Prefill of DuoAttention's streaming heads: each query sees the first ``sink`` keys and a
    ``window`` of recent keys (bottom-right causal positions, ``Tq <= Tk``, unless ``q_pos [Tq]``
    and ``k_pos [Tk]`` give them: e.g. a ring's kept tokens followed by a chunk, in any order).

    CUDA: the Triton ``kvcomp::streaming_prefill`` kernel. CPU: the native
    ``torch.ops.kvcomp_C.streaming_prefill`` (work per query O(sink + window)) when
    ``impl_for(q, "streaming_prefill")`` is ``native`` and the head dim is one of
    ``SUPPORTED_HEAD_DIMS``; otherwise torch SDPA with the boolean mask of
    ``kvcomp.ref.streaming_mask`` (the reference is ``kvcomp.ref.streaming_attention``).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-dim tensor [B, H, T, D]")
    if q.shape[2] > k.shape[2]:
        raise ValueError(f"q: Tq={q.shape[2]} > Tk={k.shape[2]}")
    scale = 1.0 / q.shape[-1] ** 0.5 if scale is None else float(scale)
    if (q_pos is None) != (k_pos is None):
        raise ValueError("q_pos and k_pos go together")
    if q.is_cuda:
        return triton_streaming_attention(q, k, v, sink=sink, window=window, scale=scale, q_pos=q_pos, k_pos=k_pos)
    tq, tk = q.shape[2], k.shape[2]
    if q_pos is None:
        q_pos, k_pos = torch.arange(tk - tq, tk, device=q.device), torch.arange(tk, device=q.device)
    if q_pos.shape != (tq,) or k_pos.shape != (tk,):
        raise ValueError(f"q_pos must be [{tq}] and k_pos [{tk}], got {list(q_pos.shape)}, {list(k_pos.shape)}")
    if q.shape[-1] in SUPPORTED_HEAD_DIMS and impl_for(q, "streaming_prefill") == "native":
        return _native_streaming(q, k, v, sink, window, scale, q_pos, k_pos)
    from ..ref.streaming import streaming_mask

    mask = streaming_mask(q_pos, k_pos, sink, window)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask.reshape(tq, tk), scale=scale,
                                                            enable_gqa=q.shape[1] != k.shape[1])


def streaming_prefill_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                             k_pos: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, *, sink: int, window: int,
                             scale: float | None = None) -> torch.Tensor:
    """:func:`streaming_prefill` of several requests in one call: q ``[total_q, Hq, D]``, k / v
    ``[total_k, Hkv, D]`` (last dim contiguous; request ``b``'s rows ``cu_q[b] : cu_q[b + 1]`` /
    ``cu_k[b] : cu_k[b + 1]``, keys in any order), positions ``q_pos [total_q]``, ``k_pos [total_k]``
    on q's device, offsets ``cu_q, cu_k [B + 1]`` on the CPU. Returns ``[total_q, Hq, D]`` in q's dtype.

    CPU with the native op: one ``torch.ops.kvcomp_C.streaming_prefill`` call (it checks the inputs);
    otherwise request by request through :func:`streaming_prefill` (Triton on CUDA, the masked SDPA
    fallback on CPU). Reference: ``kvcomp.ref.varlen_streaming_attention``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a 3-dim tensor [rows, H, D]")
    for name, t in (("cu_q", cu_q), ("cu_k", cu_k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.is_cuda:
            raise ValueError(f"{name} must be a 1-dim CPU tensor [B + 1] of row offsets")
    scale = 1.0 / q.shape[-1] ** 0.5 if scale is None else float(scale)
    if not q.is_cuda and q.shape[-1] in SUPPORTED_HEAD_DIMS and impl_for(q, "streaming_prefill") == "native":
        return torch.ops.kvcomp_C.streaming_prefill(q, k, v, q_pos, k_pos, cu_q, cu_k, sink, window, scale)
    from kvcomp.ref.streaming import varlen_offsets

    cq, ck = varlen_offsets(cu_q, cu_k, q.shape[0], k.shape[0])
    out = torch.empty_like(q)
    for b in range(len(cq) - 1):
        q0, q1, k0, k1 = cq[b], cq[b + 1], ck[b], ck[b + 1]
        if q1 > q0:
            out[q0:q1] = streaming_prefill(q[q0:q1].transpose(0, 1)[None], k[k0:k1].transpose(0, 1)[None],
                                           v[k0:k1].transpose(0, 1)[None], sink=sink, window=window, scale=scale,
                                           q_pos=q_pos[q0:q1], k_pos=k_pos[k0:k1])[0].transpose(0, 1)
    return out


def _native_streaming(q, k, v, sink, window, scale, q_pos, k_pos) -> torch.Tensor:
    """``[B, H, T, D]`` through the packed varlen ``torch.ops.kvcomp_C.streaming_prefill`` (a view, no
    copy, for B = 1 with contiguous last dims: e.g. a request's rows of the step's queries)."""
    b, hq, tq, d = q.shape
    tk = k.shape[2]

    def packed(t):
        return t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3])

    cu = torch.arange(b + 1, dtype=torch.long)
    o = torch.ops.kvcomp_C.streaming_prefill(packed(q), packed(k), packed(v), q_pos.repeat(b), k_pos.repeat(b),
                                             cu * tq, cu * tk, sink, window, scale)
    return o.view(b, tq, hq, o.shape[-1]).transpose(1, 2)
