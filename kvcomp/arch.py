"""Per-layer attention of a transformers model config: the one home of "which layers slide" and
"the RoPE table of layer ``l``", used by the transformers path, the vLLM backend and calibration.

Hybrid models mix layer types: Gemma 3 (``layer_types``: five local sliding-window layers with RoPE
base 10K per global layer with base 1M), Qwen2 (``use_sliding_window`` from ``max_window_layers``
on), Mistral (``sliding_window`` on every layer). A sliding layer is already bounded, so kvcomp
leaves it uncompressed and attends with the window exactly as the model does; the full-attention
("global") layers get the method.

:func:`layer_rope` computes the table from the config as transformers does (the vLLM worker has
no HF module); :func:`model_layer_ropes` reads the tables from the model's own rotary module(s)
(the transformers path). Both agree (tested per architecture).
"""

from __future__ import annotations

import torch

FULL, SLIDING = "full_attention", "sliding_attention"


def text_config(cfg):
    """The decoder's config (a multimodal wrapper's ``text_config``, else ``cfg`` itself)."""
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


def layer_types(cfg) -> list[str]:
    """``full_attention`` / ``sliding_attention`` of every decoder layer.

    ``config.layer_types`` when the config has one (Gemma 3, Qwen2/Qwen3, gpt-oss); otherwise every
    layer slides when ``sliding_window`` is set (Mistral), else every layer is full.

    Raises:
        ValueError: a layer type kvcomp does not serve (e.g. chunked or linear attention), named.
    """
    c = text_config(cfg)
    n = int(c.num_hidden_layers)
    types = getattr(c, "layer_types", None)
    if types is None:
        types = [SLIDING if getattr(c, "sliding_window", None) else FULL] * n
    types = list(types)
    if len(types) != n:
        raise ValueError(f"config.layer_types has {len(types)} entries for {n} layers")
    bad = sorted({t for t in types if t not in (FULL, SLIDING)})
    if bad:
        raise ValueError(f"layer types {bad} are not served by kvcomp (it serves {FULL} and {SLIDING} layers)")
    return types


def layer_windows(cfg) -> list[int | None]:
    """Sliding window of every layer (tokens a query sees, itself included), None on global layers.

    Raises:
        ValueError: a sliding layer without a positive ``sliding_window``, or an unknown layer type.
    """
    c = text_config(cfg)
    types = layer_types(c)
    if SLIDING not in types:
        return [None] * len(types)
    w = getattr(c, "sliding_window", None)
    if isinstance(w, bool) or not isinstance(w, int) or w < 1:
        raise ValueError(f"config has sliding-window layers but sliding_window={w!r} (need a positive int)")
    return [w if t == SLIDING else None for t in types]


def _rope_params(c, layer_type: str) -> dict:
    params = getattr(c, "rope_parameters", None) or {}
    if isinstance(params.get(layer_type), dict):  # per layer type (Gemma 3)
        return params[layer_type]
    legacy = dict(getattr(c, "rope_scaling", None) or {})
    return {**legacy, **params}


def layer_rope(cfg, layer: int, head_dim: int | None = None) -> tuple[torch.Tensor, float]:
    """``(inv_freq [D/2] fp32, attention_scaling)`` of layer ``layer``'s RoPE, as transformers
    computes it from the config (per layer type when ``rope_parameters`` is keyed by layer type).

    Raises:
        ValueError: no ``rope_theta``, partial rotary embeddings, or a RoPE type transformers does
            not know.
    """
    c = text_config(cfg)
    types = layer_types(c)
    if not 0 <= layer < len(types):
        raise ValueError(f"layer {layer} outside the model's {len(types)} layers")
    lt = types[layer]
    d = head_dim or getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    p = _rope_params(c, lt)
    partial = p.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise ValueError(f"kvcomp: partial rotary embeddings (factor {partial}) are not supported")
    rope_type = p.get("rope_type") or p.get("type") or "default"
    if rope_type == "default":
        theta = p.get("rope_theta", getattr(c, "rope_theta", None))
        if theta is None:
            raise ValueError("kvcomp: the model config has no rope_theta (kvcomp needs a RoPE model)")
        return 1.0 / (float(theta) ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d)), 1.0
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    fn = ROPE_INIT_FUNCTIONS.get(rope_type)
    if fn is None:
        raise ValueError(f"kvcomp: RoPE type {rope_type!r} unknown to transformers")
    per_type = isinstance((getattr(c, "rope_parameters", None) or {}).get(lt), dict)
    inv, scaling = fn(c, torch.device("cpu"), layer_type=lt) if per_type else fn(c, torch.device("cpu"))
    return inv.float().cpu(), float(scaling)


def model_layer_ropes(model) -> list[tuple[torch.Tensor, float]]:
    """``(inv_freq, attention_scaling)`` of every layer, read from the model's rotary module(s):
    a module's ``inv_freq`` buffer (one RoPE for the model) or its ``<layer_type>_inv_freq`` and
    ``<layer_type>_attention_scaling`` (Gemma 3's local and global RoPE).

    Raises:
        ValueError: no rotary module covers some layer type (kvcomp needs a RoPE model).
    """
    types = layer_types(model.config)
    found: dict[str, tuple[torch.Tensor, float]] = {}
    for m in model.modules():
        for lt in set(types) - set(found):
            inv = getattr(m, f"{lt}_inv_freq", None)
            if isinstance(inv, torch.Tensor):
                found[lt] = (inv.detach().float().cpu(), float(getattr(m, f"{lt}_attention_scaling", 1.0)))
        inv = getattr(m, "inv_freq", None)
        if isinstance(inv, torch.Tensor):
            for lt in set(types) - set(found):
                found[lt] = (inv.detach().float().cpu(), float(getattr(m, "attention_scaling", 1.0)))
    missing = sorted(set(types) - set(found))
    if missing:
        raise ValueError(f"model has no rotary embedding module with `inv_freq` (or `<layer type>_inv_freq`) "
                         f"for its {', '.join(missing)} layers: kvcomp needs a RoPE model")
    return [found[lt] for lt in types]
