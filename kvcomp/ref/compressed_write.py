"""Reference for the cache write of A²ATS codes (``vq_encode_paged``).

New tokens arrive packed like varlen queries: ``k_new [N, Hkv, D]`` with ``query_start_loc [B+1]``;
sequence ``b`` owns rows ``query_start_loc[b]:query_start_loc[b+1]``, which are its last tokens, so
row ``i`` has position ``p = seq_lens[b] - q_len_b + (i - query_start_loc[b])`` (``seq_lens`` counts
the new tokens). Token ``p`` lives in slot ``p % block_size`` of block ``block_table[b, p // block_size]``.
The write updates the code cache in place and returns it.
"""

from __future__ import annotations

import torch

from . import _validate as V
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
