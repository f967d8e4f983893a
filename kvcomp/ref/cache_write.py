"""Reference cache writes (pure PyTorch): paged KV by slot mapping, and the compact streaming ring.

Streaming ring layout (see docs/kernels.md): a per-sequence buffer ``[B, n_str, sink + window, D]``;
slot ``s < sink`` holds token ``s``; token ``p >= sink`` lives in slot ``sink + (p - sink) % window``.
After a sequence holds ``L`` tokens the valid slots are exactly the tokens a streaming head may see
from position ``L - 1``: ``p < sink`` or ``p >= L - window``.
"""

from __future__ import annotations

import torch

from kvcomp.ref import _validate as V


def streaming_slot(pos, sink: int, window: int):
    """Ring slot of absolute token position ``pos`` (``pos < sink`` -> ``pos``); an int, or an
    int tensor of positions (elementwise)."""
    if isinstance(pos, torch.Tensor):
        return torch.where(pos < sink, pos, sink + torch.remainder(pos - sink, window))
    return pos if pos < sink else sink + (pos - sink) % window


def write_paged_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Write ``N`` new tokens into a paged cache, in place (vLLM ``reshape_and_cache`` semantics).

    Args:
        key, value: ``[N, Hkv, D]`` new keys / values.
        k_cache, v_cache: ``[num_blocks, block_size, Hkv, D]``, modified in place.
        slot_mapping: ``[N]`` int; token ``i`` goes to block ``slot // block_size``, offset
            ``slot % block_size``; ``slot == -1`` skips the token (padding).
    """
    V.tensor("key", key, ndim=3, kind="float")
    V.tensor("value", value, ndim=3, kind="float")
    V.tensor("k_cache", k_cache, ndim=4, kind="float")
    V.tensor("v_cache", v_cache, ndim=4, kind="float")
    V.tensor("slot_mapping", slot_mapping, ndim=1, kind="int")
    nb, bs, h, d = k_cache.shape
    if tuple(v_cache.shape) != tuple(k_cache.shape):
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} != k_cache shape {tuple(k_cache.shape)}")
    for name, t in (("key", key), ("value", value)):
        if tuple(t.shape) != (slot_mapping.shape[0], h, d):
            raise ValueError(f"{name} must have shape [{slot_mapping.shape[0]}, {h}, {d}], got {list(t.shape)}")
    slots = slot_mapping.long()
    if slots.numel() and (int(slots.min()) < -1 or int(slots.max()) >= nb * bs):
        raise ValueError(f"slot_mapping values must be -1 or in [0, {nb * bs})")
    keep = slots >= 0
    s = slots[keep]
    k_cache[s // bs, s % bs] = key[keep].to(k_cache.dtype)
    v_cache[s // bs, s % bs] = value[keep].to(v_cache.dtype)


def write_streaming_kv(key: torch.Tensor, value: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
                       query_start_loc: torch.Tensor, seq_lens: torch.Tensor, *, sink: int) -> None:
    """Append new tokens of streaming heads to their compact ring buffers, in place.

    Args:
        key, value: ``[total_new, n_str, D]`` packed new tokens; sequence ``b`` owns rows
            ``query_start_loc[b]:query_start_loc[b+1]``, which are its last tokens, so row ``i`` has
            position ``seq_lens[b] - q_len_b + (i - query_start_loc[b])``.
        k_buf, v_buf: ``[B, n_str, sink + window, D]`` ring buffers, modified in place.
        query_start_loc: ``[B+1]`` int, seq_lens: ``[B]`` int (tokens *including* the new ones).
        sink: number of sink slots (``window = k_buf.shape[2] - sink >= 1``).

    Only tokens that stay visible land: ``p < sink`` or ``p >= seq_len - window`` (so a chunk longer
    than the window writes only its last ``window`` tokens plus any sink positions).
    """
    V.tensor("key", key, ndim=3, kind="float")
    V.tensor("value", value, ndim=3, kind="float")
    V.tensor("k_buf", k_buf, ndim=4, kind="float")
    V.tensor("v_buf", v_buf, ndim=4, kind="float")
    V.tensor("query_start_loc", query_start_loc, ndim=1, kind="int")
    V.tensor("seq_lens", seq_lens, ndim=1, kind="int")
    V.nonneg_int("sink", sink)
    b, h, slots, d = k_buf.shape
    window = slots - sink
    if window < 1:
        raise ValueError(f"sink={sink} leaves no window slots in a buffer of {slots}")
    if tuple(v_buf.shape) != tuple(k_buf.shape):
        raise ValueError(f"v_buf shape {tuple(v_buf.shape)} != k_buf shape {tuple(k_buf.shape)}")
    V.dim_eq("seq_lens", seq_lens.shape[0], b, "length (batch of k_buf)")
    V.dim_eq("query_start_loc", query_start_loc.shape[0], b + 1, "length (batch + 1)")
    for name, t in (("key", key), ("value", value)):
        if tuple(t.shape[1:]) != (h, d):
            raise ValueError(f"{name} must have shape [total_new, {h}, {d}], got {list(t.shape)}")
    qsl = [int(x) for x in query_start_loc.tolist()]
    lens = [int(x) for x in seq_lens.tolist()]
    if qsl[0] != 0 or qsl[-1] != key.shape[0]:
        raise ValueError(f"query_start_loc must run from 0 to total_new={key.shape[0]}")
    for i in range(b):
        n = qsl[i + 1] - qsl[i]
        if n < 0 or lens[i] < n:
            raise ValueError(f"sequence {i}: {n} new tokens but seq_lens[{i}]={lens[i]}")
        for j in range(n):
            p = lens[i] - n + j
            if p < sink or p >= lens[i] - window:
                s = streaming_slot(p, sink, window)
                k_buf[i, :, s] = key[qsl[i] + j].to(k_buf.dtype)
                v_buf[i, :, s] = value[qsl[i] + j].to(v_buf.dtype)
