"""Exact attention over paged K/V: compression off, and the pages every method builds on.

Storage: ``k [num_blocks, block_size, H, Dk]`` and ``v [num_blocks, block_size, H, Dv]`` page
views (vLLM's pages permuted, or the transformers cache's one block per sequence). A one-token
query attends through ``kvcomp::duo_decode`` with no streaming heads (Triton on the GPU, the native
CPU kernel or the reference); multi-token rows run one native varlen call over the pages on the CPU
(:func:`kvcomp.ops.paged_prefill.paged_prefill`), else gather each request's pages and run one causal
dense call (:func:`kvcomp.ops.prefill.dense_prefill`).
"""

from __future__ import annotations

import torch

from .. import ops
from ..ops._dispatch import impl_for
from ..ops.paged_prefill import paged_prefill
from ..ops.prefill import dense_prefill
from ..ref.attention import gather_paged
from ..ref.duo import duo_head_map
from .step import Rows, Step, grow


def write_pages(k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor, k: torch.Tensor,
                v: torch.Tensor) -> None:
    """Store ``k [n, H, Dk]`` / ``v [n, H, Dv]`` at slots ``block * block_size + offset`` (negative:
    skipped, vLLM's padding), moved to the pages' device (e.g. host pages), with no host read of the
    slots. Pages in host memory go through :func:`kvcomp.ops.scatter_kv` (the native copy;
    without ``kvcomp._C`` its reference), except pages of equal key and value width under
    ``TRITON_INTERPRET=1``; GPU pages of equal width through ``kvcomp::write_paged_kv`` (the Triton
    kernel), other GPU pages by :func:`indexed_write`."""
    if k_cache.is_cpu:
        if impl_for(k_cache, "scatter_tokens") != "triton" or k_cache.shape != v_cache.shape or k.shape != v.shape:
            ops.scatter_kv(k_cache, v_cache, k if k.dtype == k_cache.dtype else k.to(k_cache.dtype),
                           v if v.dtype == v_cache.dtype else v.to(v_cache.dtype), slots)
            return
    if k.device == k_cache.device and k_cache.shape == v_cache.shape and k.shape == v.shape:
        ops.triton_write_paged_kv(k, v, k_cache, v_cache, slots)
        return
    s = slots.to(k_cache.device, torch.long)
    indexed_write(k_cache, s, k.to(k_cache.device, k_cache.dtype))
    indexed_write(v_cache, s, v.to(v_cache.device, v_cache.dtype))


def indexed_write(cache: torch.Tensor, slots: torch.Tensor, x: torch.Tensor) -> None:
    """``cache [blocks, block_size, ...]`` at ``slots [n]`` (long, on the cache's device) takes ``x [n,
    ...]``, negative slots skipped without a host read (no boolean mask: a CUDA sync): a padded row
    repeats the write of the first real row (the same value to the same slot), or, when there is
    none, writes slot 0's own value back."""
    if not slots.shape[0]:
        return
    keep = slots >= 0
    first = keep.to(torch.uint8).argmax()  # the first real row (0 when none)
    src = torch.where(keep, torch.arange(slots.shape[0], device=slots.device), first)
    s = slots.index_select(0, src).clamp(min=0)
    blk, off = s // cache.shape[1], s % cache.shape[1]
    val = torch.where(keep.index_select(0, src).view(-1, *[1] * (x.dim() - 1)), x.index_select(0, src),
                      cache[blk, off])
    cache[blk, off] = val


