"""ThinK's paged decode, built from the ``kvcomp.ref`` primitives: :func:`paged_pruned_key_attention`
over pruned key pages + a full-width recent ring (layout below); ground truth of
``kvcomp.kernels.think_decode`` and the native ``think_decode``.

ThinK cache layout (``W`` = recent window, ``Dk`` kept channels):
``kp_cache [num_blocks, block_size, Hkv, Dk]`` (token ``p`` of sequence ``b`` in slot
``p % block_size`` of block ``block_table[b, p // block_size]``, shared with ``v_cache``),
``chan_idx [B or 1, Hkv, Dk]``, ``k_recent [B, Hkv, W, D]`` (ring: token ``p`` in slot ``p % W``),
``v_cache [num_blocks, block_size, Hkv, Dv]``. With ``L = seq_lens[b]`` and ``T_p = max(L - W, 0)``,
tokens ``p < T_p`` are read pruned and tokens ``T_p <= p < L`` full width from the ring.
"""

from __future__ import annotations

import torch

from . import _validate as V
from .attention import gather_paged
from .think import pruned_key_attention


def paged_pruned_key_attention(q: torch.Tensor, kp_cache: torch.Tensor, chan_idx: torch.Tensor,
                               k_recent: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                               seq_lens: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """ThinK decode (one query per sequence) over the paged layout of the module doc.

    Args:
        q: ``[B, Hq, D]`` post-RoPE decode queries.
        kp_cache: ``[num_blocks, block_size, Hkv, Dk]`` pruned keys.
        chan_idx: ``[B or 1, Hkv, Dk]`` integer kept channels (batch dim 1 = shared by all sequences).
        k_recent: ``[B, Hkv, W, D]`` full-width ring, ``W >= 0``.
        v_cache: ``[num_blocks, block_size, Hkv, Dv]``.
        block_table: ``[B, max_blocks]`` integer; seq_lens: ``[B]`` integer, ``>= 1``.
        scale: default ``1/sqrt(D)``.
    Returns:
        ``[B, Hq, Dv]`` in ``q.dtype``.
    """
    V.tensor("q", q, ndim=3, kind="float")
    V.tensor("kp_cache", kp_cache, ndim=4, kind="float")
    V.tensor("k_recent", k_recent, ndim=4, kind="float")
    V.tensor("v_cache", v_cache, ndim=4, kind="float")
    V.tensor("chan_idx", chan_idx, ndim=3, kind="int")
    V.tensor("block_table", block_table, ndim=2, kind="int")
    V.tensor("seq_lens", seq_lens, ndim=1, kind="int")
    V.same_device(q=q, kp_cache=kp_cache, chan_idx=chan_idx, k_recent=k_recent, v_cache=v_cache,
                  block_table=block_table, seq_lens=seq_lens)
    b, hq, d = q.shape
    nb, bs, hkv, dk = kp_cache.shape
    if tuple(v_cache.shape[:3]) != (nb, bs, hkv):
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} does not match kp_cache {tuple(kp_cache.shape)}")
    if k_recent.shape[0] != b or k_recent.shape[1] != hkv or k_recent.shape[3] != d:
        raise ValueError(f"k_recent must be [B={b}, Hkv={hkv}, W, D={d}], got {tuple(k_recent.shape)}")
    if chan_idx.shape[0] not in (1, b) or tuple(chan_idx.shape[1:]) != (hkv, dk):
        raise ValueError(f"chan_idx must be [B={b} or 1, Hkv={hkv}, Dk={dk}], got {tuple(chan_idx.shape)}")
    V.dim_eq("block_table", block_table.shape[0], b, "batch size (rows)")
    V.dim_eq("seq_lens", seq_lens.shape[0], b, "length (batch size)")
    w = k_recent.shape[2]
    out = q.new_empty(b, hq, v_cache.shape[3])
    for i, seq_len in enumerate(int(x) for x in seq_lens.tolist()):
        if seq_len < 1:
            raise ValueError(f"seq_lens[{i}]={seq_len} must be >= 1 (the decode token is in the cache)")
        tp = max(seq_len - w, 0)
        kp = gather_paged(kp_cache, block_table, seq_len, i)[:, :tp]
        vb = gather_paged(v_cache, block_table, seq_len, i)
        ring = torch.arange(tp, seq_len, device=q.device) % max(w, 1)
        kf = k_recent[i][:, ring]
        ci = chan_idx[i if chan_idx.shape[0] > 1 else 0]
        o = pruned_key_attention(q[i, :, None, :].unsqueeze(0), kp.unsqueeze(0), ci.unsqueeze(0), kf.unsqueeze(0),
                                 vb.unsqueeze(0), scale=scale)
        out[i] = o[0, :, 0]
    return out
