"""A layer's RoPE table as transformers computes it from the HF config (A²ATS un-rotates keys and
queries with it). The vLLM worker has no HF module: the table comes from the config, per layer type
(Gemma 3's local and global bases), through :func:`kvcomp.arch.layer_rope`, the one home of "RoPE
of layer ``l``" (equal to what the HF rotary modules compute: tests/hf/test_architectures.py)."""

from __future__ import annotations

import torch

from ..arch import layer_rope


def rope_from_hf_config(hf_config, head_size: int, layer: int = 0) -> tuple[torch.Tensor, float]:
    """``(inv_freq [D/2], attention_scaling)`` of layer ``layer``'s RoPE, as transformers computes them.

    Raises:
        ValueError: partial rotary embeddings, no ``rope_theta``, or a RoPE type transformers does not know.
    """
    return layer_rope(hf_config, layer, head_size)
