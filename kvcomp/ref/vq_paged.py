"""A²ATS retrieval over a paged int16 code cache ``[num_blocks, block_size, Hkv]``, built from the
``kvcomp.ref`` primitives: :func:`gather_codes` / :func:`paged_vq_topk`; ground truth of
``kvcomp.kernels.vq_topk`` and the native ``vq_topk``; :func:`paged_exact_topk` is the same rule over
exact logits (the oracle baseline of quality analyses).
"""

from __future__ import annotations

import torch

from . import _validate as V
from .attention import gather_paged
from .vq import mask_to_indices, vq_scores, vq_select


def gather_codes(code_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    """Dense view of a paged code cache.

    Args:
        code_cache: ``[num_blocks, block_size, Hkv]`` int16.
        block_table: ``[B, max_blocks]``; seq_lens: ``[B]``.
    Returns:
        ``[B, Hkv, T]`` int64 with ``T = max(seq_lens)``; entries past ``seq_lens[b]`` are 0.
    """
    V.tensor("code_cache", code_cache, ndim=3, kind="int")
    V.tensor("block_table", block_table, ndim=2, kind="int")
    V.tensor("seq_lens", seq_lens, ndim=1, kind="int")
    lens = [int(x) for x in seq_lens.tolist()]
    b = len(lens)
    V.dim_eq("block_table", block_table.shape[0], b, "batch size (rows)")
    t = max(lens) if lens else 0
    hkv = code_cache.shape[2]
    out = torch.zeros(b, hkv, t, dtype=torch.long, device=code_cache.device)
    for i, n in enumerate(lens):
        out[i, :, :n] = gather_paged(code_cache.unsqueeze(-1), block_table, n, i)[..., 0].long()
    return out


def paged_vq_topk(lut: torch.Tensor, code_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                  *, topk, sink: int, local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A²ATS token selection over a paged code cache: ``mask_to_indices(vq_select(vq_scores(...)))``.

    Args:
        lut: ``[B, Hq, C]`` from :func:`kvcomp.ref.vq_lut`.
        code_cache: ``[num_blocks, block_size, Hkv]`` int16 codes.
        block_table: ``[B, max_blocks]``; seq_lens: ``[B]`` valid tokens.
        topk: int or ``[B]`` integer tensor; sink, local: always-kept leading / trailing tokens.
    Returns:
        ``(idx [B, Hkv, Kmax] int32, count [B, Hkv] int32)`` as :func:`kvcomp.ref.mask_to_indices`
        (ties among equal scores prefer the lower position, as :func:`kvcomp.ref.vq_select`).
    """
    codes = gather_codes(code_cache, block_table, seq_lens)
    scores = vq_scores(lut, codes)
    mask = vq_select(scores, topk=topk, sink=sink, local=local, num_kv_heads=code_cache.shape[2],
                     seq_lens=seq_lens)
    return mask_to_indices(mask)


def paged_exact_topk(q: torch.Tensor, k_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                     *, topk, sink: int, local: int, scale: float | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Oracle top-K (an analysis baseline, not a compression method): A²ATS's selection rule
    (:func:`kvcomp.ref.vq_select`: per query head top-K, GQA union, sinks, local window) over the
    exact logits ``scale * q . k`` of the paged keys instead of the codes' LUT scores.

    Args:
        q: ``[B, Hq, D]`` post-RoPE decode queries.
        k_cache: ``[num_blocks, block_size, Hkv, D]`` post-RoPE keys.
        block_table: ``[B, max_blocks]``; seq_lens: ``[B]`` valid tokens.
        topk: int or ``[B]`` integer tensor; sink, local: always-kept leading / trailing tokens.
        scale: default ``1/sqrt(D)`` (ranks are scale-free; kept for the logits' meaning).
    Returns:
        ``(idx [B, Hkv, Kmax] int32, count [B, Hkv] int32)`` as :func:`kvcomp.ref.mask_to_indices`.
    """
    V.tensor("q", q, ndim=3, kind="float")
    V.tensor("k_cache", k_cache, ndim=4, kind="float")
    V.tensor("seq_lens", seq_lens, ndim=1, kind="int")
    b, hq, d = q.shape
    hkv = k_cache.shape[2]
    V.dim_eq("k_cache", k_cache.shape[3], d, "head dim (equal to q's)")
    V.dim_eq("seq_lens", seq_lens.shape[0], b, "batch size")
    g = V.gqa("q", hq, hkv)
    sc = V.scale_or_default(scale, d)
    lens = [int(x) for x in seq_lens.tolist()]
    t = max(lens) if lens else 0
    scores = torch.zeros(b, hq, t, dtype=torch.float32, device=q.device)
    for i, n in enumerate(lens):
        k = gather_paged(k_cache, block_table, n, i).to(q.device).float()  # [Hkv, n, D]
        qi = q[i].float().view(hkv, g, d)
        scores[i, :, :n] = (torch.matmul(qi, k.transpose(1, 2)) * sc).reshape(hq, n)
    mask = vq_select(scores, topk=topk, sink=sink, local=local, num_kv_heads=hkv,
                     seq_lens=seq_lens.to(q.device))
    return mask_to_indices(mask)
