"""References for the cache writes of the compressed layouts (ThinK pruned keys, A²ATS codes).

New tokens arrive packed like varlen queries: ``k_new [N, Hkv, D]`` with ``query_start_loc [B+1]``;
sequence ``b`` owns rows ``query_start_loc[b]:query_start_loc[b+1]``, which are its last tokens, so
row ``i`` has position ``p = seq_lens[b] - q_len_b + (i - query_start_loc[b])`` (``seq_lens`` counts
the new tokens). Token ``p`` lives in slot ``p % block_size`` of block ``block_table[b, p // block_size]``.
Layouts are described in :mod:`kvcomp.ref.think_paged`. Both writes update the caches in place and
return them.
"""

from __future__ import annotations

import torch

from . import _validate as V
from .think import pack_pruned_keys
from .vq import vq_encode


def _positions(k_new, block_table, seq_lens, query_start_loc, block_size, num_blocks):
    """Yield ``(b, rows slice, positions [n] int64, blocks [n] int64, slots [n] int64)`` per sequence."""
    V.tensor("block_table", block_table, ndim=2, kind="int")
    V.tensor("seq_lens", seq_lens, ndim=1, kind="int")
    V.tensor("query_start_loc", query_start_loc, ndim=1, kind="int")
    bsz = block_table.shape[0]
    V.dim_eq("seq_lens", seq_lens.shape[0], bsz, "length (batch size of block_table)")
    V.dim_eq("query_start_loc", query_start_loc.shape[0], bsz + 1, "length (batch size + 1)")
    lens = [int(x) for x in seq_lens.tolist()]
    qsl = [int(x) for x in query_start_loc.tolist()]
    if qsl[0] != 0 or qsl[-1] != k_new.shape[0]:
        raise ValueError(f"query_start_loc must run from 0 to N={k_new.shape[0]}, got {qsl[0]}..{qsl[-1]}")
    for b in range(bsz):
        s, e = qsl[b], qsl[b + 1]
        if e < s:
            raise ValueError(f"query_start_loc must be non-decreasing (at sequence {b})")
        if lens[b] < e - s:
            raise ValueError(f"seq_lens[{b}]={lens[b]} is smaller than its {e - s} new tokens")
        V.check_blocks(block_table, b, lens[b], block_size, num_blocks)
        pos = torch.arange(lens[b] - (e - s), lens[b], device=k_new.device)
        blk = block_table[b].to(k_new.device).long()[pos // block_size]
        yield b, slice(s, e), pos, blk, pos % block_size


def pack_pruned_keys_paged(k_new: torch.Tensor, chan_idx: torch.Tensor, kp_cache: torch.Tensor,
                           k_recent: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                           query_start_loc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Append new keys to a ThinK cache: kept channels into the narrow pages, full width into the ring.

    Every new token's ``k[chan_idx]`` is written to its page slot; a token also goes to ring slot
    ``p % W`` of ``k_recent`` when it is among the last ``W`` tokens (``p >= seq_lens[b] - W``).

    Args:
        k_new: ``[N, Hkv, D]`` new (post-RoPE) keys.
        chan_idx: ``[B or 1, Hkv, Dk]`` kept channels.
        kp_cache: ``[num_blocks, block_size, Hkv, Dk]`` (updated in place).
        k_recent: ``[B, Hkv, W, D]`` ring (updated in place; ``W`` may be 0).
        block_table: ``[B, max_blocks]``; seq_lens: ``[B]`` including the new tokens;
        query_start_loc: ``[B+1]``.
    Returns:
        ``(kp_cache, k_recent)``.
    """
    V.tensor("k_new", k_new, ndim=3, kind="float")
    V.tensor("chan_idx", chan_idx, ndim=3, kind="int")
    V.tensor("kp_cache", kp_cache, ndim=4, kind="float")
    V.tensor("k_recent", k_recent, ndim=4, kind="float")
    V.same_device(k_new=k_new, chan_idx=chan_idx, kp_cache=kp_cache, k_recent=k_recent)
    n, hkv, d = k_new.shape
    nb, bs, _, dk = kp_cache.shape
    if kp_cache.shape[2] != hkv or chan_idx.shape[1:] != (hkv, dk):
        raise ValueError(f"kp_cache [.., Hkv={hkv}, Dk] and chan_idx [B|1, Hkv, Dk] disagree: "
                         f"{tuple(kp_cache.shape)}, {tuple(chan_idx.shape)}")
    bsz = block_table.shape[0]
    if k_recent.shape[0] != bsz or k_recent.shape[1] != hkv or k_recent.shape[3] != d:
        raise ValueError(f"k_recent must be [B={bsz}, Hkv={hkv}, W, D={d}], got {tuple(k_recent.shape)}")
    if chan_idx.shape[0] not in (1, bsz):
        raise ValueError(f"chan_idx must have batch dim 1 or {bsz}, got {chan_idx.shape[0]}")
    w = k_recent.shape[2]
    for b, rows, pos, blk, slot in _positions(k_new, block_table, seq_lens, query_start_loc, bs, nb):
        kb = k_new[rows].permute(1, 0, 2).unsqueeze(0)  # [1, Hkv, n_b, D]
        ci = chan_idx[b if chan_idx.shape[0] > 1 else 0].unsqueeze(0)
        kp_cache[blk, slot] = pack_pruned_keys(kb, ci)[0].permute(1, 0, 2).to(kp_cache.dtype)
        if w:
            keep = pos >= int(seq_lens[b]) - w
            k_recent[b][:, pos[keep] % w] = kb[0][:, keep].to(k_recent.dtype)
    return kp_cache, k_recent


def vq_encode_paged(k_new: torch.Tensor, codebook: torch.Tensor, whiten: torch.Tensor, code_cache: torch.Tensor,
                    block_table: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor) -> torch.Tensor:
    """Encode new pre-RoPE keys (:func:`kvcomp.ref.vq_encode`) into a paged int16 code cache.

    Args:
        k_new: ``[N, Hkv, D]`` new pre-RoPE keys.
        codebook: ``[Hkv, C, D]``; whiten: ``[Hkv, D, D]`` (``L`` of each KV head).
        code_cache: ``[num_blocks, block_size, Hkv]`` int16 (updated in place).
        block_table, seq_lens, query_start_loc: as in the module doc.
    Returns:
        ``code_cache``.
    """
    V.tensor("k_new", k_new, ndim=3, kind="float")
    V.tensor("code_cache", code_cache, ndim=3, kind="int")
    if code_cache.dtype != torch.int16:
        raise ValueError(f"code_cache must be int16, got {code_cache.dtype}")
    nb, bs, hkv = code_cache.shape
    V.dim_eq("k_new", k_new.shape[1], hkv, "KV heads (code_cache.shape[2])")
    codes = vq_encode(k_new.permute(1, 0, 2).unsqueeze(0), codebook, whiten)[0]  # [Hkv, N]
    for _, rows, _, blk, slot in _positions(k_new, block_table, seq_lens, query_start_loc, bs, nb):
        code_cache[blk, slot] = codes[:, rows].T
    return code_cache
