"""The ``kvcomp`` attention function for transformers and :func:`compress`."""

from __future__ import annotations

import torch

from ..arch import layer_windows
from ..config import CompressionConfig
from .cache import KVCompCache, RopeInfo

ATTN_NAME = "kvcomp"


def kvcomp_attention(module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask,
                     scaling: float | None = None, dropout: float = 0.0, **kwargs):
    """transformers attention interface: ``query [B,Hq,Tq,D]`` -> ``([B,Tq,Hq,D], None)``.

    ``key``/``value`` are the new tokens handed back by :class:`KVCompCache`'s ``update``; the
    layer behind them attends over its compressed storage and commits the new tokens. The model's
    ``sliding_window`` must be the one the config recorded for the layer (a sliding layer attends
    with it, uncompressed); attention sinks and logit soft-capping are refused.
    """
    layer = getattr(key, "kvcomp_layer", None)
    if layer is None:
        raise RuntimeError("attn_implementation='kvcomp' needs a KVCompCache as past_key_values "
                           "(build it with kvcomp.hf.compress(model, config))")
    if dropout:
        raise ValueError("kvcomp attention is inference-only (dropout must be 0)")
    unsupported = [name for name, on in (("attention sinks (s_aux)", kwargs.get("s_aux") is not None),
                                         ("logit soft-capping", bool(kwargs.get("softcap")))) if on]
    if unsupported:
        raise ValueError(f"kvcomp's HF path does not support {', '.join(unsupported)} (layer {layer.layer_idx})")
    want = layer.cfg.window(layer.layer_idx)
    if kwargs.get("sliding_window") != want:
        raise ValueError(f"layer {layer.layer_idx}: the model attends with sliding window "
                         f"{kwargs.get('sliding_window')}, the kvcomp config has {want} "
                         "(build it with CompressionConfig.for_model(model, ...))")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out = layer.attend(query, scale)
    return out.transpose(1, 2).contiguous(), None


def _kvcomp_mask(*args, attention_mask=None, **kwargs):
    """Mask hook: kvcomp builds its own causal masks; padded batches are rejected, never ignored."""
    if attention_mask is not None and attention_mask.dim() == 2 and not bool(attention_mask.all()):
        raise ValueError("kvcomp's HF path does not support padded batches (attention_mask has zeros): "
                         "run equal-length prompts or batch size 1")
    return None


def register() -> None:
    """Register the ``kvcomp`` attention (and mask) function with transformers. Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTN_NAME, kvcomp_attention)
    AttentionMaskInterface.register(ATTN_NAME, _kvcomp_mask)


def compress(model, config: CompressionConfig, *, pin_host: bool | None = None) -> KVCompCache:
    """Switch ``model`` to kvcomp attention and return a fresh :class:`KVCompCache` for one generation.

    Example::

        cache = compress(model, cfg)
        out = model.generate(ids, past_key_values=cache, max_new_tokens=16, do_sample=False)
        cache.kv_bytes_per_token()   # {'device': ..., 'host': ...}

    Call :func:`restore` (or set the attention implementation back) to use the model uncompressed.
    """
    c = model.config
    hkv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    if (config.num_layers, config.num_kv_heads, config.head_dim) != (c.num_hidden_layers, hkv, d):
        raise ValueError(f"config is for {config.num_layers} layers x {config.num_kv_heads} KV heads x d={config.head_dim}, "
                         f"model has {c.num_hidden_layers} x {hkv} x d={d}")
    windows = layer_windows(c)
    if [config.window(l) for l in range(config.num_layers)] != windows:
        raise ValueError(f"config's per-layer sliding windows {config.windows} differ from the model's {windows} "
                         "(build the config with CompressionConfig.for_model(model, ...))")
    register()
    if getattr(model.config, "_attn_implementation", None) != ATTN_NAME:
        model._kvcomp_prev_attn = model.config._attn_implementation
        model.set_attn_implementation(ATTN_NAME)
    return KVCompCache(config, RopeInfo.per_layer(model), pin_host=pin_host)


def restore(model) -> None:
    """Undo :func:`compress`'s attention switch."""
    prev = getattr(model, "_kvcomp_prev_attn", None)
    if prev is not None:
        model.set_attn_implementation(prev)
        del model._kvcomp_prev_attn
