"""Codebook fitting for A²ATS (calibration, not a kernel reference).

Per layer and KV head: ``H = sum q~ q~^T`` over windowed-RoPE queries of the group, normalised by
its RMS; ``L = cholesky(H + eps I)`` so that ``(k-c) H (k-c)^T ~= ||(k-c) L||^2`` for row vectors;
k-means++ on ``k_pre @ L`` gives ``C'`` and the stored codebook is ``C = C' L^-1``. Distance blocks
are bounded by :data:`kvcomp.ref.vq._DIST_ELEMS` (shared with ``vq_encode``).
"""

from __future__ import annotations

import torch

from ..defaults import MAX_CODES
from ..ref import _validate as V
from ..ref import vq as _vq

def query_hessian(q_wrope: torch.Tensor) -> torch.Tensor:
    """Query second-moment matrix of the VQ objective ``E_q[(q.k - q.c)^2]``.

    Args:
        q_wrope: ``[N, D]`` windowed-RoPE queries (all query heads of the group stacked).
    Returns:
        ``[D, D]`` fp32, ``H = q^T q / rms(q^T q)`` (RMS over the D*D entries).
    """
    V.tensor("q_wrope", q_wrope, ndim=2, kind="float")
    if q_wrope.shape[0] == 0:
        raise ValueError("q_wrope must hold at least one query")
    q = q_wrope.double()
    h = q.T @ q
    rms = h.pow(2).mean().sqrt()
    if not torch.isfinite(rms) or rms == 0:
        raise ValueError("q_wrope gives a zero or non-finite Hessian")
    return (h / rms).float()


