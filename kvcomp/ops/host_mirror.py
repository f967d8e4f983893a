"""Host-mirror operators of A²ATS offloading: gather, sparse attention and scatter on CPU memory.

The full KV of offloaded heads lives in a (pinned) host mirror, either dense ``[Hkv, T, D]``
(``[B, Hkv, T, D]`` for attention) or paged ``[num_blocks, block_size, Hkv, D]`` (vLLM layout).
Each op picks its implementation with :func:`kvcomp.ops._dispatch.impl_for` on the mirror's device:
the native kernel ``torch.ops.kvcomp_C.gather_tokens|sparse_attention|scatter_tokens`` on the CPU,
the Triton kernel where one exists (``sparse_attention_host`` over K/V on a GPU, or under
``TRITON_INTERPRET=1``: :mod:`kvcomp.kernels.vq_sparse_decode`), else the reference
(:mod:`kvcomp.ref.host_mirror`). A GPU ``idx`` gathers from the pinned mirror zero-copy (UVA) when
the extension was built with CUDA. Bad arguments raise ``ValueError`` naming the argument, before any work.
"""

from __future__ import annotations

import math

import torch

from kvcomp.ops._dispatch import impl_on
from kvcomp.ref import host_mirror as ref

__all__ = ["gather_tokens", "scatter_kv", "scatter_tokens", "sparse_attention_host"]


def _constant_to_compile(fn):
    """``torch.compiler.assume_constant_result`` (what it sets), without importing ``torch._dynamo``
    (and Triton with it) when ``kvcomp.ops`` is imported."""
    fn._dynamo_marked_constant = True
    return fn


@_constant_to_compile
def _impl(device: str, op: str) -> str:
    """:func:`impl_for` of a tensor on ``device``, a constant to ``torch.compile`` (tracing never
    enters the extension loader); the remembered choice, no tensor made (every page write calls it)."""
    return impl_on(device, op)


# --------------------------------------------------------------------------------------------- gather


def gather_tokens(
    src: torch.Tensor,
    idx: torch.Tensor,
    out: torch.Tensor | None = None,
    *,
    block_table: torch.Tensor | None = None,
    check: bool = True,
) -> torch.Tensor:
    """Gather the selected tokens of every KV head from a host mirror into a contiguous buffer.

    Args:
        src: host mirror, dense ``[Hkv, T, D]`` or paged ``[num_blocks, block_size, Hkv, D]``,
            any dtype; last dimension contiguous. Pinned when ``idx`` is on a GPU.
        idx: ``[Hkv, K]`` int32/int64 token ids per KV head (duplicates allowed). Dense: token
            positions. Paged with ``block_table``: token positions of one sequence; paged without
            it: flat slots ``block * block_size + offset``.
        out: optional ``[Hkv, K, D]`` destination with ``src``'s dtype; allocated on ``idx``'s
            device when omitted.
        block_table: optional ``[max_blocks]`` int32 block ids of the sequence (paged only), on
            ``idx``'s device.
        check: for a GPU ``idx`` with the native CUDA op, synchronise and raise on an out-of-range
            index (the kernel zero-fills such rows either way). CPU paths always check.

    Returns:
        ``out``: ``[Hkv, K, D]``, ``out[h, j] = token idx[h, j] of head h``. With ``idx`` on a GPU
        and the CUDA extension, rows are read zero-copy from pinned memory over PCIe (UVA).
    """
    if idx.is_cuda and not src.is_cuda:
        if _impl(src.device.type, "gather_tokens") == "native" and hasattr(torch.ops.kvcomp_C, "gather_tokens_uva"):
            if out is None:
                hkv = src.shape[2] if src.dim() == 4 else src.shape[0]
                out = torch.empty((hkv, idx.shape[-1], src.shape[-1]), dtype=src.dtype, device=idx.device)
            table = None if block_table is None else block_table.contiguous()
            status = torch.ops.kvcomp_C.gather_tokens_uva(src, idx.contiguous(), out, table)
            if check and int(status.item()) != 0:
                raise ValueError("idx has an out-of-range token index (or block_table an invalid block id) for src "
                                 f"of shape {tuple(src.shape)}")
            return out
        rows = gather_tokens(src, idx.cpu(), None, block_table=None if block_table is None else block_table.cpu())
        if out is None:
            return rows.to(idx.device, non_blocking=True)
        out.copy_(rows, non_blocking=True)
        return out
    if _impl(src.device.type, "gather_tokens") == "native":
        if out is None:
            if src.dim() not in (3, 4) or idx.dim() != 2:
                raise ValueError(f"src must be [Hkv, T, D] or [num_blocks, block_size, Hkv, D] and idx [Hkv, K], "
                                 f"got {tuple(src.shape)} and {tuple(idx.shape)}")
            out = src.new_empty((idx.shape[0], idx.shape[1], src.shape[-1]))
        table = None if block_table is None else block_table.contiguous()
        torch.ops.kvcomp_C.gather_tokens(src, idx.contiguous(), out, table)
        return out
    return ref.gather_tokens(src, idx, out, block_table=block_table)


# ---------------------------------------------------------------------------------------- attention


