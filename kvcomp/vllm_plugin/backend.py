"""kvcomp's vLLM attention backend (registered as ``CUSTOM``; over ``CPU_ATTN`` on request).

Page layout. vLLM hands each layer a logical ``kv_cache [num_blocks, H, block_size, C]`` view
(any physical stride order; we only index it), shaped per method by :meth:`customize_spec`:

* off: ``H = Hkv``, ``C = D + Dv`` (key then value), like stock vLLM;
* ThinK: ``C = D_keep + Dv`` (the kept key channels, then the value); the last ``window`` keys
  stay full width in a per-request ring (:mod:`.ring`); query-driven channels: their ids in one
  more ring slot, chosen at the request's first chunk (:class:`kvcomp.methods.layout.RequestChannels`);
* DuoAttention: ``H`` = the retrieval heads (``num_head_slots``); the streaming heads keep their
  sink + recent tokens in a per-request ring sized to whole pages;
* A²ATS: ``C`` = one int16 code cell per KV head; the full K/V lives in the host mirror
  (:mod:`.mirror`);
* DuoAttention + A²ATS: code cells of the retrieval heads; the streaming heads' K/V in the mirror;
* with ThinK besides (Duo + ThinK, ThinK + A²ATS, all three): narrow keys of the (retrieval) heads
  in the pages or the mirror, ThinK's window in the ring (shared with the streaming heads');
* a sliding-window layer (Gemma 3 local layers, Mistral, Qwen2): stock pages whatever the method
  (vLLM's ``SlidingWindowSpec`` group frees the blocks behind the window), attended over the
  window (:class:`kvcomp.methods.window.SlidingWindow`); the method runs on the global layers.

vLLM's block count, and so its KV capacity, follows the page size. Writes happen in
:meth:`KVCompAttentionImpl.do_kv_cache_update` (``forward_includes_kv_cache_update = False``): new
tokens go to ``slot_mapping`` slots (``block * block_size + offset``, ``-1`` = padding, skipped).
:meth:`KVCompAttentionImpl.forward` runs causal varlen attention (prefill, chunked prefill and
decode in one batch) by handing the layer's method object (:mod:`kvcomp.methods`, built by
:func:`kvcomp.methods.layout.build_layer`) its page views and the step's metadata
(:class:`kvcomp.methods.step.Step`, split into one-token and multi-token rows once per step by the
builder; vLLM puts decodes first: ``reorder_batch_threshold = 1``). The backend itself holds no
method logic. Rings and code cells, which need the tokens' positions, are written in ``forward``.
"""

from __future__ import annotations

import json
import logging
import os
from typing import ClassVar

import torch

from ..defaults import SUPPORTED_HEAD_DIMS
from ..methods import layout
from ..methods.duo import StreamingHeads
from ..methods.fp8 import Fp8Pages
from ..methods.step import Step
from ..ops._dispatch import impl_for
from . import ENV_TRACE
from . import compat as C
from .mirror import mirror_bytes, mirror_for
from .plan import Plan, kv_head_range, layer_index, plan_from_env
from .ring import layer_name, page_dtype, register_ring, ring_of, set_layer_spec
from .rope import rope_from_hf_config

# a child of "vllm" so that vLLM's log handler (and its level setting) prints it
logger = logging.getLogger("vllm.kvcomp")


class KVCompAttentionBackend(C.AttentionBackend):
    """Backend class vLLM resolves from the registry (see :mod:`kvcomp.vllm_plugin`)."""

    forward_includes_kv_cache_update: bool = False
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    # fp8: e4m3 pages and rings with the layer's scales (kvcomp.methods.fp8); A2ATS codes stay int16 cells
    supported_kv_cache_dtypes: ClassVar[list[str]] = ["auto", "float16", "bfloat16", "float32", "fp8", "fp8_e4m3"]

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
        # a layer whose every head streams is its own ring (any number of slots)
        return [C.MultipleOf(1 if isinstance(kv_cache_spec, C.CircularBufferSpec) else 16)]

    @classmethod
    def supported_kv_cache_layouts(cls):
        """Block-outermost layouts for a per-layer DuoAttention pattern (one page size per layer,
        packed into each block by vLLM); any layout otherwise."""
        return C.BLOCK_OUTER_LAYOUTS if plan_from_env().streaming_per_layer else None

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return True

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return list(SUPPORTED_HEAD_DIMS)

    @classmethod
    def customize_spec(cls, spec):
        """The page of each method (:func:`kvcomp.methods.layout.page_changes`)."""
        plan = layer_plan(getattr(spec, "sliding_window", None))
        plan.check_model(spec.head_size)
        if plan.streaming_per_layer:  # the layer's own page, set on the layer (see process_weights_after_loading)
            return spec
        elem = torch.empty((), dtype=spec.dtype).element_size()
        n_str = plan.rank_num_streaming(spec.num_kv_heads, *C.tp_rank_and_size())
        changes = layout.page_changes(plan, spec.num_kv_heads, spec.head_size, spec.head_size_v, elem, n_str)
        return C.replace_spec(spec, **changes) if changes else spec