def whitening(h: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Lower Cholesky factor ``L`` of ``H + eps I`` (``L L^T = H + eps I``).

    Args:
        h: ``[D, D]`` symmetric positive semi-definite.
        eps: ridge added to the diagonal.
    Returns:
        ``[D, D]`` fp32 lower-triangular ``L``.
    """
    V.tensor("h", h, ndim=2, kind="float")
    d = h.shape[0]
    if h.shape[1] != d:
        raise ValueError(f"h must be square, got {tuple(h.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps < 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")
    hd = h.double()
    if not torch.allclose(hd, hd.T, rtol=1e-4, atol=1e-6 * float(hd.abs().max().clamp(min=1e-30))):
        raise ValueError("h must be symmetric")
    a = 0.5 * (hd + hd.T) + eps * torch.eye(d, dtype=torch.float64, device=h.device)
    l, info = torch.linalg.cholesky_ex(a)
    if int(info) != 0:
        raise ValueError(f"h + eps*I is not positive definite (eps={eps}); increase eps")
    return l.float()


def _nearest(x: torch.Tensor, x2: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest centroid of each row of ``x [N, D]`` among ``c [C, D]`` (chunked); (idx int64, dist)."""
    n, nc = x.shape[0], c.shape[0]
    c2 = (c * c).sum(1)
    ct = c.T.contiguous()
    step = max(1, _vq._DIST_ELEMS // max(nc, 1))
    idx = torch.empty(n, dtype=torch.long, device=x.device)
    dist = torch.empty(n, dtype=x.dtype, device=x.device)
    for s in range(0, n, step):
        e = min(n, s + step)
        d = torch.addmm(c2.unsqueeze(0), x[s:e], ct, alpha=-2.0)
        m, i = d.min(dim=1)
        idx[s:e] = i
        dist[s:e] = (m + x2[s:e]).clamp_(min=0)
    return idx, dist


def _kmeanspp(x: torch.Tensor, x2: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding: each new centroid is drawn with probability proportional to D(x)^2."""
    n = x.shape[0]
    u = torch.rand(k, generator=gen, dtype=torch.float64).to(x.device)
    c = torch.empty(k, x.shape[1], dtype=x.dtype, device=x.device)
    j = torch.clamp((u[0] * n).long(), max=n - 1)
    c[0] = x[j]
    dmin = torch.addmv(x2, x, c[0], alpha=-2.0).add_(x2[j]).clamp_(min=0)
    dmin[j] = 0.0
    for i in range(1, k):
        cum = torch.cumsum(dmin, 0, dtype=torch.float64)
        j = torch.searchsorted(cum, (u[i] * cum[-1]).reshape(1), right=True).clamp_(max=n - 1)[0]
        c[i] = x[j]
        d = torch.addmv(x2, x, c[i], alpha=-2.0).add_(x2[j]).clamp_(min=0)
        d[j] = 0.0
        torch.minimum(dmin, d, out=dmin)
    return c


def kmeans(x: torch.Tensor, n_codes: int, *, iters: int = 300, tol: float = 1e-4, seed: int = 0) -> torch.Tensor:
    """Lloyd k-means with k-means++ seeding (deterministic for a given ``seed``).

    Distances are computed in row chunks, so ``N=64K, D=64, n_codes=4096`` needs ~64 MiB of scratch.
    Stops after ``iters`` Lloyd steps, or once the mean squared centroid shift of a step is at most
    ``tol`` times the data's mean squared distance to its mean. An empty cluster is moved to the
    point currently farthest from its centroid.

    Args:
        x: ``[N, D]`` float, ``N >= n_codes``.
        n_codes: number of centroids.
        iters: maximum Lloyd iterations (0 returns the k-means++ seeds).
        tol: relative convergence threshold.
        seed: seed of the CPU ``torch.Generator`` that drives the seeding.
    Returns:
        ``[n_codes, D]`` in ``x.dtype`` (computed in fp32).
    """
    V.tensor("x", x, ndim=2, kind="float")
    if isinstance(n_codes, bool) or not isinstance(n_codes, int) or n_codes < 1:
        raise ValueError(f"n_codes must be a positive int, got {n_codes!r}")
    n = x.shape[0]
    if n < n_codes:
        raise ValueError(f"x has N={n} points, fewer than n_codes={n_codes}: cannot fit the codebook")
    V.nonneg_int("iters", iters)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or tol < 0:
        raise ValueError(f"tol must be a non-negative float, got {tol!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    xf = x.float()
    if not torch.isfinite(xf).all():
        raise ValueError("x must be finite")
    mu = xf.mean(0)
    xf = (xf - mu).contiguous()  # distances are shift-invariant; centring avoids cancellation
    x2 = (xf * xf).sum(1)
    gen = torch.Generator().manual_seed(seed)
    c = _kmeanspp(xf, x2, n_codes, gen)
    thresh = tol * float(x2.mean())
    for _ in range(iters):
        assign, dist = _nearest(xf, x2, c)
        counts = torch.bincount(assign, minlength=n_codes)
        sums = torch.zeros_like(c).index_add_(0, assign, xf)
        new = torch.where((counts > 0).unsqueeze(1), sums / counts.clamp(min=1).unsqueeze(1).to(xf.dtype), c)
        empty = (counts == 0).nonzero().flatten()
        if empty.numel():
            far = torch.topk(dist, empty.numel()).indices
            new[empty] = xf[far]
        shift = float((new - c).pow(2).sum(1).mean())
        c = new
        if empty.numel() == 0 and shift <= thresh:
            break
    return (c + mu).to(x.dtype)


def fit_codebook(k_pre: torch.Tensor, q_wrope: torch.Tensor, n_codes: int, *, iters: int = 300,
                 seed: int = 0, tol: float = 1e-4, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit one KV head's query-aware codebook.

    Args:
        k_pre: ``[N, D]`` pre-RoPE calibration keys.
        q_wrope: ``[M, D]`` windowed-RoPE calibration queries of the head's group.
        n_codes: codebook size (``<= 32768``, ``<= N``).
        iters, seed, tol: passed to :func:`kmeans`; eps: passed to :func:`whitening`.
    Returns:
        ``(codebook [n_codes, D] fp32, L [D, D] fp32)`` with ``codebook = kmeans(k_pre @ L) @ L^-1``.
    """
    V.tensor("k_pre", k_pre, ndim=2, kind="float")
    V.tensor("q_wrope", q_wrope, ndim=2, kind="float")
    V.same_device(k_pre=k_pre, q_wrope=q_wrope)
    V.dim_eq("q_wrope", q_wrope.shape[1], k_pre.shape[1], "head dim (equal to k_pre's)")
    if isinstance(n_codes, int) and n_codes > MAX_CODES:
        raise ValueError(f"n_codes={n_codes} exceeds {MAX_CODES} (codes are int16)")
    lw = whitening(query_hessian(q_wrope), eps)
    cw = kmeans(k_pre.float() @ lw, n_codes, iters=iters, tol=tol, seed=seed)
    codebook = torch.linalg.solve_triangular(lw.double(), cw.double(), upper=False, left=False)
    return codebook.float(), lw


# ----------------------------------------------------------------------------------------------
# decode-time retrieval
