"""ThinK op: ``kvcomp::think_decode`` (a torch.library custom op).

Cache layout (see ``kernels/think_decode.py`` and :mod:`kvcomp.ref.think_paged`): pruned keys in pages
``kp_cache [num_blocks, block_size, Hkv, Dk]``, kept channels ``chan_idx [B or 1, Hkv, Dk]``, a
full-width ring ``k_recent [B, Hkv, W, D]`` (token ``p`` in slot ``p % W``, the last ``min(L, W)``
tokens), values in ordinary pages ``v_cache [num_blocks, block_size, Hkv, Dv]``.

The op runs the Triton kernel on CUDA tensors (or on CPU tensors under ``TRITON_INTERPRET=1``);
on CPU the native kernel ``torch.ops.kvcomp_C.think_decode`` when ``kvcomp._C`` has it, the
pure-PyTorch reference otherwise (``kvcomp.ops._dispatch.impl_for``). Triton is imported lazily
inside the op; the fake implementation lets ``torch.compile`` trace it and CUDA graphs capture it
(no host sync). ThinK's page writes are plain slot writes (:func:`kvcomp.methods.dense.write_pages`).
"""

from __future__ import annotations

import torch

from kvcomp.ops._dispatch import impl_for


@torch.library.custom_op("kvcomp::think_decode", mutates_args=())
def _think_decode_op(q: torch.Tensor, kp_cache: torch.Tensor, chan_idx: torch.Tensor, k_recent: torch.Tensor,
                     v_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                     tokens_per_split: int, max_seq_len: int) -> torch.Tensor:
    impl = impl_for(q, "think_decode")
    if impl == "native":
        return torch.ops.kvcomp_C.think_decode(q, kp_cache, chan_idx, k_recent, v_cache, block_table, seq_lens, scale,
                                               tokens_per_split, max_seq_len)
    if impl == "reference":
        from kvcomp.ref.think_paged import paged_pruned_key_attention

        return paged_pruned_key_attention(q, kp_cache, chan_idx, k_recent, v_cache, block_table, seq_lens,
                                          scale=scale)
    from kvcomp.kernels.think_decode import triton_think_decode

    return triton_think_decode(q, kp_cache, chan_idx, k_recent, v_cache, block_table, seq_lens, scale=scale,
                               tokens_per_split=None if tokens_per_split <= 0 else tokens_per_split,
                               max_seq_len=None if max_seq_len <= 0 else max_seq_len)


@_think_decode_op.register_fake
def _think_decode_fake(q, kp_cache, chan_idx, k_recent, v_cache, block_table, seq_lens, scale, tokens_per_split,
                       max_seq_len):
    return q.new_empty(q.shape[0], q.shape[1], v_cache.shape[3])


def think_decode(q: torch.Tensor, kp_cache: torch.Tensor, chan_idx: torch.Tensor, k_recent: torch.Tensor,
                 v_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, *,
                 scale: float | None = None, tokens_per_split: int | None = None,
                 max_seq_len: int | None = None) -> torch.Tensor:
    """ThinK decode step over the paged layout (module doc), through ``kvcomp::think_decode``.

    Same arguments and result as :func:`kvcomp.ref.think_paged.paged_pruned_key_attention`:
    q ``[B, Hq, D]``, kp_cache ``[num_blocks, block_size, Hkv, Dk]``, chan_idx ``[B or 1, Hkv, Dk]``,
    k_recent ``[B, Hkv, W, D]``, v_cache ``[num_blocks, block_size, Hkv, Dv]``, block_table
    ``[B, max_blocks]``, seq_lens ``[B]`` (incl. the new token). Returns ``[B, Hq, Dv]`` in q's dtype.
    ``scale`` defaults to ``1/sqrt(D)`` of the full head dim; ``tokens_per_split=None`` sizes the
    split-K parts to fill the GPU, from ``max_seq_len`` (a host-known bound on ``seq_lens``, e.g.
    vLLM's) when given, else from the block-table capacity (no host sync either way).
    """
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError("q must be a [B, Hq, D] tensor")
    if tokens_per_split is not None and (isinstance(tokens_per_split, bool) or not isinstance(tokens_per_split, int)
                                         or tokens_per_split < 1):
        raise ValueError(f"tokens_per_split must be a positive int or None, got {tokens_per_split!r}")
    if max_seq_len is not None and (isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int)
                                    or max_seq_len < 1):
        raise ValueError(f"max_seq_len must be a positive int or None, got {max_seq_len!r}")
    sc = 1.0 / q.shape[-1] ** 0.5 if scale is None else float(scale)
    op = torch.ops.kvcomp.think_decode
    if q.is_cpu and impl_for(q, "think_decode") == "native" and not torch.compiler.is_compiling():
        op = torch.ops.kvcomp_C.think_decode.default  # eager CPU: no custom-op Python dispatch (as kvcomp.ops.duo)
    return op(q, kp_cache, chan_idx, k_recent, v_cache, block_table, seq_lens, sc, tokens_per_split or 0,
              max_seq_len or 0)

