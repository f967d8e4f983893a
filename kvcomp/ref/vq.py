"""A²ATS query-aware vector quantisation of pre-RoPE keys, retrieval and sparse attention references.

Codebooks are fitted in :mod:`kvcomp.calibrate.codebook` (whitened k-means). Encode: the nearest
codeword in the whitened metric. Decode: ``lut = scale * q~ C^T``, token scores are ``lut[code]``, each query head keeps its top-k,
the group's union plus sinks and a local window is attended exactly.
"""

from __future__ import annotations

import torch

from kvcomp.defaults import MAX_CODES  # codes are int16

from . import _validate as V
from .attention import softmax_av

# Distance-matrix elements computed at once by kmeans / vq_encode (64 MiB of fp32).
_DIST_ELEMS = 1 << 24


def vq_encode(k_pre: torch.Tensor, codebook: torch.Tensor, whiten: torch.Tensor) -> torch.Tensor:
    """Nearest centroid of each key in the whitened metric ``||(k - c) L||^2``.

    Args:
        k_pre: ``[B, Hkv, T, D]`` pre-RoPE keys.
        codebook: ``[Hkv, C, D]`` (``C <= 32768``).
        whiten: ``[Hkv, D, D]`` the heads' ``L`` factors.
    Returns:
        ``[B, Hkv, T]`` int16 codes (equal distances pick the lower code).
    """
    V.tensor("k_pre", k_pre, ndim=4, kind="float")
    V.tensor("codebook", codebook, ndim=3, kind="float")
    V.tensor("whiten", whiten, ndim=3, kind="float")
    V.same_device(k_pre=k_pre, codebook=codebook, whiten=whiten)
    b, hkv, t, d = k_pre.shape
    nc = codebook.shape[1]
    if codebook.shape[0] != hkv or codebook.shape[2] != d or nc < 1:
        raise ValueError(f"codebook must be [Hkv={hkv}, C>=1, D={d}], got {tuple(codebook.shape)}")
    if nc > MAX_CODES:
        raise ValueError(f"codebook has {nc} entries, more than {MAX_CODES} (codes are int16)")
    if tuple(whiten.shape) != (hkv, d, d):
        raise ValueError(f"whiten must be [Hkv={hkv}, D={d}, D={d}], got {tuple(whiten.shape)}")
    lw = whiten.float()
    xw = torch.matmul(k_pre.float(), lw.unsqueeze(0))  # [B, Hkv, T, D]
    cw = torch.matmul(codebook.float(), lw)  # [Hkv, C, D]
    x2 = (xw * xw).sum(-1)
    c2 = (cw * cw).sum(-1)[None, :, None, :]
    cwt = cw.transpose(1, 2).unsqueeze(0)
    codes = torch.empty(b, hkv, t, dtype=torch.int16, device=k_pre.device)
    step = max(1, _DIST_ELEMS // max(1, b * hkv * nc))
    for s in range(0, t, step):
        e = min(t, s + step)
        dist = x2[:, :, s:e, None] - 2.0 * torch.matmul(xw[:, :, s:e], cwt) + c2
        codes[:, :, s:e] = dist.argmin(dim=-1).to(torch.int16)
    return codes


def vq_lut(q_wrope: torch.Tensor, codebook: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """Score of every centroid for every query head: ``lut = scale * q~ C^T``.

    Args:
        q_wrope: ``[B, Hq, D]`` windowed-RoPE decode queries.
        codebook: ``[Hkv, C, D]``; query head ``h`` uses codebook ``h // G``.
        scale: default ``1/sqrt(D)``.
    Returns:
        ``[B, Hq, C]`` fp32.
    """
    V.tensor("q_wrope", q_wrope, ndim=3, kind="float")
    V.tensor("codebook", codebook, ndim=3, kind="float")
    V.same_device(q_wrope=q_wrope, codebook=codebook)
    b, hq, d = q_wrope.shape
    hkv, nc, _ = codebook.shape
    V.dim_eq("codebook", codebook.shape[2], d, "head dim (equal to q_wrope's)")
    g = V.gqa("q_wrope", hq, hkv)
    sc = V.scale_or_default(scale, d)
    qf = q_wrope.float().reshape(b, hkv, g, d)
    lut = torch.matmul(qf, codebook.float().transpose(1, 2).unsqueeze(0)) * sc
    return lut.reshape(b, hq, nc)


def vq_scores(lut: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Approximate logits ``scores[b, h, t] = lut[b, h, codes[b, h // G, t]]``.

    Args:
        lut: ``[B, Hq, C]`` from :func:`vq_lut`.
        codes: ``[B, Hkv, T]`` integer codes in ``[0, C)``.
    Returns:
        ``[B, Hq, T]`` fp32.
    """
    V.tensor("lut", lut, ndim=3, kind="float")
    V.tensor("codes", codes, ndim=3, kind="int")
    V.same_device(lut=lut, codes=codes)
    b, hq, nc = lut.shape
    V.dim_eq("codes", codes.shape[0], b, "batch size")
    hkv, t = codes.shape[1], codes.shape[2]
    g = V.gqa("lut", hq, hkv)
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= nc):
        raise ValueError(f"codes must lie in [0, {nc}), got [{int(codes.min())}, {int(codes.max())}]")
    ix = codes.long().repeat_interleave(g, dim=1)  # [B, Hq, T]
    return torch.gather(lut.float(), 2, ix)


def _lens(name: str, x, b: int, t: int, device: torch.device, default: int) -> torch.Tensor:
    """An int or a ``[B]`` integer tensor → int64 ``[B]`` on ``device`` with values in [0, t]."""
    if x is None:
        return torch.full((b,), default, dtype=torch.long, device=device)
    if isinstance(x, int) and not isinstance(x, bool):
        if x < 0:
            raise ValueError(f"{name} must be >= 0, got {x}")
        return torch.full((b,), x, dtype=torch.long, device=device)
    V.tensor(name, x, ndim=1, kind="int")
    if x.shape[0] != b:
        raise ValueError(f"{name} must have {b} entries, got {x.shape[0]}")
    x = x.to(device=device, dtype=torch.long)
    if x.numel() and int(x.min()) < 0:
        raise ValueError(f"{name} must be >= 0")
    return x


def vq_select(scores: torch.Tensor, *, topk, sink: int, local: int, num_kv_heads: int,
              seq_lens: torch.Tensor | None = None) -> torch.Tensor:
    """Tokens each KV head attends to exactly.

    Each query head keeps its ``topk`` highest-scoring valid tokens (all of them when ``topk`` is at
    least the number of valid tokens; equal scores prefer the lower position); the union over the
    head's GQA group (query heads ``h*G .. h*G+G-1``) is taken, then the first ``sink`` and the last
    ``local`` valid tokens are added. Tokens at ``t >= seq_lens[b]`` are never selected.

    Args:
        scores: ``[B, Hq, T]`` from :func:`vq_scores`.
        topk: int, or ``[B]`` integer tensor (per sequence), >= 0.
        sink: number of leading tokens always kept.
        local: number of trailing valid tokens always kept.
        num_kv_heads: ``Hkv`` (``scores`` alone cannot tell the group size).
        seq_lens: optional ``[B]`` integer valid lengths (``<= T``); default all ``T``.
    Returns:
        ``[B, Hkv, T]`` bool, True = attend.
    """
    V.tensor("scores", scores, ndim=3, kind="float")
    b, hq, t = scores.shape
    if isinstance(num_kv_heads, bool) or not isinstance(num_kv_heads, int) or num_kv_heads < 1:
        raise ValueError(f"num_kv_heads must be a positive int, got {num_kv_heads!r}")
    g = V.gqa("scores", hq, num_kv_heads)
    V.nonneg_int("sink", sink)
    V.nonneg_int("local", local)
    dev = scores.device
    k = _lens("topk", topk, b, t, dev, 0)
    lens = _lens("seq_lens", seq_lens, b, t, dev, t)
    if b and int(lens.max()) > t:
        raise ValueError(f"seq_lens must be <= T={t}")
    pos = torch.arange(t, device=dev)
    valid = pos[None, :] < lens[:, None]  # [B, T]
    s = scores.float().masked_fill(~valid[:, None, :], float("-inf"))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices  # [B, Hq, T]
    take = (pos[None, None, :] < k[:, None, None]).expand(b, hq, t)
    top = torch.zeros(b, hq, t, dtype=torch.bool, device=dev).scatter_(2, order, take)
    mask = top.reshape(b, num_kv_heads, g, t).any(dim=2)
    always = (pos[None, :] < sink) | (pos[None, :] >= lens[:, None] - local)
    return (mask | always[:, None, :]) & valid[:, None, :]


def mask_to_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Compact a selection mask into ascending token indices.

    Args:
        mask: ``[B, Hkv, T]`` bool.
    Returns:
        ``(idx [B, Hkv, Kmax] int32, count [B, Hkv] int32)`` with ``Kmax = max(count)``; row entries
        past ``count`` repeat the row's last selected index (0 for an empty row).
    """
    V.tensor("mask", mask, ndim=3, kind="bool")
    b, h, t = mask.shape
    count = mask.sum(dim=-1)
    kmax = int(count.max()) if count.numel() else 0
    pos = torch.arange(t, device=mask.device).expand(b, h, t)
    srt = torch.where(mask, pos, torch.full_like(pos, t)).sort(dim=-1).values[..., :kmax]
    last = srt.gather(2, (count - 1).clamp(min=0).unsqueeze(-1)) if kmax else srt[..., :1]
    last = torch.where(count.unsqueeze(-1) > 0, last, torch.zeros_like(last))
    j = torch.arange(kmax, device=mask.device)
    idx = torch.where(j < count.unsqueeze(-1), srt, last)
    return idx.to(torch.int32), count.to(torch.int32)


def _check_sparse_idx(idx: torch.Tensor, count: torch.Tensor, b: int, hkv: int, limit: int, what: str) -> None:
    V.tensor("idx", idx, ndim=3, kind="int")
    V.tensor("count", count, ndim=2, kind="int")
    if tuple(idx.shape[:2]) != (b, hkv):
        raise ValueError(f"idx must be [B={b}, Hkv={hkv}, Kmax], got {tuple(idx.shape)}")
    if tuple(count.shape) != (b, hkv):
        raise ValueError(f"count must be [B={b}, Hkv={hkv}], got {tuple(count.shape)}")
    kmax = idx.shape[2]
    if count.numel() and (int(count.min()) < 0 or int(count.max()) > kmax):
        raise ValueError(f"count must lie in [0, Kmax={kmax}]")
    live = torch.arange(kmax, device=idx.device) < count.unsqueeze(-1).to(idx.device)
    if live.any():
        sel = idx[live]
        if int(sel.min()) < 0 or int(sel.max()) >= limit:
            raise ValueError(f"idx has selected entries outside [0, {limit}) ({what})")


def _sparse_core(q: torch.Tensor, k_sel: torch.Tensor, v_sel: torch.Tensor, live: torch.Tensor, sc: float) -> torch.Tensor:
    """q ``[B, Hq, Tq, D]``, k_sel/v_sel ``[B, Hkv, K, D|Dv]``, live ``[B, Hkv, K]`` → ``[B, Hq, Tq, Dv]`` fp32."""
    b, hq, tq, d = q.shape
    hkv = k_sel.shape[1]
    g = hq // hkv
    qf = q.float().reshape(b, hkv, g, tq, d)
    # padded entries gathered an arbitrary (maybe never-written, NaN) row: zero them so 0 * NaN cannot leak
    k_sel = k_sel.float().masked_fill(~live[..., None], 0.0)
    v_sel = v_sel.float().masked_fill(~live[..., None], 0.0)
    logits = torch.matmul(qf, k_sel.unsqueeze(2).transpose(-1, -2)) * sc
    o = softmax_av(logits, live[:, :, None, None, :], v_sel.float())
    return o.reshape(b, hq, tq, v_sel.shape[-1])


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor, count: torch.Tensor,
                     *, scale: float | None = None) -> torch.Tensor:
    """Exact attention of each query head over the selected tokens of its KV head (no causal mask).

    Args:
        q: ``[B, Hq, Tq, D]`` (Tq = 1 for decode); post-RoPE, like ``k``.
        k: ``[B, Hkv, T, D]``; v: ``[B, Hkv, T, Dv]``.
        idx: ``[B, Hkv, Kmax]`` token indices; only ``idx[b, h, :count[b, h]]`` are read.
        count: ``[B, Hkv]``.
        scale: default ``1/sqrt(D)``.
    Returns:
        ``[B, Hq, Tq, Dv]`` in ``q.dtype`` (zero for a head with ``count == 0``).
    """
    V.tensor("q", q, ndim=4, kind="float")
    V.tensor("k", k, ndim=4, kind="float")
    V.tensor("v", v, ndim=4, kind="float")
    V.same_device(q=q, k=k, v=v, idx=idx, count=count)
    b, hq, tq, d = q.shape
    _, hkv, t, _ = k.shape
    V.dim_eq("k", k.shape[0], b, "batch size")
    V.dim_eq("k", k.shape[3], d, "head dim (equal to q's)")
    if tuple(v.shape[:3]) != (b, hkv, t):
        raise ValueError(f"v must be [B={b}, Hkv={hkv}, T={t}, Dv], got {tuple(v.shape)}")
    V.gqa("q", hq, hkv)
    _check_sparse_idx(idx, count, b, hkv, t, "T")
    sc = V.scale_or_default(scale, d)
    live = torch.arange(idx.shape[2], device=q.device) < count.long().unsqueeze(-1)
    ix = torch.where(live, idx.long(), torch.zeros((), dtype=torch.long, device=q.device))
    k_sel = torch.gather(k, 2, ix.unsqueeze(-1).expand(-1, -1, -1, d))
    v_sel = torch.gather(v, 2, ix.unsqueeze(-1).expand(-1, -1, -1, v.shape[3]))
    return _sparse_core(q, k_sel, v_sel, live, sc).to(q.dtype)


def paged_sparse_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                           idx: torch.Tensor, count: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """Decode-time sparse attention over a paged cache.

    Args:
        q: ``[B, Hq, D]`` one decode query per sequence.
        k_cache: ``[num_blocks, block_size, Hkv, D]``; v_cache: ``[num_blocks, block_size, Hkv, Dv]``.
        block_table: ``[B, max_blocks]``; token ``p`` of sequence ``b`` lives in slot ``p % block_size``
            of block ``block_table[b, p // block_size]``.
        idx: ``[B, Hkv, Kmax]`` token positions within each sequence; count: ``[B, Hkv]``.
        scale: default ``1/sqrt(D)``.
    Returns:
        ``[B, Hq, Dv]`` in ``q.dtype``.
    """
    V.tensor("q", q, ndim=3, kind="float")
    V.tensor("k_cache", k_cache, ndim=4, kind="float")
    V.tensor("v_cache", v_cache, ndim=4, kind="float")
    V.tensor("block_table", block_table, ndim=2, kind="int")
    V.same_device(q=q, k_cache=k_cache, v_cache=v_cache, block_table=block_table, idx=idx, count=count)
    b, hq, d = q.shape
    nb, bs, hkv, _ = k_cache.shape
    V.dim_eq("k_cache", k_cache.shape[3], d, "head dim (equal to q's)")
    if tuple(v_cache.shape[:3]) != (nb, bs, hkv):
        raise ValueError(f"v_cache shape {tuple(v_cache.shape)} does not match k_cache {tuple(k_cache.shape)}")
    V.dim_eq("block_table", block_table.shape[0], b, "batch size (rows)")
    V.gqa("q", hq, hkv)
    _check_sparse_idx(idx, count, b, hkv, block_table.shape[1] * bs, "block_table capacity")
    sc = V.scale_or_default(scale, d)
    live = torch.arange(idx.shape[2], device=q.device) < count.long().unsqueeze(-1)
    pos = torch.where(live, idx.long(), torch.zeros((), dtype=torch.long, device=q.device))
    kmax = pos.shape[2]
    blk = torch.gather(block_table.long(), 1, (pos // bs).reshape(b, hkv * kmax)).reshape(b, hkv, kmax)
    if live.any():
        used = blk[live]
        if int(used.min()) < 0 or int(used.max()) >= nb:
            raise ValueError(f"block_table maps selected tokens to blocks outside [0, {nb})")
    blk = torch.where(live, blk, torch.zeros_like(blk))
    head = torch.arange(hkv, device=q.device)[None, :, None].expand(b, hkv, kmax)
    k_sel = k_cache[blk, pos % bs, head]  # [B, Hkv, Kmax, D]
    v_sel = v_cache[blk, pos % bs, head]
    return _sparse_core(q.unsqueeze(2), k_sel, v_sel, live, sc)[:, :, 0].to(q.dtype)
