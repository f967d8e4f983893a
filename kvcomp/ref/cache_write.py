"""Reference cache write (pure PyTorch): paged KV by slot mapping; the compact streaming ring's slots.

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

