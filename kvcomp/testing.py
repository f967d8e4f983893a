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
