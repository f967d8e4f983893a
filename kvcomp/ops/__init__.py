"""Public operators: validate arguments and dispatch to the native, Triton or pure-torch implementation."""

from kvcomp.ops.host_mirror import (
    gather_tokens,
    gather_tokens_torch,
    scatter_tokens,
    scatter_tokens_torch,
    sparse_attention_host,
    sparse_attention_host_torch,
)

__all__ = [
    "gather_tokens",
    "gather_tokens_torch",
    "scatter_tokens",
    "scatter_tokens_torch",
    "sparse_attention_host",
    "sparse_attention_host_torch",
]
