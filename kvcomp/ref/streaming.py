"""Streaming (attention-sink + recent-window) attention references, as in DuoAttention's streaming heads.

A key at position ``kp`` is visible to a query at ``qp`` iff ``kp <= qp`` and (``kp < sink`` or
``qp - kp < window``). The window counts the query's own token, so ``window=1`` means "sinks plus
the token itself". ``window`` must be >= 1: the contract is that every query sees at least its own
token, and ``window=0`` would leave queries past the sinks with nothing to attend to.
"""

from __future__ import annotations

import torch

from . import _validate as V
from .attention import attention, paged_apply


def _check_sink_window(sink, window) -> tuple[int, int]:
    V.nonneg_int("sink", sink)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1 (it counts the query's own token), got {window!r}")
    return sink, window


def streaming_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, sink: int, window: int) -> torch.Tensor:
    """Visibility of keys to queries under the sink + window rule.

    Args:
        q_pos: ``[..., Tq]`` integer query positions.
        k_pos: ``[..., Tk]`` integer key positions (leading dims broadcast with ``q_pos``'s).
        sink: number of leading sink tokens (positions ``0..sink-1``) always visible.
        window: recent window length, >= 1, counting the query's own token.
    Returns:
        bool ``[..., Tq, Tk]``, True = visible.
    """
    V.tensor("q_pos", q_pos, kind="int")
    V.tensor("k_pos", k_pos, kind="int")
    if q_pos.dim() < 1 or k_pos.dim() < 1:
        raise ValueError("q_pos and k_pos must have at least one dim")
    V.same_device(q_pos=q_pos, k_pos=k_pos)
    _check_sink_window(sink, window)
    qp = q_pos.long().unsqueeze(-1)
    kp = k_pos.long().unsqueeze(-2)
    try:
        torch.broadcast_shapes(qp.shape, kp.shape)
    except RuntimeError:
        raise ValueError(f"q_pos {tuple(q_pos.shape)} and k_pos {tuple(k_pos.shape)} leading dims do not broadcast") from None
    return (kp <= qp) & ((kp < sink) | (qp - kp < window))


def streaming_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, sink: int, window: int,
                        scale: float | None = None, q_pos: torch.Tensor | None = None,
                        k_pos: torch.Tensor | None = None) -> torch.Tensor:
    """Sink + window attention over dense keys with (optionally) explicit positions.

    Args:
        q: ``[B, Hq, Tq, D]``.
        k: ``[B, Hkv, Tk, D]``; may be compact storage (e.g. sink tokens + a recent ring buffer in any
            order) as long as ``k_pos`` gives each slot's absolute position.
        v: ``[B, Hkv, Tk, Dv]``.
        sink, window: see :func:`streaming_mask` (``window >= 1``).
        scale: default ``1/sqrt(D)``.
        q_pos: ``[Tq]`` or ``[B, Tq]``; default ``Tk - Tq + arange(Tq)`` (bottom-right).
        k_pos: ``[Tk]`` or ``[B, Tk]``; default ``arange(Tk)``.
    Returns:
        ``[B, Hq, Tq, Dv]`` in ``q.dtype``.
    """
    _check_sink_window(sink, window)
    V.tensor("q", q, ndim=4, kind="float")
    V.tensor("k", k, ndim=4, kind="float")
    b, _, tq, _ = q.shape
    tk = k.shape[2]
    qp = V.query_positions(q_pos, b, tq, tk, q.device)
    kp = V.key_positions(k_pos, b, tk, q.device)
    m = streaming_mask(qp, kp, sink, window).unsqueeze(1)  # [B|1, 1, Tq, Tk]
    return attention(q, k, v, scale=scale, causal=False, mask=m)


def varlen_offsets(cu_q: torch.Tensor, cu_k: torch.Tensor, total_q: int, total_k: int) -> list[list[int]]:
    """``[cu_q, cu_k]`` as lists after checking them: both ``[B + 1]``, from 0 to ``total_q`` /
    ``total_k`` rows, non-decreasing (ValueError naming the offending one otherwise)."""
    if cu_q.dim() != 1 or cu_q.shape[0] < 1 or cu_k.shape != cu_q.shape:
        raise ValueError(f"cu_q and cu_k must both be [B + 1], got {tuple(cu_q.shape)} and {tuple(cu_k.shape)}")
    offsets = []
    for name, cu, total, what in (("cu_q", cu_q, total_q, "query"), ("cu_k", cu_k, total_k, "key")):
        c = cu.tolist()
        if c[0] != 0 or c[-1] != total:
            raise ValueError(f"{name} must run from 0 to the number of {what} rows {total}, got {c[0]} .. {c[-1]}")
        if any(a > b for a, b in zip(c, c[1:])):
            raise ValueError(f"{name} must be non-decreasing, got {c}")
        offsets.append(c)
    return offsets


