"""kvcomp's vLLM attention backend (registered as ``CUSTOM``; over ``CPU_ATTN`` on request).

Page layout. vLLM hands each layer a logical ``kv_cache [num_blocks, Hkv, block_size, C]`` view
(any physical stride order; we only index it). Content per (block, KV head, token):
``C = Dk + Dv`` elements, ``[:Dk]`` the key and ``[Dk:]`` the value, where ``Dk = D`` without
compression and ``Dk = D_keep`` with ThinK (page bytes shrink through ``customize_spec`` /
``state_content_bytes``; vLLM's block count, and so its KV capacity, grows accordingly).

Writes happen in :meth:`KVCompAttentionImpl.do_kv_cache_update` (``forward_includes_kv_cache_update
= False``): new tokens go to ``slot_mapping`` slots (``block * block_size + offset``, ``-1`` =
padding, skipped), keys packed to the kept channels. :meth:`KVCompAttentionImpl.forward` runs
causal varlen paged attention (prefill, chunked prefill and decode in one batch) through the
pure-PyTorch reference ``kvcomp.ref.paged_attention``; ThinK gathers each query head to its KV
head's kept channels first and keeps the scale of the full head dim.

DuoAttention: the pages hold only the retrieval KV heads (``num_head_slots``); each attention layer
registers a companion :class:`KVCompRingLayer` (from ``process_weights_after_loading``, before vLLM
collects KV specs) whose ``CircularBufferSpec`` gives every request one ring block of
``sink + recent`` tokens for the layer's streaming heads, allocated and freed by vLLM's scheduler
and addressed through the ring group's block table. Position ``p`` lives in ring slot ``p`` if
``p < sink`` else ``sink + (p - sink) % recent``. Streaming heads attend over the ring (tokens
before this step) plus this step's own keys; the ring is written after attending, so a prefill
chunk never overwrites keys its own earlier queries still need.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..ref.attention import paged_attention
from ..ref.streaming import streaming_attention
from . import ENV_TRACE
from . import compat as C
from .plan import Plan, kv_head_range, layer_index, plan_from_env

# a child of "vllm" so that vLLM's log handler (and its level setting) prints it
logger = logging.getLogger("vllm.kvcomp")


class KVCompAttentionBackend(C.AttentionBackend):
    """Backend class vLLM resolves from the registry (see :mod:`kvcomp.vllm_plugin`)."""

    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16", "float32"]

    @staticmethod
    def get_name() -> str:
        # must name an existing enum member: the spawned engine core resolves it by name
        return "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type["KVCompAttentionImpl"]:
        return KVCompAttentionImpl

    @staticmethod
    def get_builder_cls() -> type["KVCompMetadataBuilder"]:
        return KVCompMetadataBuilder

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list:
        return [C.MultipleOf(16)]

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [32, 64, 80, 96, 112, 128, 160, 192, 256]

    @staticmethod
    def get_kv_cache_shape(num_blocks: int, block_size: int, num_kv_heads: int, head_size: int,
                           cache_dtype_str: str = "auto") -> tuple[int, ...]:
        """vLLM 0.26 hook (later versions derive the view from the spec)."""
        plan = plan_from_env()
        if plan.key_dim is not None:
            raise RuntimeError("ThinK pages need vLLM >= 0.32 (customize_spec / state_content_bytes); "
                               f"running {C.VLLM_VERSION}")
        return C.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size)

    @classmethod
    def customize_spec(cls, spec):
        """Shrink the page content to ``D_keep + Dv`` elements per token when ThinK is on."""
        plan = plan_from_env()
        if plan.streaming is not None:  # pages hold the retrieval heads only
            plan.check_model(spec.head_size, spec.num_kv_heads)
            return C.replace_spec(spec, num_head_slots=spec.num_kv_heads - plan.num_streaming)
        if plan.key_dim is None:
            return spec
        plan.check_model(spec.head_size)
        elem = torch.empty((), dtype=spec.dtype).element_size()
        return C.replace_spec(spec, state_content_bytes=(plan.key_dim + spec.head_size_v) * elem)


@dataclass
class RingMetadata:
    """Per-batch metadata of a DuoAttention ring group: ``ring_block [num_reqs]`` block ids."""

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
    """DuoAttention streaming heads of one attention layer: a ring of ``sink + recent`` tokens
    per request, allocated by vLLM's scheduler (``CircularBufferSpec``, one block per request).

    View bound by vLLM: ``kv_cache [num_blocks, n_streaming, capacity, D + Dv]`` (capacity may be
    enlarged by vLLM's page-size unification; only the first ``sink + recent`` slots are used).
    """

    def __init__(self, name: str, num_heads: int, head_size: int, capacity: int, dtype: torch.dtype):
        super().__init__()
        if C.CircularBufferSpec is None:
            raise RuntimeError(f"DuoAttention in vLLM needs CircularBufferSpec (vLLM >= 0.32), running {C.VLLM_VERSION}")
        self.layer_name = name
        self.num_heads = num_heads
        self.head_size = head_size
        self.capacity = capacity
        self.dtype = dtype
        self.kv_cache = torch.tensor([])

    def get_kv_cache_spec(self, vllm_config):
        return C.CircularBufferSpec(block_size=self.capacity, num_kv_heads=self.num_heads,
                                    head_size=self.head_size, dtype=self.dtype)

    def get_attn_backend(self):
        return KVCompRingBackend

    def forward(self):
        raise RuntimeError("ring layers are read and written by their attention layer's Impl")


@dataclass
class KVCompAttentionMetadata:
    """Per-batch metadata (shared by all layers of a KV-cache group).

    Shapes: ``query_start_loc [num_reqs+1]``, ``seq_lens [num_reqs]``, ``block_table
    [num_reqs, max_blocks]`` (int32), ``slot_mapping [num_actual_tokens]`` (int64).
    """

    num_reqs: int
    num_actual_tokens: int
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_table: torch.Tensor
    slot_mapping: torch.Tensor


class KVCompMetadataBuilder(C.AttentionMetadataBuilder[KVCompAttentionMetadata]):
    """Slices vLLM's common metadata to the real requests; no CUDA graphs (eager only)."""

    _cudagraph_support: ClassVar = C.AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata, fast_build: bool = False) -> KVCompAttentionMetadata:
        m = common_attn_metadata
        n = int(m.num_reqs)
        return KVCompAttentionMetadata(
            num_reqs=n,
            num_actual_tokens=int(m.num_actual_tokens),
            max_query_len=int(m.max_query_len),
            max_seq_len=int(m.max_seq_len),
            query_start_loc=m.query_start_loc[: n + 1],
            seq_lens=m.seq_lens[:n],
            block_table=m.block_table_tensor[:n],
            slot_mapping=m.slot_mapping[: int(m.num_actual_tokens)],
        )


