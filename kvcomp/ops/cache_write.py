"""``kvcomp::write_paged_kv``: the in-place paged cache write as a custom op.

It mutates its cache arguments (declared in ``mutates_args``) and returns nothing. It runs the
Triton kernel where :func:`kvcomp.ops._dispatch.impl_for` says so (CUDA, or the interpreter) and
the reference otherwise (an indexed copy: no native kernel is needed for it). Triton is imported
lazily inside the op. DuoAttention's streaming rings are written by their method
(:meth:`kvcomp.methods.duo.StreamingHeads.ring_write`).
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