def head_map(paged: list[int], streaming: list[int], device) -> torch.Tensor:
    """``[Hkv, 2]`` int32 ``(kind, index)`` of each KV head (:func:`kvcomp.ref.duo.duo_head_map` of the
    streaming heads; ``paged`` and ``streaming`` ascending, together every head once)."""
    mask = torch.zeros(len(paged) + len(streaming), dtype=torch.bool)
    mask[streaming] = True
    return duo_head_map(mask).to(device)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of ``q [Tq, Hq, D]`` (the last ``Tq`` positions) over ``k [Hkv, Tk, D]``,
    ``v [Hkv, Tk, Dv]`` (moved to q's device and dtype: e.g. rows of the host mirror); returns
    ``[Tq, Hq, Dv]``."""
    k, v = (t.to(q.device, q.dtype, non_blocking=True) for t in (k, v))
    o = dense_prefill(q.transpose(0, 1)[None], k[None], v[None], scale=scale)
    return o[0].transpose(0, 1)


def dense_rows(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, md: Step, reqs: list[int],
               scale: float, output: torch.Tensor, heads: torch.Tensor | None = None) -> None:
    """Full causal attention of the multi-token rows of requests ``reqs`` over the pages ``[blocks,
    block_size, H, D]`` (device pages, or A²ATS's host mirror); writes ``output[rows, heads]``
    (``heads``: the query heads ``q`` holds, default all).

    When ``reqs`` are the step's multi-token requests (``md.rows()``), the pages are on the CPU (keys
    and values of one width) and ``impl_for(q, "paged_prefill")`` is ``native``: one varlen call
    straight over the pages (:func:`kvcomp.ops.paged_prefill.paged_prefill`, every request at once,
    no gather copy). Otherwise, and when the only multi-token request is a whole prompt longer than
    :data:`LOOP_PROMPT_TOKENS` (there torch's SDPA flash kernel measured faster: bench/prefill_cpu.py),
    :func:`dense_rows_loop`."""
    multi = md.rows()[1]
    if (multi is None or multi.reqs != reqs or k_cache.device.type != "cpu" or k_cache.shape != v_cache.shape
            or _one_long_prompt(md, reqs) or impl_for(q, "paged_prefill") != "native"):
        dense_rows_loop(q, k_cache, v_cache, md, reqs, scale, output, heads)
        return
    o = paged_prefill(q.index_select(0, multi.rows), k_cache, v_cache, multi.block_table, multi.seq_lens,
                      multi.query_start_loc, scale=scale).to(output.dtype)
    if heads is None:
        output.index_copy_(0, multi.rows, o)
    else:
        output.index_put_((multi.rows[:, None], heads[None, :]), o)


#: A step whose only multi-token request is a whole prompt of more tokens than this runs the gather +
#: SDPA loop: bench/results/prefill-cpu.json (2-core machine) has the native paged_prefill 2.3x faster
#: at 1K, 1.1x at Llama's 2K, even at 4K, and 0.83-0.91x at 8K for one prompt.
LOOP_PROMPT_TOKENS = 4096


def _one_long_prompt(md: Step, reqs: list[int]) -> bool:
    """One multi-token request whose queries are its whole context (no cached tokens before them) of
    more than :data:`LOOP_PROMPT_TOKENS` tokens."""
    if len(reqs) != 1:
        return False
    qsl, lens, b = md.qsl_host(), md.seq_lens_host(), reqs[0]
    return qsl[b + 1] - qsl[b] == lens[b] > LOOP_PROMPT_TOKENS


def dense_rows_loop(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, md: Step, reqs: list[int],
                    scale: float, output: torch.Tensor, heads: torch.Tensor | None = None) -> None:
    """:func:`dense_rows` one request at a time: its pages gathered into a copy on q's device, then
    one causal dense call (:func:`kvcomp.ops.prefill.dense_prefill`: ``flash_attn`` for CUDA
    fp16/bf16 when installed, else torch SDPA)."""
    qsl, lens = md.qsl_host(), md.seq_lens_host()
    for b in reqs:
        s0, e0 = qsl[b], qsl[b + 1]
        o = attend(q[s0:e0], gather_paged(k_cache, md.block_table, lens[b], b),
                   gather_paged(v_cache, md.block_table, lens[b], b), scale).to(output.dtype)
        if heads is None:
            output[s0:e0] = o
        else:
            output[s0:e0].index_copy_(1, heads, o)


def no_rings(like: torch.Tensor, batch: int, d: int, dv: int, cached: tuple | None = None) -> tuple:
    """``(k, v)`` rings of no head for ``batch`` requests (``[batch, 0, 1, d | dv]``, no data), ``cached``
    when it is that already (a layer keeps its own: ~2 us per tensor made)."""
    if (cached is not None and cached[0].shape[0] == batch and cached[0].shape[3] == d and cached[1].shape[3] == dv
            and cached[0].dtype == like.dtype and cached[0].device == like.device):
        return cached
    k = like.new_empty(batch, 0, 1, d)
    return k, (k if dv == d else like.new_empty(batch, 0, 1, dv))


def dense_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, hm: torch.Tensor, r: Rows,
                 scale: float, none: tuple | None = None) -> torch.Tensor:
    """Full paged attention of one query per request (DuoAttention's op with no streaming heads);
    ``none``: :func:`no_rings` of the call, when the caller keeps them."""
    ks, vs = none or no_rings(k_cache, q.shape[0], k_cache.shape[-1], v_cache.shape[-1])
    return ops.triton_duo_decode_attention(q, k_cache, v_cache, r.block_table, r.seq_lens, ks, vs, hm, sink=0,
                                           window=1, scale=scale)


class Dense:
    """Every KV head of the layer exact, K and V in the pages (compression off)."""

    name = "off"

    def __init__(self, num_kv_heads: int, scale: float, device):
        self.scale = scale
        self.hm = head_map(list(range(num_kv_heads)), [], device)
        self._none = None  # the decode op's empty rings (no_rings), kept for the next step of the same batch size

    def alloc(self, store, heads: int, batch: int, tokens: int, head_dim: int, dtype, device, pin: bool) -> None:
        """One block of ``tokens`` slots per request (the transformers cache's layout)."""
        store.k = grow(store.k, (batch, tokens, heads, head_dim), 1, dtype=dtype, device=device)
        store.v = grow(store.v, (batch, tokens, heads, head_dim), 1, dtype=dtype, device=device)

    def write(self, store, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor, md: Step | None = None) -> None:
        """New tokens' ``k, v [n, Hkv, D]`` into their page slots (before :meth:`attend`)."""
        write_pages(store.k, store.v, slots, k, v)

    def attend(self, store, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, md: Step, out: torch.Tensor) -> None:
        """Attention of the step's queries ``q [n, Hq, D]``; writes ``out [n, Hq, Dv]``."""
        single, multi = md.rows()
        if single is not None:
            k, v = store.k, store.v
            self._none = no_rings(k, len(single.reqs), k.shape[-1], v.shape[-1], self._none)
            single.put(out, dense_decode(single.take(q), k, v, self.hm, single, self.scale, self._none))
        if multi is not None:
            dense_rows(q, store.k, store.v, md, multi.reqs, self.scale, out)