class KVCompAttentionImpl(C.AttentionImpl):
    """Paged attention over kvcomp pages (pure PyTorch; exact without compression)."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes=None, sliding_window: int | None = None, kv_cache_dtype: str = "auto",
                 logits_soft_cap: float | None = None, attn_type: str = C.AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, **extra) -> None:
        unsupported = []
        if alibi_slopes is not None:
            unsupported.append("ALiBi")
        if sliding_window is not None:
            unsupported.append(f"sliding window {sliding_window}")
        if logits_soft_cap:
            unsupported.append(f"logits soft cap {logits_soft_cap}")
        if attn_type != C.AttentionType.DECODER:
            unsupported.append(f"attention type {attn_type}")
        if extra.get("sinks") is not None:
            unsupported.append("attention sinks")
        if kv_cache_dtype not in KVCompAttentionBackend.supported_kv_cache_dtypes:
            unsupported.append(f"kv_cache_dtype {kv_cache_dtype}")
        if unsupported:
            raise ValueError("kvcomp vLLM backend does not support: " + ", ".join(unsupported))
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        self.sliding_window = None
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.plan: Plan = plan_from_env()
        self._channels: torch.Tensor | None = None  # [Hkv_local, D_keep] kept key channels
        self._q_index: torch.Tensor | None = None  # [Hq, D_keep] channels per query head
        self._layer_ready = False
        self._traced = False
        # DuoAttention: KV heads in the pages / in the ring, query heads reading each, ring layer
        self._kv_ret: torch.Tensor | None = None
        self._kv_str: torch.Tensor | None = None
        self._q_ret: torch.Tensor | None = None
        self._q_str: torch.Tensor | None = None
        self.ring_name: str | None = None
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # this step's streaming K, V

    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        """DuoAttention: register this layer's ring companion before vLLM collects KV specs."""
        if self.plan.streaming is None:
            return
        cfg = C.current_vllm_config()
        if cfg.cache_config.enable_prefix_caching:
            raise ValueError("kvcomp DuoAttention rings are per request and not prefix-cacheable: "
                             "serve with --no-enable-prefix-caching")
        ctx = cfg.compilation_config.static_forward_context
        name = next((n for n, m in ctx.items() if getattr(m, "impl", None) is self), None)
        if name is None:
            raise RuntimeError("kvcomp: attention layer of this Impl not found in the forward context")
        self.ring_name = name + "_kvcomp_ring"
        if self.ring_name not in ctx:
            dtype = getattr(ctx[name], "kv_cache_torch_dtype", act_dtype)
            ctx[self.ring_name] = KVCompRingLayer(self.ring_name, self.plan.num_streaming, self.head_size,
                                                  self.plan.sink + self.plan.recent, dtype)

    # ------------------------------------------------------------------ per-layer setup
    def _setup_layer(self, layer, kv_cache: torch.Tensor) -> None:
        """Resolve this layer's kept channels once (layer index known only from the module)."""
        self._layer_ready = True
        if self.plan.streaming is not None:
            rank, size = C.tp_rank_and_size()
            if size != 1:
                raise ValueError("kvcomp DuoAttention in vLLM supports tensor parallel size 1 only")
            ret, stream = self.plan.layer_heads(layer_index(layer.layer_name))
            g = self.num_heads // self.num_kv_heads
            dev = kv_cache.device
            self._kv_ret = torch.tensor(ret, device=dev)
            self._kv_str = torch.tensor(stream, device=dev)
            self._q_ret = torch.tensor([h * g + i for h in ret for i in range(g)], device=dev)
            self._q_str = torch.tensor([h * g + i for h in stream for i in range(g)], device=dev)
            return
        if self.plan.key_dim is None:
            return
        if self.kv_sharing_target_layer_name is not None:
            raise ValueError(f"{layer.layer_name} reads the KV cache of {self.kv_sharing_target_layer_name}: "
                             "ThinK pages of shared-KV layers are not supported")
        rank, size = C.tp_rank_and_size()
        total = self.plan.num_kv_heads
        if total is None:
            raise ValueError("kvcomp plan has ThinK channels but no num_kv_heads")
        self.plan.check_model(self.head_size)
        start, end = kv_head_range(self.num_kv_heads, total, rank, size)
        ch = self.plan.layer_channels(layer_index(layer.layer_name), start, end)
        self._channels = ch.to(kv_cache.device)
        g = self.num_heads // self.num_kv_heads
        self._q_index = self._channels.repeat_interleave(g, dim=0)

    def _split_cache(self, kv_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Views ``k [num_blocks, block_size, Hkv, Dk]``, ``v [..., Dv]`` of the layer's pages."""
        dk = self.head_size if self._channels is None else self._channels.shape[1]
        dv = kv_cache.shape[-1] - dk
        heads = self.num_kv_heads if self._kv_ret is None else len(self._kv_ret)
        if dv <= 0 or kv_cache.shape[1] != heads:
            raise ValueError(f"kv_cache: expected [blocks, {heads}, block_size, {dk}+Dv], "
                             f"got {tuple(kv_cache.shape)}")
        kv = kv_cache.permute(0, 2, 1, 3)
        return kv[..., :dk], kv[..., dk:]

    def _trace(self, layer, kv_cache: torch.Tensor) -> None:
        self._traced = True
        path = os.environ.get(ENV_TRACE, "").strip()
        rec = {"pid": os.getpid(), "layer": getattr(layer, "layer_name", "?"),
               "kv_cache_shape": list(kv_cache.shape), "dtype": str(kv_cache.dtype),
               "method": self.plan.method, "vllm": ".".join(map(str, C.VLLM_VERSION))}
        logger.info("kvcomp attention backend active: %s", rec)
        if path:
            with open(path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    # ------------------------------------------------------------------ vLLM entry points
    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        """Write new tokens into their pages.

        Args:
            key: ``[num_tokens, Hkv, D]`` (rows past ``len(slot_mapping)`` are padding).
            value: ``[num_tokens, Hkv, Dv]``.
            kv_cache: ``[num_blocks, Hkv, block_size, Dk + Dv]``.
            slot_mapping: ``[n]`` int, ``block * block_size + offset``; negative = skip.
        """
        if kv_cache.numel() == 0:
            return
        if not self._layer_ready:
            self._setup_layer(layer, kv_cache)
        n = slot_mapping.shape[0]
        slots = slot_mapping.to(torch.long)
        keep = slots >= 0
        k, v = key[:n], value[:n]
        if self._kv_ret is not None:  # DuoAttention: the ring is written by forward, after attending
            self._pending = (k.index_select(1, self._kv_str), v.index_select(1, self._kv_str))
            k, v = k.index_select(1, self._kv_ret), v.index_select(1, self._kv_ret)
        if not bool(keep.all()):
            slots, k, v = slots[keep], k[keep], v[keep]
        if slots.numel() == 0:
            return
        if self._channels is not None:
            k = k.gather(2, self._channels.unsqueeze(0).expand(k.shape[0], -1, -1))
        bs = kv_cache.shape[2]
        blk, off = slots // bs, slots % bs
        dk = k.shape[2]
        kv_cache[blk, :, off, :dk] = k.to(kv_cache.dtype)
        kv_cache[blk, :, off, dk:] = v.to(kv_cache.dtype)

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: KVCompAttentionMetadata | None, output: torch.Tensor,
                output_scale: torch.Tensor | None = None, output_block_scale: torch.Tensor | None = None,
                **kwargs) -> torch.Tensor:
        """Causal varlen paged attention of the batch's queries over the pages.

        Args:
            query: ``[num_tokens, Hq, D]``; rows past ``num_actual_tokens`` are padding.
            kv_cache: ``[num_blocks, Hkv, block_size, Dk + Dv]``.
            attn_metadata: None during vLLM's profiling run (nothing to do).
            output: ``[num_tokens, Hq, Dv]``, written in place and returned.
        """
        if output_scale is not None or output_block_scale is not None:
            raise ValueError("kvcomp vLLM backend: fused output quantization is not supported")
        if attn_metadata is None:
            return output
        if not self._layer_ready:
            self._setup_layer(layer, kv_cache)
        if not self._traced:
            self._trace(layer, kv_cache)
        n = attn_metadata.num_actual_tokens
        q = query[:n]
        if self._kv_ret is not None:
            self._forward_duo(q, kv_cache, attn_metadata, output)
            return output
        if self._q_index is not None:
            q = q.gather(2, self._q_index.unsqueeze(0).expand(n, -1, -1))
        k_cache, v_cache = self._split_cache(kv_cache)
        o = paged_attention(q, k_cache, v_cache, attn_metadata.block_table, attn_metadata.seq_lens,
                            attn_metadata.query_start_loc, scale=self.scale)
        output[:n] = o.to(output.dtype)
        return output

    # ------------------------------------------------------------------ DuoAttention
    def _forward_duo(self, q: torch.Tensor, kv_cache: torch.Tensor, md: KVCompAttentionMetadata,
                     output: torch.Tensor) -> None:
        """Retrieval heads: paged attention. Streaming heads: sink + recent window over the ring
        (tokens before this step) and this step's own keys; then this step's keys enter the ring."""
        n = q.shape[0]
        k_cache, v_cache = self._split_cache(kv_cache)
        o = paged_attention(q.index_select(1, self._q_ret), k_cache, v_cache, md.block_table, md.seq_lens,
                            md.query_start_loc, scale=self.scale)
        output[:n].index_copy_(1, self._q_ret, o.to(output.dtype))
        if self._pending is None or self._pending[0].shape[0] != n:
            raise RuntimeError("kvcomp DuoAttention: forward without this step's do_kv_cache_update")
        k_new, v_new = self._pending
        self._pending = None
        metas, layers = C.forward_context()
        ring_md = metas[self.ring_name]
        ring = layers[self.ring_name].kv_cache  # [blocks, n_str, capacity, D + Dv]
        d = self.head_size
        sink, recent = self.plan.sink, self.plan.recent
        qsl = md.query_start_loc.tolist()
        lens = md.seq_lens.tolist()
        blocks = ring_md.ring_block.tolist()
        q_str = q.index_select(1, self._q_str)
        for b, seq_len in enumerate(lens):
            s0, e0 = qsl[b], qsl[b + 1]
            if e0 == s0:
                continue
            ctx = seq_len - (e0 - s0)
            r = ring[blocks[b]]  # [n_str, capacity, D + Dv]
            old_pos = list(range(min(sink, ctx))) + list(range(max(sink, ctx - recent), ctx))
            old_slot = [p if p < sink else sink + (p - sink) % recent for p in old_pos]
            new_pos = list(range(ctx, seq_len))
            idx = torch.tensor(old_slot, dtype=torch.long, device=r.device)
            k = torch.cat([r[:, idx, :d], k_new[s0:e0].transpose(0, 1).to(r.dtype)], dim=1)
            v = torch.cat([r[:, idx, d:], v_new[s0:e0].transpose(0, 1).to(r.dtype)], dim=1)
            k_pos = torch.tensor(old_pos + new_pos, device=r.device)
            qb = q_str[s0:e0].transpose(0, 1).unsqueeze(0)
            ob = streaming_attention(qb, k.unsqueeze(0), v.unsqueeze(0), sink=sink, window=recent, scale=self.scale,
                                     q_pos=torch.tensor(new_pos, device=r.device), k_pos=k_pos)
            output[s0:e0].index_copy_(1, self._q_str, ob[0].transpose(0, 1).to(output.dtype))
            # this step's tokens that the ring keeps: the sink ones and the last `recent` ones
            keep = [i for i, p in enumerate(new_pos) if p < sink or p >= max(sink, seq_len - recent)]
            if keep:
                ki = torch.tensor(keep, dtype=torch.long, device=r.device)
                slot = torch.tensor([new_pos[i] if new_pos[i] < sink else sink + (new_pos[i] - sink) % recent
                                     for i in keep], dtype=torch.long, device=r.device)
                r[:, slot, :d] = k_new[s0:e0].index_select(0, ki).transpose(0, 1).to(r.dtype)
                r[:, slot, d:] = v_new[s0:e0].index_select(0, ki).transpose(0, 1).to(r.dtype)
