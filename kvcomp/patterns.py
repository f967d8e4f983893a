"""DuoAttention head patterns: duo-attention's ``full_attention_heads.tsv`` format and thresholding.

The TSV holds one row per layer and one tab-separated column per KV head; each value is the
trained gate alpha (1 = retrieval / full attention, 0 = streaming). Published patterns contain tiny
negative values, which are clipped to [0, 1] on load.
"""

from __future__ import annotations

import os

import torch


def read_pattern_tsv(path: str | os.PathLike) -> torch.Tensor:
    """Read gate values ``[num_layers, num_kv_heads]`` (float32, clipped to [0, 1])."""
    rows: list[list[float]] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                rows.append([float(x) for x in line.split("\t") if x.strip() != ""])
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: not a tab-separated row of numbers ({e})") from None
    if not rows:
        raise ValueError(f"{path}: empty pattern file")
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise ValueError(f"{path}: rows have different numbers of heads {sorted(widths)}")
    return torch.tensor(rows, dtype=torch.float32).clamp_(0.0, 1.0)


def write_pattern_tsv(path: str | os.PathLike, alphas: torch.Tensor) -> None:
    """Write gate values ``[num_layers, num_kv_heads]`` in duo-attention's TSV format."""
    if alphas.dim() != 2:
        raise ValueError(f"alphas must be [num_layers, num_kv_heads], got shape {tuple(alphas.shape)}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in alphas.detach().float().cpu().tolist():
            f.write("\t".join(repr(float(x)) for x in row) + "\n")


def threshold_pattern(alphas: torch.Tensor, sparsity: float, *, seed: int = 0) -> torch.Tensor:
    """Return the streaming mask ``[L, Hkv]`` bool (True = streaming head) at a target sparsity.

    As in duo-attention's ``sparsify_attention_heads``: the threshold is the global ``sparsity``
    quantile of all gates; heads with alpha >= threshold stay retrieval heads. Ties are broken with
    tiny deterministic noise so that exactly ``round(sparsity * L * Hkv)`` heads stream.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    a = alphas.detach().float().flatten()
    g = torch.Generator().manual_seed(seed)
    a = a + torch.rand(a.shape, generator=g) * 1e-6
    n_stream = int(round(sparsity * a.numel()))
    mask = torch.zeros(a.numel(), dtype=torch.bool)
    if n_stream > 0:
        mask[torch.argsort(a)[:n_stream]] = True
    return mask.view_as(alphas)


def threshold_pattern_per_layer(alphas: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Streaming mask ``[L, Hkv]`` with the same number of streaming heads in every layer.

    Each layer streams its ``clamp(floor(sparsity * Hkv), 1, Hkv - 1)`` lowest-gate heads (equal
    gates: the lower head index streams first): never more than asked, except the one head
    DuoAttention needs to save anything. vLLM pages are uniform per KV-cache group, so
    kvcomp's vLLM backend needs this layout; the HF path takes any pattern.
    """
    if not 0.0 <= sparsity <= 1.0:
        raise ValueError(f"sparsity must be in [0, 1], got {sparsity}")
    a = alphas.detach().float()
    if a.dim() != 2 or a.shape[1] < 2:
        raise ValueError(f"alphas must be [L, Hkv] with Hkv >= 2, got {tuple(a.shape)}")
    h = a.shape[1]
    n = min(max(int(sparsity * h + 1e-9), 1), h - 1)
    order = torch.sort(a, dim=1, stable=True).indices[:, :n]
    return torch.zeros(a.shape, dtype=torch.bool).scatter_(1, order, True)
