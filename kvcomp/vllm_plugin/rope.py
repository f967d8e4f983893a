"""The model's RoPE table as transformers computes it from the HF config (A²ATS un-rotates keys and
queries with it)."""

from __future__ import annotations

import torch


def rope_from_hf_config(hf_config, head_size: int) -> tuple[torch.Tensor, float]:
    """``(inv_freq [D/2], attention_scaling)`` of the model's RoPE, as transformers computes them.

    Raises:
        ValueError: partial rotary embeddings or a RoPE type transformers does not know.
    """
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    legacy = dict(getattr(hf_config, "rope_scaling", None) or {})
    rope_type = params.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    partial = params.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"kvcomp A2ATS: partial rotary embeddings (factor {partial}) are not supported")
    if rope_type == "default":
        theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
        if theta is None:
            raise ValueError("kvcomp A2ATS: the model config has no rope_theta")
        inv = 1.0 / (float(theta) ** (torch.arange(0, head_size, 2, dtype=torch.int64).float() / head_size))
        return inv, 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    fn = ROPE_INIT_FUNCTIONS.get(rope_type)
    if fn is None:
        raise ValueError(f"kvcomp A2ATS: RoPE type {rope_type!r} unknown to transformers")
    inv, scaling = fn(hf_config, torch.device("cpu"))
    return inv.float().cpu(), float(scaling)
