"""ThinK key-channel pruning references, one channel set per KV head (GQA-preserving).

ThinK scores channel ``c`` of a head by ``mean_t Q_obs[t,c]^2 * mean_j K[j,c]^2``, which equals
``||Q_obs[:,c] K[:,c]^T||_F^2 / (Tobs * T)``. Here the query energy is summed over the ``G`` query
heads of a KV head's group (as kvpress's ThinKPress does with a mean), so one channel index serves
the whole group and the pruned keys really shrink.
"""

from __future__ import annotations

import math

import torch

from ..defaults import THINK_CHANNEL_MULTIPLE
from . import _validate as V
from .attention import chunked, softmax_av


def think_channel_scores(q_obs: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Per-KV-head channel importance.

    Args:
        q_obs: ``[B, Hq, Tobs, D]`` post-RoPE observation queries (ThinK: the last 32).
        k: ``[B, Hkv, T, D]`` post-RoPE keys to be pruned.
    Returns:
        ``[B, Hkv, D]`` fp32: ``score_c = (sum_{h in group} mean_t q_obs[h,t,c]^2) * mean_j k[j,c]^2``.
    """
    V.tensor("q_obs", q_obs, ndim=4, kind="float")
    V.tensor("k", k, ndim=4, kind="float")
    V.same_device(q_obs=q_obs, k=k)
    b, hq, tobs, d = q_obs.shape
    _, hkv, t, _ = k.shape
    V.dim_eq("k", k.shape[0], b, "batch size")
    V.dim_eq("k", k.shape[3], d, "head dim (equal to q_obs's)")
    g = V.gqa("q_obs", hq, hkv)
    if tobs == 0:
        raise ValueError("q_obs must hold at least one observation query (Tobs >= 1)")
    if t == 0:
        raise ValueError("k must hold at least one token (T >= 1)")
    qe = q_obs.float().pow(2).mean(dim=2).reshape(b, hkv, g, d).sum(dim=2)
    ke = k.float().pow(2).mean(dim=2)
    return qe * ke


def think_kept_dim(d: int, prune_ratio: float, multiple: int = THINK_CHANNEL_MULTIPLE) -> int:
    """Key channels ThinK keeps of ``d``: ``d - floor(prune_ratio * d)`` rounded up to a multiple of
    ``multiple``, capped at ``d`` (λ=0.4: 80 of 128 and 48 of 64 at the default 16, 77 and 39 at 1).

    Rounding up keeps the next-best channels by score in the extra slots (no zero padding), so a
    stored pruned key row is a whole number of 16-channel vectors for the kernels.

    Raises:
        ValueError: ``prune_ratio`` outside ``[0, 1)``, ``multiple < 1``, or no channel left.
    """
    if isinstance(prune_ratio, bool) or not isinstance(prune_ratio, (int, float)) or not 0.0 <= prune_ratio < 1.0:
        raise ValueError(f"prune_ratio must be a float in [0, 1), got {prune_ratio!r}")
    if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
        raise ValueError(f"multiple must be an int >= 1, got {multiple!r}")
    keep = d - math.floor(prune_ratio * d)
    if keep < 1:
        raise ValueError(f"prune_ratio={prune_ratio} leaves no channel of D={d}")
    return min(d, -(-keep // multiple) * multiple)


def think_keep_channels(scores: torch.Tensor, prune_ratio: float,
                        multiple: int = THINK_CHANNEL_MULTIPLE) -> torch.Tensor:
    """Channels to keep: the :func:`think_kept_dim` highest scores per KV head.

    Args:
        scores: ``[B, Hkv, D]`` from :func:`think_channel_scores`.
        prune_ratio: fraction of channels to drop, ``0 <= prune_ratio < 1`` (before rounding).
        multiple: the kept count is rounded up to a multiple of it (capped at ``D``).
    Returns:
        ``[B, Hkv, D_keep]`` int64, ascending. Equal scores prefer the lower channel index.
    """
    V.tensor("scores", scores, ndim=3, kind="float")
    d_keep = think_kept_dim(scores.shape[-1], prune_ratio, multiple)
    if not torch.isfinite(scores).all():
        raise ValueError("scores must be finite")
    order = torch.sort(scores.float(), dim=-1, descending=True, stable=True).indices
    return order[..., :d_keep].sort(dim=-1).values


def _check_idx(name: str, idx: torch.Tensor, b: int, hkv: int, d: int) -> None:
    V.tensor(name, idx, ndim=3, kind="int")
    if tuple(idx.shape[:2]) != (b, hkv):
        raise ValueError(f"{name} must be [B={b}, Hkv={hkv}, D_keep], got {tuple(idx.shape)}")
    if idx.shape[2] > d:
        raise ValueError(f"{name} keeps {idx.shape[2]} channels but D={d}")
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= d):
        raise ValueError(f"{name} has channel ids outside [0, {d})")


def pack_pruned_keys(k: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather the kept channels of each KV head.

    Args:
        k: ``[B, Hkv, T, D]``.
        idx: ``[B, Hkv, D_keep]`` integer channel ids.
    Returns:
        ``[B, Hkv, T, D_keep]`` in ``k.dtype``.
    """
    V.tensor("k", k, ndim=4)
    V.same_device(k=k, idx=idx)
    b, hkv, t, d = k.shape
    _check_idx("idx", idx, b, hkv, d)
    ix = idx.long()[:, :, None, :].expand(b, hkv, t, idx.shape[2])
    return torch.gather(k, 3, ix)


def pruned_key_attention(q: torch.Tensor, k_pruned: torch.Tensor, chan_idx: torch.Tensor, k_full: torch.Tensor,
                         v: torch.Tensor, *, scale: float | None = None, q_pos: torch.Tensor | None = None) -> torch.Tensor:
    """Causal attention over ``T_p`` channel-pruned keys followed by ``T_f`` full-width keys.

    Args:
        q: ``[B, Hq, Tq, D]`` (full head dim).
        k_pruned: ``[B, Hkv, T_p, D_keep]`` keys at positions ``0..T_p-1`` (from :func:`pack_pruned_keys`).
        chan_idx: ``[B, Hkv, D_keep]`` channel ids of ``k_pruned``.
        k_full: ``[B, Hkv, T_f, D]`` keys at positions ``T_p..T_p+T_f-1``.
        v: ``[B, Hkv, T_p+T_f, Dv]``.
        scale: default ``1/sqrt(D)`` with the full ``D`` (ThinK keeps the original scale).
        q_pos: ``[Tq]`` or ``[B, Tq]``; default ``T - Tq + arange(Tq)`` (bottom-right, ``T = T_p+T_f``).
    Returns:
        ``[B, Hq, Tq, Dv]`` in ``q.dtype``. Logits of pruned tokens are ``q[chan_idx[h//G]] . k_pruned``.
    """
    V.tensor("q", q, ndim=4, kind="float")
    V.tensor("k_pruned", k_pruned, ndim=4, kind="float")
    V.tensor("k_full", k_full, ndim=4, kind="float")
    V.tensor("v", v, ndim=4, kind="float")
    V.same_device(q=q, k_pruned=k_pruned, chan_idx=chan_idx, k_full=k_full, v=v)
    b, hq, tq, d = q.shape
    hkv = k_full.shape[1]
    g = V.gqa("q", hq, hkv)
    _check_idx("chan_idx", chan_idx, b, hkv, d)
    dk = chan_idx.shape[2]
    tp, tf = k_pruned.shape[2], k_full.shape[2]
    if tuple(k_pruned.shape) != (b, hkv, tp, dk):
        raise ValueError(f"k_pruned must be [B={b}, Hkv={hkv}, T_p, D_keep={dk}], got {tuple(k_pruned.shape)}")
    if tuple(k_full.shape) != (b, hkv, tf, d):
        raise ValueError(f"k_full must be [B={b}, Hkv, T_f, D={d}], got {tuple(k_full.shape)}")
    t = tp + tf
    if tuple(v.shape[:3]) != (b, hkv, t):
        raise ValueError(f"v must be [B={b}, Hkv={hkv}, T_p+T_f={t}, Dv], got {tuple(v.shape)}")
    sc = V.scale_or_default(scale, d)
    qp = V.query_positions(q_pos, b, tq, t, q.device, what="T_p+T_f")
    vis = (torch.arange(t, device=q.device)[None, None, :] <= qp[:, :, None])[:, None, None]  # [B|1,1,1,Tq,T]
    qf = q.float().reshape(b, hkv, g, tq, d)
    ix = chan_idx.long()[:, :, None, None, :].expand(b, hkv, g, tq, dk)
    qg = torch.gather(qf, 4, ix)  # [B, Hkv, G, Tq, D_keep]
    kpt = k_pruned.float().unsqueeze(2).transpose(-1, -2)
    kft = k_full.float().unsqueeze(2).transpose(-1, -2)
    vf = v.float()

    def block(s: int, e: int) -> torch.Tensor:
        logits = torch.cat([torch.matmul(qg[:, :, :, s:e], kpt), torch.matmul(qf[:, :, :, s:e], kft)], dim=-1) * sc
        return softmax_av(logits, vis[..., s:e, :], vf)

    o = chunked(tq, t, hq, b, block)
    return o.reshape(b, hq, tq, v.shape[3]).to(q.dtype)