def sparse_attention_host(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    idx: torch.Tensor,
    count: torch.Tensor,
    *,
    block_table: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Exact decode attention computed on the CPU over the selected tokens of a host mirror.

    A²ATS runs the attention of offloaded heads where their KV lives, so only the query (in) and
    the output (back) cross PCIe, never the cached KV.

    Args:
        q: ``[B, Hq, D]`` decode queries (any device; moved to the CPU and back).
        k, v: host mirror, dense ``[B, Hkv, T, D]`` / ``[B, Hkv, T, Dv]`` or paged
            ``[num_blocks, block_size, Hkv, D|Dv]`` with ``block_table``; same dtype as ``q``
            (fp32, bf16 or fp16), last dimension contiguous.
        idx: ``[B, Hkv, K]`` int32/int64 token positions per KV head; the first ``count[b, h]`` are
            used (each listed entry is one key: duplicates count twice), the rest are ignored.
        count: ``[B, Hkv]`` int32/int64, ``1 <= count <= K`` (checked on the CPU routes; the
            Triton kernel reads device values unchecked, like every kernel).
        block_table: ``[B, max_blocks]`` int32 (paged layout only).
        scale: softmax scale, default ``1/sqrt(D)``.

    Returns:
        ``[B, Hq, Dv]`` in ``q``'s dtype on ``q``'s device; query head ``h`` reads KV head
        ``h // (Hq // Hkv)``; softmax and accumulation in fp32.
    """
    impl = _impl(k.device.type, "sparse_attention")
    if impl == "native":
        d = q.shape[-1] if q.dim() else 1
        scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
        table = None if block_table is None else block_table.cpu().contiguous()
        out = torch.ops.kvcomp_C.sparse_attention(q.cpu(), k, v, idx.cpu().contiguous(), count.cpu().contiguous(),
                                                  table, scale)
        return out.to(q.device, non_blocking=True)
    if impl == "triton":
        return _triton_sparse_attention(q, k, v, idx, count, block_table, scale)
    return ref.sparse_attention_host(q, k, v, idx, count, block_table=block_table, scale=scale)


@torch.library.custom_op("kvcomp::sparse_decode", mutates_args=())
def _sparse_decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                      idx: torch.Tensor, count: torch.Tensor, scale: float) -> torch.Tensor:
    """The Triton sparse decode as one custom op: torch.compile traces it, a CUDA graph captures it."""
    from kvcomp.kernels.vq_sparse_decode import triton_paged_sparse_attention

    return triton_paged_sparse_attention(q, k_cache, v_cache, block_table, idx, count, scale=scale)


@_sparse_decode_op.register_fake
def _sparse_decode_fake(q, k_cache, v_cache, block_table, idx, count, scale):
    return q.new_empty(q.shape[0], q.shape[1], v_cache.shape[3])


def _triton_sparse_attention(q, k, v, idx, count, block_table, scale):
    """The Triton sparse decode over K/V on ``k``'s device (``kvcomp::sparse_decode``); dense
    ``[B, Hkv, T, D]`` K/V are read as pages (sequence ``b`` = block ``b`` of ``T`` slots)."""
    if block_table is None:
        if k.dim() != 4 or v.dim() != 4:
            raise ValueError(f"dense k, v must be [B, Hkv, T, D|Dv], got k {tuple(k.shape)}, v {tuple(v.shape)}")
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        block_table = torch.arange(k.shape[0], dtype=torch.int32, device=k.device)[:, None]
    dev = k.device
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out = torch.ops.kvcomp.sparse_decode(q.to(dev), k, v, block_table.to(dev), idx.to(dev, torch.int32).contiguous(),
                                         count.to(dev, torch.int32).contiguous(), scale)
    return out.to(q.device)


# ------------------------------------------------------------------------------------------ scatter


def scatter_tokens(cache: torch.Tensor, new_tokens: torch.Tensor, slots: torch.Tensor) -> None:
    """Write new tokens into a host mirror in place (``cache[slot of n][h] = new_tokens[n, h]``).

    Args:
        cache: host mirror, dense ``[Hkv, T, D]`` (slot = token position) or paged
            ``[num_blocks, block_size, Hkv, D]`` (slot = ``block * block_size + offset``).
        new_tokens: ``[N, Hkv, D]`` with ``cache``'s dtype, any device (copied to the host first).
        slots: ``[N]`` int32/int64; negative slots are skipped (vLLM padding), a slot may appear at
            most once.
    """
    # per page write of every layer: tensor flags only (``.device`` builds an object: ~0.5 us)
    if _impl("cuda" if cache.is_cuda else "cpu", "scatter_tokens") == "native":
        _native_scatter(cache, new_tokens, _host_slots(slots))
        return
    ref.scatter_tokens(cache, new_tokens, slots)


def _host_slots(slots: torch.Tensor) -> torch.Tensor:
    """``slots`` as the native copy takes them: contiguous, in host memory."""
    return slots if slots.is_cpu and slots.is_contiguous() else slots.cpu().contiguous()


def _native_scatter(cache: torch.Tensor, new_tokens: torch.Tensor, slots: torch.Tensor) -> None:
    # the overload itself: no resolution per call
    torch.ops.kvcomp_C.scatter_tokens.default(cache, new_tokens if new_tokens.is_cpu else new_tokens.cpu(), slots)


def scatter_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               slots: torch.Tensor) -> None:
    """:func:`scatter_tokens` of keys ``k`` into ``k_cache`` and values ``v`` into ``v_cache`` at the same
    ``slots``, with one dispatch for both (a page write of every layer of every decode step)."""
    if _impl("cuda" if k_cache.is_cuda else "cpu", "scatter_tokens") == "native":
        slots = _host_slots(slots)
        _native_scatter(k_cache, k, slots)
        _native_scatter(v_cache, v, slots)
        return
    ref.scatter_tokens(k_cache, k, slots)
    ref.scatter_tokens(v_cache, v, slots)
