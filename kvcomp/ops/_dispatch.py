"""Which implementation an op runs: Triton on CUDA tensors or under ``TRITON_INTERPRET=1``, else the
pure-PyTorch reference (CPU tensors in an ordinary process)."""

from __future__ import annotations

import os

import torch


def use_triton(t: torch.Tensor) -> bool:
    """True when the op should launch its Triton kernel for tensors on ``t``'s device."""
    return t.device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
