"""What the vLLM backend does per layer, derived from a kvcomp ``CompressionConfig``.

Needs no vLLM: the backend, the tests and ``kvcomp info`` share it. The config reaches every vLLM
process (front-end, engine core, spawned workers) through the ``KVCOMP_CONFIG`` environment
variable, read once per process by :func:`plan_from_env`.

What this plugin version serves (every method and combination, as the HF path runs them):

* no config: exact paged attention (the page holds full K and V, like stock vLLM);
* ThinK on every KV head (with DuoAttention: every retrieval head): pages hold ``D_keep`` key
  channels + the full value; the last ``think.window`` keys stay full width in a per-request ring.
  The kept channels are static (``think.channels [L, Hkv, D_keep]``, calibrated) or, without
  them, query-driven per request: chosen from the request's own observation window at its first
  prefill chunk and kept in its ring (:class:`kvcomp.methods.layout.RequestChannels`);
* DuoAttention with the same number of streaming KV heads in every layer: pages hold the retrieval
  heads (``num_head_slots``), each layer's streaming heads keep ``sink + recent`` tokens in a
  per-request ring (a companion layer with vLLM's ``CircularBufferSpec``); with ThinK, the
  retrieval heads' pages are narrow and their window shares the ring. DuoAttention alone also
  with the globally thresholded pattern (:attr:`Plan.streaming_per_layer`: each layer's own
  retrieval-head pages and ring);
* A²ATS on every (layer, KV head) (with DuoAttention: every retrieval head): pages hold one VQ code
  per token and KV head; the K/V lives in a backend-owned host mirror, a page-for-page shadow of
  vLLM's code pages (with ThinK: ThinK's narrow keys, their window in the ring); DuoAttention's
  streaming heads hold nothing on the device: their K/V sits in the host mirror.

Other layouts that are not uniform over layers and heads are refused with a clear error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import torch

from ..defaults import MAX_CODES, THINK_CHANNEL_MULTIPLE
from . import ENV_CONFIG


def layer_index(layer_name: str) -> int:
    """First integer component of a vLLM layer name (``model.layers.3.self_attn.attn`` -> 3)."""
    for part in layer_name.split("."):
        if part.isdigit():
            return int(part)
    raise ValueError(f"layer_name: no layer index in {layer_name!r}")


def kv_head_range(num_kv_heads_local: int, num_kv_heads_total: int, rank: int, size: int) -> tuple[int, int]:
    """Global KV heads ``[start, end)`` held by tensor-parallel rank ``rank`` of ``size``.

    vLLM splits KV heads evenly over ranks; with fewer KV heads than ranks each head is replicated
    on ``size // total`` consecutive ranks (one head per rank).

    Raises:
        ValueError: inconsistent counts (not an even split, rank out of range).
    """
    if size < 1 or not 0 <= rank < size:
        raise ValueError(f"rank: {rank} outside tensor-parallel size {size}")
    if num_kv_heads_total >= size:
        if num_kv_heads_total % size or num_kv_heads_local * size != num_kv_heads_total:
            raise ValueError(f"num_kv_heads_local: {num_kv_heads_local} x {size} ranks != {num_kv_heads_total} KV heads")
        start = rank * num_kv_heads_local
    else:
        if size % num_kv_heads_total or num_kv_heads_local != 1:
            raise ValueError(f"num_kv_heads_local: {num_kv_heads_local} (expected 1 replicated head of "
                             f"{num_kv_heads_total} over {size} ranks)")
        start = rank // (size // num_kv_heads_total)
    return start, start + num_kv_heads_local


@dataclass(frozen=True)
class Plan:
    """Per-process serving plan.

    Attributes:
        num_layers, num_kv_heads, head_dim: model shape the config was made for (None without one).
        think_channels: ``[L, Hkv, D_keep]`` int64 kept key channels (ascending per head), or None.
        streaming: ``[L, Hkv]`` bool DuoAttention pattern (True = streaming head), or None; the
            same number of streaming heads in every layer.
        sink, recent: DuoAttention's kept tokens per streaming head (first ``sink`` + a window of
            ``recent`` tokens counting the query itself).
        think_window: ThinK's full-width tail (tokens before the current step whose keys stay
            unpruned), and its observation window (queries that choose per-request channels).
        think_keep, think_prune_ratio: query-driven ThinK (no static channels): kept channels per
            KV head and the pruning ratio that chooses them per request; None otherwise.
        think_channel_multiple: the kept count is a multiple of it (``ThinK.channel_multiple``).
        vq: the ``kvcomp.config.VQRetrieval`` (codebook ``[L, Hkv, C, D]``, whiten, topk, sink,
            local, rel_pos), or None.
        source: where the plan came from (config path or ``"none"``), for messages.
        windows: the model's sliding window per layer (None on global layers), or None: no
            sliding layer. Sliding layers run uncompressed (the backend gives them an identity plan).
    """

    num_layers: int | None = None
    num_kv_heads: int | None = None
    head_dim: int | None = None
    think_channels: torch.Tensor | None = None
    streaming: torch.Tensor | None = None
    sink: int = 0
    recent: int = 0
    think_window: int = 0
    think_keep: int | None = None
    think_prune_ratio: float | None = None
    think_channel_multiple: int = THINK_CHANNEL_MULTIPLE
    vq: object | None = None
    source: str = "none"
    windows: tuple | None = None

    @property
    def num_streaming(self) -> int:
        """Streaming KV heads per layer (0 without DuoAttention)."""
        return 0 if self.streaming is None else int(self.streaming[0].sum())

    def layer_heads(self, layer: int) -> tuple[list[int], list[int]]:
        """``(retrieval KV heads, streaming KV heads)`` of one layer (all retrieval without Duo).

        Raises:
            ValueError: ``layer`` outside the config's grid.
        """
        if self.streaming is None:
            return list(range(self.num_kv_heads or 0)), []
        if not 0 <= layer < self.streaming.shape[0]:
            raise ValueError(f"layer: {layer} outside the config's {self.streaming.shape[0]} layers ({self.source})")
        row = self.streaming[layer].tolist()
        return [h for h, s in enumerate(row) if not s], [h for h, s in enumerate(row) if s]

    def rank_heads(self, layer: int, start: int, end: int) -> tuple[list[int], list[int]]:
        """``(retrieval, streaming)`` KV heads of one layer among global heads ``[start, end)``, as
        indices local to that range (a tensor-parallel rank's slice)."""
        ret, stream = self.layer_heads(layer)
        return [h - start for h in ret if start <= h < end], [h - start for h in stream if start <= h < end]

    def rank_num_streaming(self, num_kv_heads_local: int, rank: int, size: int) -> int:
        """Streaming KV heads per layer on tensor-parallel rank ``rank`` (DuoAttention).

        Raises:
            ValueError: the count differs between layers or ranks, or leaves a rank with no
                retrieval or no streaming head (vLLM pages are uniform per KV-cache group and the
                scheduler needs one layout on every rank).
        """
        if self.streaming is None:
            return 0
        counts = set()
        for r in range(size):
            start, end = kv_head_range(num_kv_heads_local, self.num_kv_heads, r, size)
            counts |= {int(self.streaming[l, start:end].sum()) for l in range(self.streaming.shape[0])
                       if self.windows is None or self.windows[l] is None}
        if len(counts) != 1 or not 0 < next(iter(counts)) < num_kv_heads_local:
            raise ValueError(f"{ENV_CONFIG} ({self.source}): with tensor parallel size {size} each rank holds "
                             f"{num_kv_heads_local} KV heads; DuoAttention needs the same number (>0, <"
                             f"{num_kv_heads_local}) of streaming heads in every layer of every rank, got {sorted(counts)}")
        return next(iter(counts))

    @property
    def streaming_per_layer(self) -> bool:
        """True when the DuoAttention pattern streams different numbers of heads per (global) layer:
        the globally thresholded pattern, served with one page layout per layer (see the backend)."""
        if self.streaming is None:
            return False
        return len({int(self.streaming[l].sum()) for l in range(self.streaming.shape[0])
                    if self.windows is None or self.windows[l] is None}) > 1

    def layer_num_streaming(self, layer: int, num_kv_heads_local: int, rank: int, size: int) -> int:
        """Streaming KV heads of ``layer`` on tensor-parallel rank ``rank`` (the uniform count, or
        the layer's own with :attr:`streaming_per_layer`).

        Raises:
            ValueError: see :meth:`rank_num_streaming`; a per-layer pattern with tensor parallelism.
        """
        if not self.streaming_per_layer:
            return self.rank_num_streaming(num_kv_heads_local, rank, size)
        if size != 1:
            raise ValueError(f"{ENV_CONFIG} ({self.source}): the globally thresholded DuoAttention pattern is served "
                             f"with tensor parallel size 1 only (got {size}); threshold the gates per layer "
                             "(kvcomp vllm-config --duo-threshold layer) to shard it")
        return int(self.streaming[layer].sum())

    @property
    def key_dim(self) -> int | None:
        """Stored key channels per token (``D_keep`` with ThinK, else None = full head dim)."""
        if self.think_channels is not None:
            return int(self.think_channels.shape[-1])
        return self.think_keep

    @property
    def per_request_channels(self) -> bool:
        """True with query-driven ThinK (channels chosen per request, kept in its ring)."""
        return self.think_keep is not None and self.think_channels is None

    @property
    def is_identity(self) -> bool:
        """True without compression (exact pages, like stock vLLM)."""
        return self.streaming is None and self.vq is None and self.key_dim is None

    @property
    def method(self) -> str:
        """``off`` or the ``+``-joined methods in use (``duo``, ``think``, ``vq``)."""
        used = [m for m, on in (("duo", self.streaming is not None), ("think", self.key_dim is not None),
                                ("vq", self.vq is not None)) if on]
        return "+".join(used) or "off"

    def check_window(self, layer: int, sliding_window: int | None) -> None:
        """Fail unless the model's sliding window of ``layer`` is the one the config recorded.

        Raises:
            ValueError: they differ (a config made for another model, or without its windows).
        """
        want = None if self.windows is None else self.windows[layer]
        if not self.is_identity and want != sliding_window:
            raise ValueError(f"{ENV_CONFIG} ({self.source}): layer {layer} has sliding window {sliding_window} in the "
                             f"model, {want} in the config (build it with CompressionConfig.for_model)")

    def check_model(self, head_size: int, num_kv_heads_total: int | None = None) -> None:
        """Fail unless the model layer matches the shape the config was built for.

        Raises:
            ValueError: head size or KV head count differs from the config's.
        """
        if self.head_dim is not None and head_size != self.head_dim:
            raise ValueError(f"{ENV_CONFIG} ({self.source}): config head_dim {self.head_dim} "
                             f"!= model head_size {head_size}")
        if (self.num_kv_heads is not None and num_kv_heads_total is not None
                and num_kv_heads_total != self.num_kv_heads):
            raise ValueError(f"{ENV_CONFIG} ({self.source}): config num_kv_heads {self.num_kv_heads} "
                             f"!= model num_kv_heads {num_kv_heads_total}")

    def layer_channels(self, layer: int, head_start: int, head_end: int) -> torch.Tensor | None:
        """Kept key channels ``[head_end-head_start, D_keep]`` of one layer's KV heads, or None.

        Raises:
            ValueError: ``layer`` or the head range lies outside the config's grid.
        """
        if self.think_channels is None:
            return None
        L, H, _ = self.think_channels.shape
        if not 0 <= layer < L:
            raise ValueError(f"layer: {layer} outside the config's {L} layers ({self.source})")
        if not 0 <= head_start < head_end <= H:
            raise ValueError(f"head range [{head_start}, {head_end}) outside the config's {H} KV heads")
        return self.think_channels[layer, head_start:head_end]


def plan_from_config(cfg, source: str = "config") -> Plan:
    """Build the serving plan of a ``kvcomp.config.CompressionConfig`` (any combination of
    DuoAttention, ThinK and A²ATS; ThinK with static or query-driven channels).

    Raises:
        ValueError: a layout the backend cannot hold: ThinK or A²ATS on only some of the
            (retrieval) heads, DuoAttention with unequal streaming-head counts per layer combined
            with ThinK, A²ATS or sliding-window layers, no head to split, more codes than int16
            cells hold.
    """
    glob = torch.tensor([cfg.window(l) is None for l in range(cfg.num_layers)])  # sliding layers stay exact
    streaming = None
    if cfg.duo is not None:
        streaming = cfg.duo.pattern.bool().cpu() & glob[:, None]
        counts = streaming[glob].sum(dim=1).tolist()
        if len(set(counts)) == 1 and not 0 < counts[0] < cfg.num_kv_heads:
            raise ValueError(f"{ENV_CONFIG} ({source}): DuoAttention with {counts[0]} streaming heads in every "
                             f"layer of {cfg.num_kv_heads}: nothing to split (serve without DuoAttention, or "
                             "stream 1 to Hkv-1 heads per layer)")
        if len(set(counts)) > 1 and (cfg.think is not None or cfg.vq is not None or cfg.windows is not None):
            raise ValueError(f"{ENV_CONFIG} ({source}): the globally thresholded DuoAttention pattern (streaming "
                             f"heads per layer {counts}) is served alone, on a model without sliding-window "
                             "layers; with ThinK or A2ATS threshold the gates per layer (kvcomp vllm-config "
                             "--duo-threshold layer)")
    want = torch.ones(cfg.num_layers, cfg.num_kv_heads, dtype=torch.bool) if streaming is None else ~streaming
    want &= glob[:, None]
    which = "retrieval " if streaming is not None else ""
    vq = None
    if cfg.vq is not None:
        vq = cfg.vq
        grid = torch.tensor([[k == "vq" for k in row] for row in cfg.kinds])
        if not torch.equal(grid, want):
            raise ValueError(f"{ENV_CONFIG} ({source}): vLLM pages are uniform per KV-cache group, so A2ATS "
                             f"must cover every {which}(layer, KV head); vq.heads covers {int(grid.sum())}/"
                             f"{int(want.sum())} (build it with vq_dense_layers=0)")
        if vq.n_codes > MAX_CODES:
            raise ValueError(f"{ENV_CONFIG} ({source}): {vq.n_codes} VQ codes do not fit the int16 code pages")
        if vq.select != "codes":
            raise ValueError(f"{ENV_CONFIG} ({source}): vq.select={vq.select!r} is an analysis baseline of the HF "
                             "path (kvcomp eval), not served: use 'codes'")
    channels, keep, ratio, window, multiple = None, None, None, 0, THINK_CHANNEL_MULTIPLE
    if cfg.think is not None:
        t = cfg.think
        if not torch.equal(cfg.prune.cpu(), want):
            raise ValueError(f"{ENV_CONFIG} ({source}): vLLM pages are uniform per KV-cache group, so ThinK "
                             f"must prune every {which}(layer, KV head); think.heads prunes "
                             f"{int(cfg.prune.sum())}/{int(want.sum())} (leave think.heads unset)")
        window, multiple = int(t.window), int(t.channel_multiple)
        if t.channels is None:  # query-driven: chosen per request (their ids kept in its ring)
            keep, ratio = t.kept_dim(cfg.head_dim), float(t.prune_ratio)
        else:
            channels = torch.sort(t.channels.long(), dim=-1).values.contiguous()
    return Plan(num_layers=cfg.num_layers, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
                think_channels=channels, streaming=streaming, sink=int(cfg.duo.sink) if cfg.duo else 0,
                recent=int(cfg.duo.recent) if cfg.duo else 0, think_window=window, think_keep=keep,
                think_prune_ratio=ratio, think_channel_multiple=multiple, vq=vq, source=source,
                windows=None if cfg.windows is None else tuple(cfg.windows))


def load_plan(path: str | os.PathLike | None) -> Plan:
    """Load the plan from a config directory (or its ``config.json``); None or "" = no compression.

    Raises:
        ValueError / kvcomp.config.ConfigError: missing or invalid config.
    """
    if path is None or str(path).strip() == "":
        return Plan()
    path = str(path)
    directory = os.path.dirname(path) if os.path.basename(path) == "config.json" else path
    if not os.path.isdir(directory):
        raise ValueError(f"{ENV_CONFIG}={path!r}: not a directory written by CompressionConfig.save")
    from ..config import CompressionConfig

    return plan_from_config(CompressionConfig.load(directory), source=path)


@lru_cache(maxsize=4)
def _cached_plan(path: str) -> Plan:
    return load_plan(path)


def plan_from_env() -> Plan:
    """The plan named by ``$KVCOMP_CONFIG`` in this process (cached per value)."""
    return _cached_plan(os.environ.get(ENV_CONFIG, "").strip())
