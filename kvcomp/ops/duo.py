"""``kvcomp::duo_decode``: DuoAttention head-split paged decode as a torch.library custom op.

The op body picks its implementation with ``impl_for(q, "duo_decode")``: the Triton kernel (CUDA, or
CPU under ``TRITON_INTERPRET=1``), the native CPU kernel ``torch.ops.kvcomp_C.duo_decode``
(csrc/paged_decode_cpu.cpp), or the reference. Eager CPU calls that run the native kernel call it
directly (the custom op's Python dispatch costs more than a short decode). Triton is imported
lazily inside the op, so importing this module is cheap. The fake implementation lets ``torch.compile`` trace and CUDA
graphs capture the decode step (the launcher never syncs with the host for CUDA tensors).
"""

from __future__ import annotations

import torch

from kvcomp.ops._dispatch import impl_for
from kvcomp.ref.duo import check_duo_inputs


@torch.library.custom_op("kvcomp::duo_decode", mutates_args=())
def _duo_decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
                   seq_lens: torch.Tensor, k_stream: torch.Tensor, v_stream: torch.Tensor, head_map: torch.Tensor,
                   sink: int, window: int, scale: float, num_splits: int,
                   ring_block: torch.Tensor | None = None) -> torch.Tensor:
    impl = impl_for(q, "duo_decode")
    if impl == "native":
        return torch.ops.kvcomp_C.duo_decode(q, k_cache, v_cache, block_table, seq_lens, k_stream, v_stream,
                                             head_map, sink, window, scale, num_splits, ring_block)
    if impl == "reference":
        from kvcomp.ref.duo import duo_decode_attention as ref

        return ref(q, k_cache, v_cache, block_table, seq_lens, k_stream, v_stream, head_map, sink=sink,
                   window=window, scale=scale, ring_block=ring_block)
    from kvcomp.kernels.duo_decode import duo_decode_attention

    return duo_decode_attention(q, k_cache, v_cache, block_table, seq_lens, k_stream, v_stream, head_map,
                                sink=sink, window=window, scale=scale,
                                num_splits=None if num_splits <= 0 else num_splits, ring_block=ring_block)


@_duo_decode_op.register_fake
def _duo_decode_fake(q, k_cache, v_cache, block_table, seq_lens, k_stream, v_stream, head_map, sink, window,
                     scale, num_splits, ring_block=None):
    return torch.empty_like(q)


def triton_duo_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                block_table: torch.Tensor, seq_lens: torch.Tensor, k_stream: torch.Tensor,
                                v_stream: torch.Tensor, head_map: torch.Tensor, *, sink: int, window: int,
                                scale: float | None = None, num_splits: int | None = None,
                                ring_block: torch.Tensor | None = None) -> torch.Tensor:
    """DuoAttention decode step through the ``kvcomp::duo_decode`` op: the Triton split-K kernel on
    CUDA tensors (or CPU tensors under ``TRITON_INTERPRET=1``), on CPU the native kernel when
    ``kvcomp._C`` has it, else the reference (see ``kvcomp.ops._dispatch.impl_for``).

    Same arguments and result as ``kvcomp.ref.duo.duo_decode_attention``:
    q ``[B, Hq, D]``; retrieval heads paged in ``k_cache, v_cache [num_blocks, block_size, n_ret, D]`` with
    ``block_table [B, max_blocks]`` / ``seq_lens [B]`` (incl. the new token); streaming heads in rings
    ``k_stream, v_stream [num_rings, n_str, capacity, D]`` read in place, request ``b``'s ring at
    ``ring_block[b]`` (``[B]`` int; ``None``: ring ``b``); ``head_map [n_ret + n_str, 2]`` = (kind, index).
    Returns ``[B, Hq, D]`` in q's dtype. ``num_splits=None`` picks a shape-only default.
    """
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits must be a positive int or None, got {num_splits!r}")
    op = torch.ops.kvcomp.duo_decode
    if (isinstance(q, torch.Tensor) and q.is_cpu and impl_for(q, "duo_decode") == "native"
            and not torch.compiler.is_compiling()):
        # eager CPU: the native operator itself, which checks its inputs (shapes, dtypes, devices,
        # strides, block ids) in C++; no custom-op Python dispatch (~70 us a call, measured by
        # bench/vllm_layer_decode.py: a vLLM decode step calls it once per layer)
        op = torch.ops.kvcomp_C.duo_decode.default  # the overload itself: no resolution per call
    else:
        check_duo_inputs(q, k_cache, v_cache, block_table, seq_lens, k_stream, v_stream, head_map, sink, window,
                         ring_block)
    scale = 1.0 / q.shape[-1] ** 0.5 if scale is None else float(scale)
    return op(q, k_cache, v_cache, block_table, seq_lens, k_stream, v_stream, head_map, sink, window, scale,
              0 if num_splits is None else num_splits, ring_block)
