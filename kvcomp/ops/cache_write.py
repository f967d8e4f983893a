"""``kvcomp::write_paged_kv`` and ``kvcomp::write_streaming_kv``: in-place cache writes as custom ops.

Both mutate their cache arguments (declared in ``mutates_args``) and return nothing. They run the
Triton kernels where :func:`kvcomp.ops._dispatch.impl_for` says so (CUDA, or the interpreter) and
their references otherwise (an indexed copy: no native kernel is needed for it). Triton is imported
lazily inside the ops.
"""

from __future__ import annotations

import torch

from kvcomp.ops._dispatch import impl_for


@torch.library.custom_op("kvcomp::write_paged_kv", mutates_args=("k_cache", "v_cache"))
def _write_paged_kv_op(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       slot_mapping: torch.Tensor) -> None:
    if impl_for(k_cache) != "triton":
        from kvcomp.ref.cache_write import write_paged_kv
    else:
        from kvcomp.kernels.cache_write import write_paged_kv
    write_paged_kv(key, value, k_cache, v_cache, slot_mapping)


@_write_paged_kv_op.register_fake
def _write_paged_kv_fake(key, value, k_cache, v_cache, slot_mapping):
    return None


@torch.library.custom_op("kvcomp::write_streaming_kv", mutates_args=("k_buf", "v_buf"))
def _write_streaming_kv_op(key: torch.Tensor, value: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
                           query_start_loc: torch.Tensor, seq_lens: torch.Tensor, sink: int) -> None:
    if impl_for(k_buf) != "triton":
        from kvcomp.ref.cache_write import write_streaming_kv
    else:
        from kvcomp.kernels.cache_write import write_streaming_kv
    write_streaming_kv(key, value, k_buf, v_buf, query_start_loc, seq_lens, sink=sink)


@_write_streaming_kv_op.register_fake
def _write_streaming_kv_fake(key, value, k_buf, v_buf, query_start_loc, seq_lens, sink):
    return None


def _check(name: str, t, ndim: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {list(t.shape)}")


def triton_write_paged_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          slot_mapping: torch.Tensor) -> None:
    """Write ``key, value [N, Hkv, D]`` into ``k_cache, v_cache [num_blocks, block_size, Hkv, D]`` in place
    at ``slot_mapping [N]`` (``block * block_size + offset``, ``-1`` = skip). Same contract as
    ``kvcomp.ref.cache_write.write_paged_kv``."""
    for name, t, nd in (("key", key, 3), ("value", value, 3), ("k_cache", k_cache, 4), ("v_cache", v_cache, 4),
                        ("slot_mapping", slot_mapping, 1)):
        _check(name, t, nd)
    torch.ops.kvcomp.write_paged_kv(key, value, k_cache, v_cache, slot_mapping)


def triton_write_streaming_kv(key: torch.Tensor, value: torch.Tensor, k_buf: torch.Tensor, v_buf: torch.Tensor,
                              query_start_loc: torch.Tensor, seq_lens: torch.Tensor, *, sink: int) -> None:
    """Roll the streaming window: write packed ``key, value [total_new, n_str, D]`` into the rings
    ``k_buf, v_buf [B, n_str, sink + window, D]`` in place (sink slots first, then the ring; of a chunk
    longer than the window only the last ``window`` tokens land). Same contract as
    ``kvcomp.ref.cache_write.write_streaming_kv``."""
    for name, t, nd in (("key", key, 3), ("value", value, 3), ("k_buf", k_buf, 4), ("v_buf", v_buf, 4),
                        ("query_start_loc", query_start_loc, 1), ("seq_lens", seq_lens, 1)):
        _check(name, t, nd)
    if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0:
        raise ValueError(f"sink must be a non-negative int, got {sink!r}")
    torch.ops.kvcomp.write_streaming_kv(key, value, k_buf, v_buf, query_start_loc, seq_lens, sink)