def layer_plan(sliding_window: int | None) -> Plan:
    """A layer's plan: the configured one, or exact pages on a sliding-window layer (already bounded)."""
    return plan_from_env() if sliding_window is None else Plan(source=f"sliding window {sliding_window}")


#: per-step metadata: split into decode and multi-token rows once per step, shared by every layer
KVCompAttentionMetadata = Step


class KVCompMetadataBuilder(C.AttentionMetadataBuilder[Step]):
    """Slices vLLM's common metadata to the real requests and splits the rows once per step; no
    CUDA graphs (eager only)."""

    _cudagraph_support: ClassVar = C.AttentionCGSupport.NEVER
    # one-token requests first: the decode rows go through kvcomp's ops (Triton on the GPU)
    reorder_batch_threshold: ClassVar[int] = 1

    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)

    def build(self, common_prefix_len: int, common_attn_metadata, fast_build: bool = False) -> Step:
        m = common_attn_metadata
        n = int(m.num_reqs)
        step = Step(num_reqs=n, num_actual_tokens=int(m.num_actual_tokens), max_query_len=int(m.max_query_len),
                    max_seq_len=int(m.max_seq_len), query_start_loc=m.query_start_loc[: n + 1],
                    seq_lens=m.seq_lens[:n], block_table=m.block_table_tensor[:n],
                    slot_mapping=m.slot_mapping[: int(m.num_actual_tokens)],
                    query_start_loc_host=m.query_start_loc_cpu[: n + 1].tolist())
        step.rows()
        return step


