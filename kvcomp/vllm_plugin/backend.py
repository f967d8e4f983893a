"""kvcomp's vLLM attention backend (registered as ``CUSTOM``; over ``CPU_ATTN`` on request).

Page layout. vLLM hands each layer a logical ``kv_cache [num_blocks, H, block_size, C]`` view
(any physical stride order; we only index it), shaped per method by :meth:`customize_spec`:

* off: ``H = Hkv``, ``C = D + Dv`` (key then value), like stock vLLM;
* ThinK: ``C = D_keep + Dv`` (the kept key channels, then the value); the last ``window`` keys
  stay full width in a per-request ring (:mod:`.ring`);
* DuoAttention: ``H`` = the retrieval heads (``num_head_slots``); the streaming heads keep their
  sink + recent tokens in a per-request ring sized to whole pages;
* A²ATS: ``C`` = one int16 code cell per KV head; the full K/V lives in the host mirror
  (:mod:`.mirror`), attention in :mod:`.vq`;
* DuoAttention + A²ATS: code cells of the retrieval heads; the streaming heads' K/V in the mirror.

vLLM's block count, and so its KV capacity, follows the page size. Writes happen in
:meth:`KVCompAttentionImpl.do_kv_cache_update` (``forward_includes_kv_cache_update = False``): new
tokens go to ``slot_mapping`` slots (``block * block_size + offset``, ``-1`` = padding, skipped).
:meth:`KVCompAttentionImpl.forward` runs causal varlen attention (prefill, chunked prefill and
decode in one batch): one-token requests (vLLM puts them first: ``reorder_batch_threshold = 1``)
go through kvcomp's ops (:mod:`.decode`): the Triton decode kernels on the GPU, their references
on the CPU; multi-token requests per request (:mod:`.prefill`): keys gathered from the pages, then
flash_attn / SDPA, and the Triton streaming kernel for DuoAttention's streaming heads on the GPU.
Rings and code cells, which need the tokens' positions, are written in ``forward``.
Every method computes what kvcomp's HF path computes (the tests compare tokens).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .. import ops
from ..ops._dispatch import use_triton
from . import ENV_TRACE
from . import compat as C
from . import decode as D
from . import prefill as P
from .mirror import mirror_bytes, mirror_for
from .plan import Plan, kv_head_range, layer_index, plan_from_env
from .ring import register_ring, ring_capacity, ring_of
from .vq import VQLayer, rope_from_hf_config

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
        if plan.method != "off":
            raise RuntimeError(f"kvcomp {plan.method} pages need vLLM >= 0.32 (customize_spec / "
                               f"state_content_bytes / CircularBufferSpec); running {C.VLLM_VERSION}")
        return C.kv_cache_shape(num_blocks, block_size, num_kv_heads, head_size)

    @classmethod
    def customize_spec(cls, spec):
        """The page of each method: retrieval heads only (Duo), ``D_keep + Dv`` elements (ThinK),
        one code cell per KV head (A²ATS)."""
        plan = plan_from_env()
        elem = torch.empty((), dtype=spec.dtype).element_size()
        if plan.streaming is not None:  # pages hold the retrieval heads only
            plan.check_model(spec.head_size)
            n_str = plan.rank_num_streaming(spec.num_kv_heads, *C.tp_rank_and_size())
            cell = {"state_content_bytes": max(2, elem)} if plan.vq is not None else {}  # Duo + A²ATS
            return C.replace_spec(spec, num_head_slots=spec.num_kv_heads - n_str, **cell)
        if plan.vq is not None:  # int16 code cells; K/V in the host mirror
            plan.check_model(spec.head_size)
            return C.replace_spec(spec, state_content_bytes=max(2, elem))
        if plan.key_dim is None:
            return spec
        plan.check_model(spec.head_size)
        return C.replace_spec(spec, state_content_bytes=(plan.key_dim + spec.head_size_v) * elem)


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
    query_start_loc_host: list[int] | None = None  # host copy (vLLM keeps one), else read on demand
    # computed by the first layer that needs them, then shared by every layer of the group
    _seq_lens_host: list[int] | None = field(default=None, repr=False)
    _rows: tuple | None = field(default=None, repr=False)

    def qsl_host(self) -> list[int]:
        """Host copy of ``query_start_loc`` (vLLM's CPU tensor when the builder had it: no sync)."""
        if self.query_start_loc_host is None:
            self.query_start_loc_host = self.query_start_loc.tolist()
        return self.query_start_loc_host

    def seq_lens_host(self) -> list[int]:
        """Host copy of ``seq_lens`` (one device sync per step, for the multi-token rows)."""
        if self._seq_lens_host is None:
            self._seq_lens_host = self.seq_lens.tolist()
        return self._seq_lens_host

    def rows(self):
        """``(decode rows, multi-token rows)``: :func:`.decode.split_rows`, once per step."""
        if self._rows is None:
            self._rows = D.split_rows(self, self.qsl_host())
        return self._rows


class KVCompMetadataBuilder(C.AttentionMetadataBuilder[KVCompAttentionMetadata]):
    """Slices vLLM's common metadata to the real requests; no CUDA graphs (eager only)."""

    _cudagraph_support: ClassVar = C.AttentionCGSupport.NEVER
    # one-token requests first: the decode rows go through kvcomp's ops (Triton on the GPU)
    reorder_batch_threshold: ClassVar[int] = 1

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
            query_start_loc_host=m.query_start_loc_cpu[: n + 1].tolist(),
        )