def varlen_streaming_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                               k_pos: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor, sink: int, window: int,
                               scale: float | None = None) -> torch.Tensor:
    """Sink + window attention of several requests packed in rows (the signature of the native
    ``torch.ops.kvcomp_C.streaming_prefill``).

    Args:
        q: ``[total_q, Hq, D]``; request ``b``'s queries are rows ``cu_q[b] : cu_q[b + 1]``.
        k, v: ``[total_k, Hkv, D]``; request ``b``'s keys / values are rows ``cu_k[b] : cu_k[b + 1]``,
            in any order (``k_pos`` gives each row's position).
        q_pos, k_pos: ``[total_q]`` / ``[total_k]`` integer positions.
        cu_q, cu_k: ``[B + 1]`` integer row offsets, from 0 to ``total_q`` / ``total_k``, non-decreasing.
        sink, window: see :func:`streaming_mask` (``window >= 1``).
        scale: default ``1/sqrt(D)``.
    Returns:
        ``[total_q, Hq, D]`` in ``q.dtype``.
    """
    _check_sink_window(sink, window)
    for name, t in (("q", q), ("k", k), ("v", v)):
        V.tensor(name, t, ndim=3, kind="float")
    for name, t in (("q_pos", q_pos), ("k_pos", k_pos), ("cu_q", cu_q), ("cu_k", cu_k)):
        V.tensor(name, t, ndim=1, kind="int")
    V.same_device(q=q, k=k, v=v, q_pos=q_pos, k_pos=k_pos)
    if v.shape != k.shape:
        raise ValueError(f"v shape {tuple(v.shape)} differs from k shape {tuple(k.shape)}")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"k head dim {k.shape[2]} must equal q's {q.shape[2]}")
    V.gqa("q", q.shape[1], k.shape[1])
    if q_pos.shape[0] != q.shape[0] or k_pos.shape[0] != k.shape[0]:
        raise ValueError(f"q_pos must be [{q.shape[0]}] and k_pos [{k.shape[0]}], got {tuple(q_pos.shape)} and "
                         f"{tuple(k_pos.shape)}")
    offsets = varlen_offsets(cu_q, cu_k, q.shape[0], k.shape[0])
    out = torch.empty_like(q)
    for (q0, q1), (k0, k1) in zip(zip(offsets[0], offsets[0][1:]), zip(offsets[1], offsets[1][1:])):
        if q1 == q0:
            continue
        out[q0:q1] = streaming_attention(q[q0:q1].transpose(0, 1)[None], k[k0:k1].transpose(0, 1)[None],
                                         v[k0:k1].transpose(0, 1)[None], sink=sink, window=window, scale=scale,
                                         q_pos=q_pos[q0:q1], k_pos=k_pos[k0:k1])[0].transpose(0, 1)
    return out


def paged_streaming_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              block_table: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                              *, sink: int, window: int, scale: float | None = None) -> torch.Tensor:
    """Sink + window attention for varlen packed queries over a paged cache (positions ``0..seq_len-1``).

    Args:
        q: ``[total_q, Hq, D]``; the queries of sequence ``b`` are its last ``q_len_b`` tokens.
        k_cache, v_cache: ``[num_blocks, block_size, Hkv, D|Dv]``.
        block_table: ``[B, max_blocks]``; seq_lens: ``[B]`` (including new tokens);
        query_start_loc: ``[B+1]``.
        sink, window: see :func:`streaming_mask`.
    Returns:
        ``[total_q, Hq, Dv]`` in ``q.dtype``.
    """
    _check_sink_window(sink, window)
    return paged_apply(q, k_cache, v_cache, block_table, seq_lens, query_start_loc,
                       lambda qb, kb, vb: streaming_attention(qb, kb, vb, sink=sink, window=window, scale=scale))