class KVCompAttentionImpl(C.AttentionImpl):
    """Attention over kvcomp pages: delegates every layer to its method object (:mod:`kvcomp.methods`)."""

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes=None, sliding_window: int | None = None, kv_cache_dtype: str = "auto",
                 logits_soft_cap: float | None = None, attn_type: str = C.AttentionType.DECODER,
                 kv_sharing_target_layer_name: str | None = None, **extra) -> None:
        unsupported = []
        if alibi_slopes is not None:
            unsupported.append("ALiBi")
        if logits_soft_cap:
            unsupported.append(f"logits soft cap {logits_soft_cap}")
        if attn_type != C.AttentionType.DECODER:
            unsupported.append(f"attention type {attn_type}")
        if extra.get("sinks") is not None:
            unsupported.append("attention sinks")
        if kv_cache_dtype not in KVCompAttentionBackend.supported_kv_cache_dtypes:
            unsupported.append(f"kv_cache_dtype {kv_cache_dtype}")
        if head_size not in SUPPORTED_HEAD_DIMS:
            unsupported.append(f"head size {head_size} (kvcomp's kernels take {list(SUPPORTED_HEAD_DIMS)})")
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
        self.sliding_window = sliding_window
        self.kv_sharing_target_layer_name = kv_sharing_target_layer_name
        self.plan: Plan = layer_plan(sliding_window)
        if not self.plan.is_identity and kv_sharing_target_layer_name is not None:
            raise ValueError(f"kvcomp {self.plan.method}: layers reading another layer's KV cache "
                             f"({kv_sharing_target_layer_name}) are not supported")
        self.method = None  # the layer's method object, bound on the first call (the layer index is known then)
        self.ring_name: str | None = None  # DuoAttention's streaming heads or ThinK's full-width window
        self._hf_config = None  # A²ATS: the model's HF config, for this layer's RoPE table
        self._mirror = None
        self._traced = False
        self._act_dtype: torch.dtype | None = None  # the model's dtype (host mirror, dequantised fp8 pages)
        self._fp8: Fp8Pages | None = None  # fp8 K/V pages: the method sees them dequantised
        self._pages: tuple | None = None  # (page tensor, the Store of its views and the host pages): see _store
        self._page_heads: int | None = None  # per-layer DuoAttention pattern: retrieval heads in this layer's page
        self._own_ring = False  # per-layer DuoAttention pattern, every head streaming: the cache is the ring

    def process_weights_after_loading(self, act_dtype: torch.dtype) -> None:
        """Register this layer's ring companion before vLLM collects KV specs; keep the HF config
        (A²ATS reads the layer's RoPE from it)."""
        p = self.plan
        # a config made without the model's sliding windows: refused here, before serving
        plan_from_env().check_window(layer_index(layer_name(self)), self.sliding_window)
        n_str = p.layer_num_streaming(layer_index(layer_name(self)), self.num_kv_heads, *C.tp_rank_and_size())
        self._act_dtype = act_dtype
        if p.streaming_per_layer:
            req = self._per_layer_pages(n_str, act_dtype)
        else:
            elem = torch.empty((), dtype=page_dtype(self, act_dtype)).element_size()  # of the pages and the ring
            req = layout.ring_request(p, self.num_kv_heads, self.head_size, n_str,
                                      C.current_vllm_config().cache_config.block_size, elem)
        if req is not None:
            heads, tokens, content = req
            self.ring_name = register_ring(self, act_dtype, num_heads=heads, capacity=tokens, content=content)
        if layout.mirror_heads(p, self.num_kv_heads):
            self._hf_config = C.current_vllm_config().model_config.hf_config

    def _per_layer_pages(self, n_str: int, act_dtype: torch.dtype) -> tuple[int, int, int] | None:
        """DuoAttention's globally thresholded pattern: this layer's own page (its retrieval heads),
        or, when every head streams, the layer's spec is its ring (no page, no companion); returns
        the companion ring's ``(heads, slots, content)`` (None: no companion)."""
        if C.BLOCK_OUTER_LAYOUTS is None:
            raise ValueError(f"kvcomp duo: vLLM {'.'.join(map(str, C.VLLM_VERSION))} has no block-outermost KV "
                             "cache layout, which one page size per layer needs; threshold the gates per layer "
                             "(kvcomp vllm-config --duo-threshold layer)")
        if self.kv_cache_dtype.startswith("fp8"):
            raise ValueError("kvcomp duo: the globally thresholded pattern is served with --kv-cache-dtype auto "
                             "(or the model's dtype); for fp8 pages threshold the gates per layer "
                             "(kvcomp vllm-config --duo-threshold layer)")
        slots = layout.per_layer_ring_slots(self.plan, n_str)
        self._own_ring = n_str == self.num_kv_heads
        if self._own_ring:
            content = 2 * self.head_size

            def spec_of(spec):
                elem = torch.empty((), dtype=spec.dtype).element_size()
                return C.CircularBufferSpec(block_size=slots, num_kv_heads=n_str, head_size=spec.head_size,
                                            dtype=spec.dtype, state_content_bytes=content * elem)
        else:
            def spec_of(spec):
                return C.replace_spec(spec, num_head_slots=self.num_kv_heads - n_str) if n_str else spec
        set_layer_spec(self, spec_of)
        self._page_heads = 0 if self._own_ring else self.num_kv_heads - n_str
        return None if self._own_ring or not n_str else (n_str, slots, 2 * self.head_size)

    # ------------------------------------------------------------------ per-layer setup
    def _setup_layer(self, layer, kv_cache: torch.Tensor) -> None:
        """Bind this layer's method object and host pages (the layer index is known only here)."""
        p = self.plan
        li = layer_index(getattr(layer, "layer_name", "model.layers.0"))
        plan_from_env().check_window(li, self.sliding_window)
        start = 0
        if not p.is_identity:
            if p.num_kv_heads is None:
                raise ValueError(f"kvcomp plan ({p.source}) has no num_kv_heads")
            p.check_model(self.head_size)
            start = kv_head_range(self.num_kv_heads, p.num_kv_heads, *C.tp_rank_and_size())[0]
        n_host = layout.mirror_heads(p, self.num_kv_heads)
        if n_host:  # DuoAttention + A²ATS: the streaming heads' K/V sit in the host pages too
            self._mirror = mirror_for(layer.layer_name, num_blocks=kv_cache.shape[0], block_size=kv_cache.shape[2],
                                      num_heads=n_host, head_size=layout.mirror_key_dim(p, self.head_size),
                                      head_size_v=self.head_size,
                                      dtype=self._act_dtype if kv_cache.dtype == torch.uint8 else kv_cache.dtype,
                                      layers_in_process=p.num_layers)
        rope = None if self._hf_config is None else rope_from_hf_config(self._hf_config, self.head_size, li)
        if self._page_heads is not None and kv_cache.shape[1] != (self.num_kv_heads if self._own_ring
                                                                  else self._page_heads):
            raise RuntimeError(f"kvcomp duo: layer {li} got a {list(kv_cache.shape)} cache view, not its own page "
                               f"of {self._page_heads} retrieval heads (was its spec collected before "
                               "process_weights_after_loading?)")
        if self._own_ring:  # every head streams: the layer's cache is its ring
            self.method = StreamingHeads(p.sink, p.recent, self.scale)
            return
        self.method = layout.build_layer(p, li, self.num_heads, self.num_kv_heads, start, self.scale,
                                         kv_cache.device, rope, window=self.sliding_window)
        # fp8 K/V pages, or ThinK's fp8 ring beside A2ATS codes (the host pages then take e4m3 values)
        if kv_cache.dtype == torch.uint8 and (layout.page_store(p, kv_cache, self.head_size).k is not None
                                              or self.ring_name is not None):
            n_str = p.rank_num_streaming(self.num_kv_heads, *C.tp_rank_and_size())
            self._fp8 = Fp8Pages(layer._k_scale_float, layer._v_scale_float, self._act_dtype, key_width=self.head_size,
                                 ids=layout.ring_id_cells(p, self.num_kv_heads, n_str))

    def _store(self, kv_cache: torch.Tensor, ring: bool, md: Step | None = None) -> layout.Store:
        """This step's views of the layer's pages, ring and host pages. The page and host views are
        made once per page tensor (vLLM hands every step the same one) into a Store that the calls
        without a ring share (methods read it, never fill it); with a ring, a fresh Store per call
        (the ring's block ids change every step; query-driven ThinK fills in the channels)."""
        if self._own_ring:  # the layer's cache is its ring; the group's block table holds one ring per request
            return layout.Store(ring=kv_cache, ring_block=md.block_table[:, 0])
        pages = self._pages
        if pages is None or pages[0] is not kv_cache:
            pv = layout.page_store(self.plan, kv_cache, self.head_size)
            mirror = None if self._mirror is None else (self._mirror.k, self._mirror.v)
            pages = self._pages = (kv_cache, layout.Store(k=pv.k, v=pv.v, codes=pv.codes, mirror=mirror))
        base = pages[1]
        if not ring or self.ring_name is None:
            return base
        r, rb = ring_of(self.ring_name)
        return layout.Store(k=base.k, v=base.v, codes=base.codes, mirror=base.mirror, ring=r, ring_block=rb)

    def _trace(self, layer, kv_cache: torch.Tensor) -> None:
        self._traced = True
        path = os.environ.get(ENV_TRACE, "").strip()
        ring = None if self.ring_name is None else ring_of(self.ring_name)[0]
        rec = {"pid": os.getpid(), "layer": getattr(layer, "layer_name", "?"),
               "kv_cache_shape": list(kv_cache.shape), "dtype": str(kv_cache.dtype),
               "method": self.plan.method, "sliding_window": self.sliding_window,
               "vllm": ".".join(map(str, C.VLLM_VERSION)),
               "ring": self.ring_name, "host_mirror_bytes": mirror_bytes(),
               "ring_view": None if ring is None else [list(ring.shape), str(ring.dtype)],
               "decode_ops": impl_for(kv_cache, "duo_decode")}
        logger.info("kvcomp attention backend active: %s", rec)
        if path:
            with open(path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    # ------------------------------------------------------------------ vLLM entry points
    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        """Write new tokens into their pages (A²ATS: full K/V into the host pages; codes and rings
        are written by :meth:`forward`, which knows the tokens' positions).

        Args:
            key: ``[num_tokens, Hkv, D]`` (rows past ``len(slot_mapping)`` are padding).
            value: ``[num_tokens, Hkv, Dv]``.
            kv_cache: ``[num_blocks, Hkv, block_size, Dk + Dv]`` (A²ATS: code cells).
            slot_mapping: ``[n]`` int, ``block * block_size + offset``; negative = skip.
        """
        if kv_cache.numel() == 0 or self._own_ring:  # a ring takes its tokens in forward
            return
        if self.method is None:
            self._setup_layer(layer, kv_cache)
        n = slot_mapping.shape[0]
        if not n:
            return
        # padding slots (-1) stay in: every page write skips them (no host read of the slots per layer)
        k = key if key.shape[0] == n else key[:n]  # a slice is an op: ~1-2 us
        v = value if value.shape[0] == n else value[:n]
        if self._fp8 is not None:
            self._fp8.write(self.method, self._store(kv_cache, ring=False), slot_mapping, k, v)
        else:
            self.method.write(self._store(kv_cache, ring=False), slot_mapping, k, v)

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                attn_metadata: Step | None, output: torch.Tensor, output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
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
        if self.method is None:
            self._setup_layer(layer, kv_cache)
        if not self._traced:
            self._trace(layer, kv_cache)
        n = attn_metadata.num_actual_tokens
        q, k, v = query, key, value  # padding rows past n: sliced off (a slice is an op: ~1-2 us)
        if q.shape[0] != n or k.shape[0] != n or v.shape[0] != n:
            q, k, v = q[:n], k[:n], v[:n]
        store = self._store(kv_cache, ring=True, md=attn_metadata)
        if self._fp8 is not None:
            self._fp8.attend(self.method, store, q, k, v, attn_metadata, output)
        else:
            self.method.attend(store, q, k, v, attn_metadata, output)
        return output
