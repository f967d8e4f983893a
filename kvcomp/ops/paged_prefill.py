"""``paged_prefill``: causal varlen attention of packed queries straight over a paged KV cache.

On CPU with the extension built this runs ``torch.ops.kvcomp_C.paged_prefill``
(csrc/paged_prefill_cpu.cpp: flash-attention tiles of keys and values copied out of the pages
through the block table, GEMMs through ATen's CPU BLAS, no per-request gather copy); otherwise, and
on CUDA (no Triton kernel for this op), the reference ``kvcomp.ref.attention.paged_attention``,
which has the same signature. The choice is
``kvcomp.ops._dispatch.impl_for(q, "paged_prefill")``.
"""

from __future__ import annotations

import torch

from kvcomp.ops._dispatch import impl_for
from kvcomp.ref import _validate as V
from kvcomp.ref.attention import paged_attention


def paged_prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                  seq_lens: torch.Tensor, query_start_loc: torch.Tensor, *,
                  scale: float | None = None) -> torch.Tensor:
    """Causal varlen attention (prefill, chunked prefill, decode rows) over a paged KV cache.

    Args:
        q: ``[total_q, Hq, D]`` packed queries; sequence ``b`` owns rows
            ``query_start_loc[b]:query_start_loc[b+1]``, which are its last ``q_len_b`` tokens.
        k_cache, v_cache: ``[num_blocks, block_size, Hkv, D]`` (the native kernel needs ``Dv == D``
            and contiguous last dims; other strides are free).
        block_table: ``[B, max_blocks]`` int; seq_lens: ``[B]`` tokens incl. the new ones;
        query_start_loc: ``[B+1]`` int, from 0 to ``total_q``.
        scale: default ``1/sqrt(D)``.
    Returns:
        ``[total_q, Hq, D]`` in ``q.dtype``.
    """
    scale = V.scale_or_default(scale, q.shape[-1])
    if impl_for(q, "paged_prefill") == "native":
        return torch.ops.kvcomp_C.paged_prefill(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, scale)
    return paged_attention(q, k_cache, v_cache, block_table, seq_lens, query_start_loc, scale=scale)
