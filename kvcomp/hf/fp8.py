"""The transformers path over e4m3 K/V: the reference for vLLM's ``--kv-cache-dtype fp8``.

vLLM's fp8 pages hold each key as the e4m3 value of ``k / k_scale`` (values: ``v_scale``); kvcomp's
backend hands every method the values its fp8 pages and rings hold (:mod:`kvcomp.methods.fp8`).
Inside :func:`rounded_kv`, kvcomp's HF cache (:class:`kvcomp.hf.cache.KVCompLayer`) takes every
new key and value rounded the same way before it stores them, so ``kvcomp.hf`` generation with a
config is the reference that dequantises (compression off: a config without methods).
"""

from __future__ import annotations

import contextlib

from ..ref.fp8 import dequantize_fp8, quantize_fp8
from .cache import KVCompLayer


@contextlib.contextmanager
def rounded_kv(k_scale: float = 1.0, v_scale: float = 1.0):
    """kvcomp's HF cache stores K/V rounded to e4m3 with these scales (vLLM's default: 1.0, a
    checkpoint without scales) while the block runs; restored on exit."""
    update = KVCompLayer.update

    def rounded(self, k, v, *args, **kwargs):
        k = dequantize_fp8(quantize_fp8(k, k_scale), k_scale, k.dtype)
        v = dequantize_fp8(quantize_fp8(v, v_scale), v_scale, v.dtype)
        return update(self, k, v, *args, **kwargs)

    KVCompLayer.update = rounded
    try:
        yield
    finally:
        KVCompLayer.update = update
