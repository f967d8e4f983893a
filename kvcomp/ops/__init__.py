"""Public operators: validate arguments and dispatch to the native, Triton or pure-torch implementation.

Importing this package registers the ``kvcomp::*`` torch.library custom ops (with fake
implementations for torch.compile / CUDA graphs); Triton itself is imported only when an op runs.
"""

from kvcomp.ops.cache_write import triton_write_paged_kv
from kvcomp.ops.duo import triton_duo_decode_attention
from kvcomp.ops.host_mirror import gather_tokens, scatter_kv, scatter_tokens, sparse_attention_host
from kvcomp.ops.prefill import dense_prefill, triton_streaming_attention
from kvcomp.ops.think import think_decode
from kvcomp.ops.vq import topk_kmax, vq_encode, vq_encode_paged, vq_lut, vq_topk

__all__ = [
    "dense_prefill",
    "gather_tokens",
    "scatter_kv",
    "scatter_tokens",
    "sparse_attention_host",
    "think_decode",
    "topk_kmax",
    "triton_duo_decode_attention",
    "triton_streaming_attention",
    "triton_write_paged_kv",
    "vq_encode",
    "vq_encode_paged",
    "vq_lut",
    "vq_topk",
]
