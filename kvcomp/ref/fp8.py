"""fp8 pages (vLLM's ``--kv-cache-dtype fp8``): e4m3 bytes of ``x / scale``, dequantised on read.

vLLM hands an fp8 layer ``uint8`` pages and one scale per layer for keys and one for values
(``layer._k_scale_float`` / ``_v_scale_float``: 1.0 unless the checkpoint or
``calculate_kv_scales`` sets them). A stored byte is ``float8_e4m3fn(x / scale)`` (saturated at
+-448, the format's largest finite value); reading multiplies back.
"""

from __future__ import annotations

import torch

from .attention import paged_attention

#: the fp8 format of the pages and its largest finite value
FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)


def quantize_fp8(x: torch.Tensor, scale: float) -> torch.Tensor:
    """``uint8`` bytes of ``float8_e4m3fn(x / scale)``, saturated to +-448.

    Raises:
        ValueError: ``scale`` is not a positive finite number.
    """
    if not (scale > 0 and scale < float("inf")):
        raise ValueError(f"scale: fp8 scale must be positive and finite, got {scale}")
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8).view(torch.uint8)


def dequantize_fp8(q: torch.Tensor, scale: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values of fp8 bytes ``q`` (``uint8``) times ``scale``, in ``dtype``.

    Raises:
        ValueError: ``q`` is not ``uint8``.
    """
    if q.dtype != torch.uint8:
        raise ValueError(f"q: fp8 pages are uint8, got {q.dtype}")
    return (q.view(FP8).float() * scale).to(dtype)


def paged_attention_fp8(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                        seq_lens: torch.Tensor, query_start_loc: torch.Tensor, *, k_scale: float, v_scale: float,
                        scale: float | None = None) -> torch.Tensor:
    """:func:`kvcomp.ref.attention.paged_attention` over fp8 pages ``k_cache [blocks, block_size,
    Hkv, D]`` / ``v_cache`` (``uint8``), dequantised with their scales in ``q``'s dtype."""
    return paged_attention(q, dequantize_fp8(k_cache, k_scale, q.dtype), dequantize_fp8(v_cache, v_scale, q.dtype),
                           block_table, seq_lens, query_start_loc, scale=scale)
