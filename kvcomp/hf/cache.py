"""A transformers ``Cache`` that stores the KV cache compressed, with real savings.

Each layer's KV heads are split into the config's head groups (:meth:`CompressionConfig.layer_groups`:
exact, ThinK, DuoAttention streaming, A²ATS, A²ATS over ThinK keys), each run by its method object
(:mod:`kvcomp.methods`, the same objects kvcomp's vLLM backend uses) over its own storage: one
block per sequence, grown to exactly the tokens it holds (what a method frees is never allocated).

``update`` only stashes the new tokens; the ``kvcomp`` attention function (:mod:`.attention`)
attends and commits them (ThinK needs the prompt's queries to choose channels). A step of more
than one token runs the methods' prefill rows (the first chunk is exact on every head except
DuoAttention's streaming heads, as in DuoAttention and the vLLM backend); a one-token step runs
their decode through :mod:`kvcomp.ops`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from .. import ref
from ..arch import model_layer_ropes
from ..config import CompressionConfig
from ..methods.layout import Split, build_hf_layer
from ..methods.step import Step


@dataclass
class RopeInfo:
    """A layer's rotary embedding: ``inv_freq [D/2]`` and ``attention_scaling``."""

    inv_freq: torch.Tensor
    attention_scaling: float = 1.0

    @classmethod
    def per_layer(cls, model) -> list["RopeInfo"]:
        """Every layer's RoPE, read from the model's rotary module(s) (:func:`kvcomp.arch.model_layer_ropes`:
        Gemma 3's local and global tables differ)."""
        return [cls(inv, scaling) for inv, scaling in model_layer_ropes(model)]

    def cos_sin(self, pos: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        return ref.rope_cos_sin(pos.to(device), self.inv_freq.to(device), self.attention_scaling)


#: one step's metadata, built by the first layer and shared by the others (no per-layer rebuild)
_uniform_step = functools.lru_cache(maxsize=8)(Step.uniform)


class KVCompLayer(CacheLayerMixin):
    """One decoder layer's compressed KV: an adapter that hands the layer's method objects
    (:func:`kvcomp.methods.layout.build_hf_layer`) one block per sequence and the step's metadata."""

    is_compileable = False
    is_croppable = False
    is_sliding = False
    supports_early_init = False

    def __init__(self, config: CompressionConfig, layer_idx: int, rope: RopeInfo, pin_host: bool = False):
        super().__init__()
        self.cfg, self.layer_idx, self.rope, self.pin_host = config, layer_idx, rope, pin_host
        self.seen = 0
        self.pending: tuple[torch.Tensor, torch.Tensor] | None = None
        self.split: Split | None = None

    # ------------------------------------------------------------ CacheLayerMixin API
    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self.pending is not None:
            raise RuntimeError(
                "KVCompCache: new tokens were cached but never attended; the model must run with "
                "attn_implementation='kvcomp' (use kvcomp.hf.compress(model, config))")
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.pending = (key_states, value_states)
        key_states.kvcomp_layer = self  # the handle the kvcomp attention function looks up
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.seen + query_length, 0

    def get_seq_length(self) -> int:
        return self.seen

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.seen, self.pending, self.split = 0, None, None

    def reorder_cache(self, beam_idx) -> None:
        raise RuntimeError("KVCompCache does not support beam search (reorder_cache): use greedy or sampling")

    # ------------------------------------------------------------ bytes
    def tensors(self):
        """Yield ``(tier, tensor)`` for every tensor this layer holds; tier is 'device' or 'host'."""
        if self.split is not None:
            yield from self.split.tensors()

    # ------------------------------------------------------------ attention
    def attend(self, q: torch.Tensor, scale: float) -> torch.Tensor:
        """Attend ``q [B,Hq,Tq,D]`` over the cache plus the pending tokens, then commit them."""
        if self.pending is None:
            raise RuntimeError("kvcomp attention called without a KVCompCache update for this layer")
        k, v = self.pending
        self.pending = None
        b, hq, tq, d = q.shape
        hkv = k.shape[1]
        if hq % hkv:
            raise ValueError(f"query heads {hq} not a multiple of KV heads {hkv}")
        if hkv != self.cfg.num_kv_heads or d != self.cfg.head_dim:
            raise ValueError(f"layer {self.layer_idx}: model has {hkv} KV heads of dim {d}, config expects "
                             f"{self.cfg.num_kv_heads} of dim {self.cfg.head_dim}")
        if self.split is None:
            self.split = build_hf_layer(self.cfg, self.layer_idx, hq, scale,
                                        (self.rope.inv_freq.to(q.device), self.rope.attention_scaling), q.device)
        md = _uniform_step(b, self.seen, tq, self.seen + tq, q.device)
        packed = [t.transpose(1, 2).reshape(b * tq, t.shape[1], t.shape[3]) for t in (q, k, v)]
        out = self.split.step(*packed, md, head_dim=d, pin=self.pin_host)
        self.seen += tq
        return out.view(b, tq, hq, -1).transpose(1, 2)


class KVCompCache(Cache):
    """A transformers ``Cache`` holding the compressed KV of every layer.

    Use :func:`kvcomp.hf.compress` to build it and switch the model to the ``kvcomp`` attention.
    :meth:`kv_bytes` reports the bytes of the tensors really allocated, per tier.
    """

    def __init__(self, config: CompressionConfig, rope: RopeInfo | list[RopeInfo], pin_host: bool | None = None):
        if pin_host is None:
            pin_host = torch.cuda.is_available()
        self.config = config
        ropes = rope if isinstance(rope, list) else [rope] * config.num_layers
        if len(ropes) != config.num_layers:
            raise ValueError(f"{len(ropes)} RoPE tables for {config.num_layers} layers")
        super().__init__(layers=[KVCompLayer(config, l, ropes[l], pin_host) for l in range(config.num_layers)])

    def kv_bytes(self) -> dict[str, int]:
        """Allocated bytes per tier (``device``: on the model's device; ``host``: offloaded)."""
        return tensor_bytes(t for layer in self.layers for t in layer.tensors())

    def kv_bytes_per_token(self) -> dict[str, float]:
        n = self.get_seq_length() * self._batch()
        b = self.kv_bytes()
        return {k: (v / n if n else 0.0) for k, v in b.items()}

    def _batch(self) -> int:
        for layer in self.layers:
            for _, t in layer.tensors():
                return t.shape[0]
        return 1

    def selected_fraction(self) -> float | None:
        """Mean fraction of tokens the VQ heads attended at the last decode step (None if no VQ head)."""
        vals = [float(m.last_selected) for layer in self.layers if layer.split is not None
                for m in layer.split.methods() if getattr(m, "last_selected", None) is not None]
        return sum(vals) / len(vals) if vals else None


def tensor_bytes(tiered) -> dict[str, int]:
    """Sum ``untyped_storage().nbytes()`` of ``(tier, tensor)`` pairs, each storage counted once."""
    seen: set[int] = set()
    out = {"device": 0, "host": 0}
    for tier, t in tiered:
        s = t.untyped_storage()
        if s.data_ptr() in seen or s.nbytes() == 0:
            continue
        seen.add(s.data_ptr())
        out[tier] += s.nbytes()
    return out


def dynamic_cache_bytes(cache) -> dict[str, int]:
    """Allocated bytes of a stock ``DynamicCache`` (the full-cache baseline)."""
    return tensor_bytes(("device", t) for layer in cache.layers for t in (layer.keys, layer.values)
                        if isinstance(t, torch.Tensor))
