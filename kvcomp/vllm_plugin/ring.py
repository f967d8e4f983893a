"""Per-request rings owned by vLLM's scheduler: DuoAttention's streaming heads, ThinK's full-width tail.

An attention layer registers a companion :class:`KVCompRingLayer` in the forward context (from
``process_weights_after_loading``, before vLLM collects KV specs). Its ``CircularBufferSpec``
makes vLLM give every request one ring block for its whole lifetime, allocated and freed with the
request and counted in vLLM's capacity; the ring group's block table (``[num_reqs, 1]``) is the
stable per-request address. What a ring holds and where is the method's business
(:mod:`kvcomp.methods.duo`, :mod:`kvcomp.methods.think`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from . import compat as C


@dataclass
class RingMetadata:
    """Per-batch metadata of a ring group: ``ring_block [num_reqs]`` block ids."""

    ring_block: torch.Tensor


class KVCompRingBuilder(C.AttentionMetadataBuilder[RingMetadata]):
    """The ring group's block table holds one block per request: its ring."""

    _cudagraph_support: ClassVar = C.AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata, fast_build: bool = False) -> RingMetadata:
        m = common_attn_metadata
        return RingMetadata(ring_block=m.block_table_tensor[: int(m.num_reqs), 0])


class KVCompRingBackend(C.AttentionBackend):
    """Backend of the ring companion layers (metadata only; the main layer's Impl does the work)."""

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @staticmethod
    def get_impl_cls():
        # vLLM's protocol: supports_pcp/supports_dcp catch NotImplementedError to mean "no Impl"
        raise NotImplementedError("ring layers have no attention implementation of their own")

    @staticmethod
    def get_builder_cls() -> type[KVCompRingBuilder]:
        return KVCompRingBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list:
        return [C.MultipleOf(1)]


class KVCompRingLayer(nn.Module, C.AttentionLayerBase):
    """A ring of ``capacity`` tokens x ``num_heads`` heads x ``content`` elements per request.

    View bound by vLLM: ``kv_cache [num_blocks, num_heads, capacity', content]`` (``capacity'``
    may be enlarged by vLLM's page-size unification; only the first ``capacity`` slots are used).
    """

    def __init__(self, name: str, num_heads: int, head_size: int, capacity: int, dtype: torch.dtype,
                 content: int):
        super().__init__()
        self.layer_name = name
        self.num_heads = num_heads
        self.head_size = head_size
        self.capacity = capacity
        self.dtype = dtype
        self.content = content
        self.kv_cache = torch.tensor([])

    def get_kv_cache_spec(self, vllm_config):
        elem = torch.empty((), dtype=self.dtype).element_size()
        return C.CircularBufferSpec(block_size=self.capacity, num_kv_heads=self.num_heads, head_size=self.head_size,
                                    dtype=self.dtype, state_content_bytes=self.content * elem)

    def get_attn_backend(self):
        return KVCompRingBackend

    def forward(self):
        raise RuntimeError("ring layers are read and written by their attention layer's Impl")


def layer_name(impl) -> str:
    """Name of the attention layer whose Impl is ``impl`` (from ``process_weights_after_loading`` on).

    Raises:
        RuntimeError: the Impl's layer is not in the forward context.
    """
    ctx = C.current_vllm_config().compilation_config.static_forward_context
    name = next((n for n, m in ctx.items() if getattr(m, "impl", None) is impl), None)
    if name is None:
        raise RuntimeError("kvcomp: attention layer of this Impl not found in the forward context")
    return name


def page_dtype(impl, act_dtype: torch.dtype) -> torch.dtype:
    """The dtype of ``impl``'s layer's pages, which its ring takes too (``uint8`` with
    ``--kv-cache-dtype fp8``; ``act_dtype`` where vLLM names none)."""
    ctx = C.current_vllm_config().compilation_config.static_forward_context
    return getattr(ctx[layer_name(impl)], "kv_cache_torch_dtype", act_dtype)


def register_ring(impl, act_dtype: torch.dtype, *, num_heads: int, capacity: int, content: int) -> str:
    """Register the ring companion of ``impl``'s attention layer; returns the ring's layer name.

    Called from ``process_weights_after_loading`` (the vLLM config is current then).

    Raises:
        ValueError: prefix caching is on (a cache hit would start a request with an empty ring: the
            ring holds the streaming heads' K/V and ThinK's full-width keys, which no page keeps).
        RuntimeError: the Impl's layer is not in the forward context.
    """
    cfg = C.current_vllm_config()
    if cfg.cache_config.enable_prefix_caching:
        raise ValueError(f"kvcomp {impl.plan.method}: its per-request ring (DuoAttention's streaming heads on "
                         "exact pages, ThinK's full-width window) holds tokens the cached pages do not, so a prefix-"
                         "cache hit would start a request with an empty ring; serve with --no-enable-prefix-caching "
                         "(LLM(enable_prefix_caching=False)). A2ATS and DuoAttention + A2ATS keep every token in "
                         "the pages and the host mirror and serve with prefix caching on")
    ctx = cfg.compilation_config.static_forward_context
    name = layer_name(impl)
    ring_name = name + "_kvcomp_ring"
    if ring_name not in ctx:
        ctx[ring_name] = KVCompRingLayer(ring_name, num_heads, impl.head_size, capacity, page_dtype(impl, act_dtype),
                                         content)
    return ring_name


def set_layer_spec(impl, spec_of) -> None:
    """Make the KV-cache spec of ``impl``'s attention layer ``spec_of(vLLM's spec)``: a page of this
    layer's own (vLLM's ``customize_spec`` hook gets the spec, not the layer). Set on the layer
    instance from ``process_weights_after_loading``, before vLLM collects the specs; idempotent."""
    mod = C.current_vllm_config().compilation_config.static_forward_context[layer_name(impl)]
    if getattr(mod, "_kvcomp_spec_of", None) is not None:
        return
    original = mod.get_kv_cache_spec

    def get_kv_cache_spec(vllm_config):
        spec = original(vllm_config)
        return None if spec is None else spec_of(spec)

    mod._kvcomp_spec_of = spec_of
    mod.get_kv_cache_spec = get_kv_cache_spec


def ring_of(ring_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ring view [blocks, heads, capacity', content], ring block id per request [num_reqs])`` of
    this step (the ids stay on the device)."""
    metas, layers = C.forward_context()
    return layers[ring_name].kv_cache, metas[ring_name].ring_block
