"""Comparison helpers shared by tests and benchmarks."""

from __future__ import annotations

import torch


def error_stats(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    """Return (max absolute error, relative RMS error) of ``out`` against ``ref`` in fp64."""
    r = ref.detach().double().cpu()
    o = out.detach().double().cpu()
    if r.shape != o.shape:
        raise AssertionError(f"shape mismatch: ref {tuple(r.shape)} vs out {tuple(o.shape)}")
    diff = (r - o).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    denom = float(r.pow(2).mean().sqrt()) if r.numel() else 0.0
    rms = float(diff.pow(2).mean().sqrt()) if diff.numel() else 0.0
    return max_abs, rms / max(denom, 1e-12)


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, ratio: float = 1e-5, atol: float | None = None) -> None:
    """Fail unless ``out`` matches ``ref``: relative RMS error <= ratio (and max-abs <= atol if given).

    NaN or inf in ``out`` where ``ref`` is finite always fails.
    """
    if torch.isnan(out).any() and not torch.isnan(ref).any():
        raise AssertionError(f"{name}: output has NaN")
    max_abs, rel = error_stats(ref, out)
    msg = f"{name}: max_abs={max_abs:.3e} rel_rms={rel:.3e} (ratio {ratio:.1e})"
    if not (rel <= ratio):
        raise AssertionError(msg)
    if atol is not None and not (max_abs <= atol):
        raise AssertionError(msg + f" atol {atol:.1e}")


def assert_equal(name: str, ref: torch.Tensor, out: torch.Tensor) -> None:
    """Exact match, for index and code outputs."""
    if ref.shape != out.shape or not torch.equal(ref.cpu(), out.cpu()):
        bad = (ref.cpu() != out.cpu()).sum().item() if ref.shape == out.shape else "shape"
        raise AssertionError(f"{name}: not equal ({bad} differing)")


def ring_pool(k_stream: torch.Tensor, v_stream: torch.Tensor, *, capacity: int, spare_rings: int, seed: int = 0,
              fill: float = float("nan")) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One ring per request ``k_stream, v_stream [B, n, S, D]`` moved into a pool as vLLM's ring pages
    hold them: K and V side by side in one ``[B + spare_rings, n, capacity, 2D]`` tensor, request ``b``'s
    ring at a permuted id, ``fill`` in the spare rings and in slots past ``S`` (``capacity < S``
    keeps the first ``capacity`` slots: a ring not filled yet). Returns ``(k view, v view, ring ids
    [B] int32)`` (views with a ``2D`` slot stride)."""
    b, n, s, d = k_stream.shape
    ids = torch.randperm(b + spare_rings, generator=torch.Generator().manual_seed(seed))[:b].to(k_stream.device)
    pool = torch.full((b + spare_rings, n, capacity, 2 * d), fill, dtype=k_stream.dtype, device=k_stream.device)
    keep = min(s, capacity)
    pool[ids, :, :keep, :d] = k_stream[:, :, :keep]
    pool[ids, :, :keep, d:] = v_stream[:, :, :keep]
    return pool[..., :d], pool[..., d:], ids.to(torch.int32)