class KVCompAttentionImpl(C.AttentionImpl):
    """Attention over kvcomp pages (pure PyTorch; exact without compression)."""

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
        if self.plan.method != "off" and kv_sharing_target_layer_name is not None:
            raise ValueError(f"kvcomp {self.plan.method}: layers reading another layer's KV cache "
                             f"({kv_sharing_target_layer_name}) are not supported")
        self._channels: torch.Tensor | None = None  # [Hkv_local, D_keep] kept key channels
        self._layer_ready = False
        self._traced = False
        # DuoAttention: KV heads in the pages / in the ring, query heads reading each
        self._kv_ret: torch.Tensor | None = None
        self._kv_str: torch.Tensor | None = None
        self._q_ret: torch.Tensor | None = None
        self._q_str: torch.Tensor | None = None
        self.ring_name: str | None = None  # Duo streaming heads or ThinK's full-width window
        self._rope: tuple[torch.Tensor, float] | None = None  # A²ATS: (inv_freq, attention_scaling)
        self._vq: VQLayer | None = None
        self._hm: torch.Tensor | None = None  # [Hkv_local, 2] head map of the decode kernels

    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        """Register this layer's ring companion before vLLM collects KV specs; read A²ATS's RoPE."""
        p = self.plan
        if p.streaming is not None and p.vq is None:
            n_str = p.rank_num_streaming(self.num_kv_heads, *C.tp_rank_and_size())
            self.ring_name = register_ring(self, act_dtype, num_heads=n_str, content=2 * self.head_size,
                                           capacity=ring_capacity(p.sink + p.recent, n_str, self.num_kv_heads - n_str,
                                                                  C.current_vllm_config().cache_config.block_size))
        elif p.key_dim is not None and p.think_window > 0:
            self.ring_name = register_ring(self, act_dtype, num_heads=self.num_kv_heads, capacity=p.think_window,
                                           content=self.head_size)
        if p.vq is not None:
            self._rope = rope_from_hf_config(C.current_vllm_config().model_config.hf_config, self.head_size)

    # ------------------------------------------------------------------ per-layer setup
    def _setup_layer(self, layer, kv_cache: torch.Tensor) -> None:
        """Resolve this layer's heads, channels, codebooks (the layer index is known only here)."""
        self._layer_ready = True
        p = self.plan
        if p.method == "off":
            return
        rank, size = C.tp_rank_and_size()
        g = self.num_heads // self.num_kv_heads
        dev = kv_cache.device
        li = layer_index(layer.layer_name)
        if p.num_kv_heads is None:
            raise ValueError(f"kvcomp plan ({p.source}) has no num_kv_heads")
        p.check_model(self.head_size)
        heads = kv_head_range(self.num_kv_heads, p.num_kv_heads, rank, size)
        paged = list(range(heads[1] - heads[0]))  # local KV heads held in the pages
        if p.streaming is not None:
            paged, stream = p.rank_heads(li, *heads)
            self._kv_ret = torch.tensor(paged, device=dev)
            self._kv_str = torch.tensor(stream, device=dev)
            self._q_ret = torch.tensor([h * g + i for h in paged for i in range(g)], device=dev)
            self._q_str = torch.tensor([h * g + i for h in stream for i in range(g)], device=dev)
        if p.vq is not None:
            if self._rope is None:
                raise RuntimeError("kvcomp A2ATS: process_weights_after_loading did not run for this layer")
            # Duo + A²ATS: streaming heads need no device storage; their K/V sits in the mirror too
            mirror = mirror_for(layer.layer_name, num_blocks=kv_cache.shape[0], block_size=kv_cache.shape[2],
                                num_heads=heads[1] - heads[0], head_size=self.head_size, head_size_v=self.head_size,
                                dtype=kv_cache.dtype, layers_in_process=p.num_layers)
            self._vq = VQLayer(p.vq, li, [heads[0] + h for h in paged], self._rope[0], self._rope[1], dev, mirror)
        if p.streaming is not None or p.vq is not None:
            return
        self._channels = p.layer_channels(li, *heads).to(dev)

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
               "method": self.plan.method, "vllm": ".".join(map(str, C.VLLM_VERSION)),
               "ring": self.ring_name, "host_mirror_bytes": mirror_bytes(),
               "decode_ops": "triton" if use_triton(kv_cache) else "reference"}
        logger.info("kvcomp attention backend active: %s", rec)
        if path:
            with open(path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    # ------------------------------------------------------------------ vLLM entry points
    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        """Write new tokens into their pages (A²ATS: full K/V into the host mirror; codes are
        written by :meth:`forward`, which knows the tokens' positions).

        Args:
            key: ``[num_tokens, Hkv, D]`` (rows past ``len(slot_mapping)`` are padding).
            value: ``[num_tokens, Hkv, Dv]``.
            kv_cache: ``[num_blocks, Hkv, block_size, Dk + Dv]`` (A²ATS: code cells).
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
        if self._kv_ret is not None:
            # DuoAttention: streaming heads go to the ring in forward; with A²ATS the mirror holds
            # every head, retrieval heads first (their slice is the A²ATS mirror view)
            order = self._kv_ret if self._vq is None else torch.cat([self._kv_ret, self._kv_str])
            k, v = k.index_select(1, order), v.index_select(1, order)
        if not bool(keep.all()):
            slots, k, v = slots[keep], k[keep], v[keep]
        if slots.numel() == 0:
            return
        if self._vq is not None:
            self._vq.mirror.write(slots, k, v)
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
        """Causal varlen attention of the batch's queries over the layer's compressed cache.

        Args:
            query: ``[num_tokens, Hq, D]``; rows past ``num_actual_tokens`` are padding.
            key, value: this step's ``[num_tokens, Hkv, D]`` (already in the pages, except what
                rings and code pages take here).
            kv_cache: the layer's page view.
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
        md = attn_metadata
        n = md.num_actual_tokens
        q = query[:n]
        single, multi = md.rows()
        if self._kv_ret is not None:
            self._forward_duo(q, key[:n], value[:n], kv_cache, md, output, single, multi)
        elif self._vq is not None:
            self._vq.write_codes(key[:n], kv_cache, md)
            self._vq.attend(q, kv_cache, md, self.scale, output, multi, single)
        elif self._channels is not None:
            self._forward_think(q, key[:n], kv_cache, md, output, single, multi)
        else:
            k_cache, v_cache = self._split_cache(kv_cache)
            if single is not None:
                o = D.dense_decode(q[single.rows], k_cache, v_cache, self._head_map(kv_cache.device), single,
                                   self.scale)
                output[single.rows] = o.to(output.dtype)
            if multi is not None:
                P.dense_rows(q, k_cache, v_cache, md, multi.reqs, self.scale, output)
        return output

    def _head_map(self, device) -> torch.Tensor:
        """``[Hkv_local, 2]`` (kind, index) of the local KV heads (see :func:`.decode.head_map`)."""
        if self._hm is None:
            if self._kv_ret is None:
                self._hm = D.head_map(list(range(self.num_kv_heads)), [], device)
            else:
                self._hm = D.head_map(self._kv_ret.tolist(), self._kv_str.tolist(), device)
        return self._hm

    # ------------------------------------------------------------------ ThinK
    def _forward_think(self, q: torch.Tensor, k_new: torch.Tensor, kv_cache: torch.Tensor,
                       md: KVCompAttentionMetadata, output: torch.Tensor, single, multi) -> None:
        """Keys before the last ``window`` ones come pruned from the pages; the window (ring) and
        this step's own keys attend at full width, as kvcomp's HF ThinK path."""
        k_cache, v_cache = self._split_cache(kv_cache)
        w = self.plan.think_window
        ring, ring_block = ring_of(self.ring_name) if w else (None, None)
        if single is not None:
            rb = None if ring is None else ring_block.index_select(0, single.req_index)
            o = D.think_decode(q[single.rows], k_new[single.rows], k_cache, v_cache, self._channels.unsqueeze(0), ring,
                               rb, window=w, r=single, scale=self.scale, max_seq_len=md.max_seq_len)
            output[single.rows] = o.to(output.dtype)
        if multi is not None:
            P.think_rows(q, k_new, k_cache, v_cache, self._channels, ring, [] if ring is None else ring_block.tolist(),
                         w, md, multi.reqs, self.scale, output)

    # ------------------------------------------------------------------ DuoAttention
    def _forward_duo(self, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor, kv_cache: torch.Tensor,
                     md: KVCompAttentionMetadata, output: torch.Tensor, single, multi) -> None:
        """Retrieval heads: paged attention (A²ATS with codes). Streaming heads: sink + recent window
        over the ring (the mirror with codes) and this step's own keys; this step's keys then stay
        in the ring."""
        n = q.shape[0]
        sink, recent = self.plan.sink, self.plan.recent
        k_str, v_str = k_new.index_select(1, self._kv_str), v_new.index_select(1, self._kv_str)
        ring = ring_block = mirror_kv = None
        if self._vq is not None:  # Duo + A²ATS: retrieval heads are A²ATS heads, streaming heads read the mirror
            q_ret = q.index_select(1, self._q_ret)
            self._vq.write_codes(k_new.index_select(1, self._kv_ret), kv_cache, md)
            o = torch.empty(n, q_ret.shape[1], output.shape[-1], dtype=output.dtype, device=output.device)
            self._vq.attend(q_ret, kv_cache, md, self.scale, o, multi, single)
            output[:n].index_copy_(1, self._q_ret, o)
            n_ret = len(self._kv_ret)
            mirror_kv = (self._vq.mirror.k[:, :, n_ret:], self._vq.mirror.v[:, :, n_ret:])
            if single is not None:
                idx, count = D.streaming_selection(single.seq_lens, mirror_kv[0].shape[2], sink, recent)
                o = ops.sparse_attention_host(q[single.rows].index_select(1, self._q_str), *mirror_kv, idx, count,
                                              block_table=single.block_table, scale=self.scale)
                output[single.rows[:, None], self._q_str[None, :]] = o.to(output.dtype)
        else:
            k_cache, v_cache = self._split_cache(kv_cache)
            ring, ring_block = ring_of(self.ring_name)  # [blocks, n_str, capacity, D + Dv]
            if single is not None:
                rb = ring_block.index_select(0, single.req_index)
                o = D.duo_decode(q[single.rows], k_str[single.rows], v_str[single.rows], k_cache, v_cache,
                                 self._head_map(q.device), ring, rb, sink=sink, recent=recent, r=single,
                                 scale=self.scale)
                output[single.rows] = o.to(output.dtype)
        if multi is None:
            return
        if self._vq is None:
            P.dense_rows(q.index_select(1, self._q_ret), k_cache, v_cache, md, multi.reqs, self.scale, output,
                         heads=self._q_ret)
        P.streaming_rows(q.index_select(1, self._q_str), k_str, v_str, sink=sink, recent=recent, ring=ring,
                         blocks=None if ring is None else ring_block.tolist(), mirror_kv=mirror_kv, md=md,
                         reqs=multi.reqs, scale=self.scale, output=output, heads=self._q_str)
