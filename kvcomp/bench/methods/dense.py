"""Full attention: the baselines every method is compared with.

CUDA baselines (dense KV ``[B, Hkv, T, D]``): torch SDPA on the flash backend, ``torch.compile``d
FlexAttention, ``flash_attn`` when installed. CPU cases: ``sdpa`` (torch SDPA over contiguous K/V,
``enable_gqa``), ``off`` (kvcomp's own dense paged decode: ``kvcomp.ops`` DuoAttention decode with no
streaming heads, as the vLLM backend runs compression off), ``vllm_cpu`` (vLLM's CPU paged attention,
recorded as unavailable when vLLM is not importable).
"""

from __future__ import annotations

from typing import Callable

import torch

from kvcomp.bench.core import Baseline, CpuCase, Problem, dense_qkv, generator, pages, randn, register_cpu, seq_lens


def decode_len(p: Problem) -> int:
    return 1


def prefill_len(p: Problem) -> int:
    return p.get("q_len") or p.context


def kv_read_bytes(p: Problem, tokens_per_head: int, heads: int | None = None) -> int:
    """K + V bytes of ``tokens_per_head`` rows for ``heads`` KV heads (default all) of every sequence."""
    return 2 * p.batch * (p.hkv if heads is None else heads) * tokens_per_head * p.d * p.elt


# --------------------------------------------------------------------------------------------------
# CUDA baselines


def sdpa_flash_baseline(q_len: Callable[[Problem], int]) -> Baseline:
    """torch SDPA restricted to the flash backend, GQA via ``enable_gqa``, causal when q_len > 1."""

    def run(x):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        q, k, v = x
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1,
                                                                    enable_gqa=True)

    def make(p):
        x = dense_qkv(p, q_len(p))
        run(x)  # raises here (recorded as unavailable) if the backend rejects the shape
        return x

    return Baseline(make, run)


def _flex_run(x):
    fn, q, k, v, mask = x
    return fn(q, k, v, block_mask=mask, enable_gqa=True)


def flex_baseline(q_len: Callable[[Problem], int]) -> Baseline:
    """``torch.compile``d FlexAttention (causal block mask for prefill, none for decode)."""

    def make(p):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        q, k, v = dense_qkv(p, q_len(p))
        fn = torch.compile(flex_attention, dynamic=False)
        mask = None
        if q.shape[2] > 1:
            off = k.shape[2] - q.shape[2]
            mask = create_block_mask(lambda b, h, qi, ki: ki <= qi + off, None, None, q.shape[2], k.shape[2],
                                     device=p.device)
        x = (fn, q, k, v, mask)
        _flex_run(x)
        return x

    return Baseline(make, _flex_run)


def _fa_run(x):
    import flash_attn

    q, k, v = x
    if q.shape[1] == 1:
        return flash_attn.flash_attn_with_kvcache(q, k, v)
    return flash_attn.flash_attn_func(q, k, v, causal=True)


def flash_attn_baseline(q_len: Callable[[Problem], int]) -> Baseline:
    """``flash_attn`` (``flash_attn_with_kvcache`` for decode, ``flash_attn_func`` causal for prefill)."""

    def make(p):
        import flash_attn  # noqa: F401  (ImportError -> unavailable)

        q, k, v = dense_qkv(p, q_len(p))
        x = (q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous())
        _fa_run(x)
        return x

    return Baseline(make, _fa_run)


def full_attention_baselines(q_len: Callable[[Problem], int]) -> dict[str, Baseline]:
    """The standard comparison set: SDPA flash backend, FlexAttention, flash_attn (when installed)."""
    return {"sdpa_flash": sdpa_flash_baseline(q_len), "flex": flex_baseline(q_len),
            "flash_attn": flash_attn_baseline(q_len)}


# --------------------------------------------------------------------------------------------------
# CPU cases


def _make_sdpa(p: Problem) -> dict:
    q, k, v = dense_qkv(p, 1)
    return dict(q=q, k=k, v=v)


def _run_sdpa(x):
    return torch.nn.functional.scaled_dot_product_attention(x["q"], x["k"], x["v"], enable_gqa=True)


register_cpu(CpuCase(
    name="sdpa", description="full attention, torch SDPA over contiguous K/V [B, Hkv, T, D] (enable_gqa)",
    make=_make_sdpa, run=_run_sdpa, nbytes=lambda p, x: kv_read_bytes(p, p.context),
    label="torch.sdpa"))


def make_dense_paged(p: Problem) -> dict:
    """Paged K/V ``[num_blocks, block_size, Hkv, D]`` (permuted blocks), every KV head a retrieval head."""
    from kvcomp.ref.duo import duo_head_map

    g = generator(p)
    nb, bt = pages(p, g)
    bs = p.get("block_size")
    none = torch.empty(p.batch, 0, 1, p.d, device=p.device, dtype=p.dtype)
    return dict(q=randn(p, g, p.batch, p.hq, p.d), k_cache=randn(p, g, nb, bs, p.hkv, p.d),
                v_cache=randn(p, g, nb, bs, p.hkv, p.d), block_table=bt, seq_lens=seq_lens(p), k_stream=none,
                v_stream=none, head_map=duo_head_map(torch.zeros(p.hkv, dtype=torch.bool)).to(p.device),
                sink=0, window=1)


def run_duo_ops(x):
    """One decode step through ``kvcomp.ops.triton_duo_decode_attention`` (the ``kvcomp::duo_decode`` op)."""
    from kvcomp.ops import triton_duo_decode_attention

    return triton_duo_decode_attention(x["q"], x["k_cache"], x["v_cache"], x["block_table"], x["seq_lens"],
                                       x["k_stream"], x["v_stream"], x["head_map"], sink=x["sink"],
                                       window=x["window"])


DUO_OPS = (("", "duo_decode"),)


register_cpu(CpuCase(
    name="off", description="compression off: kvcomp's dense paged decode (kvcomp.ops duo decode, no streaming "
                            "heads); its time is every row's dense_paged_ms",
    make=make_dense_paged, run=run_duo_ops, nbytes=lambda p, x: kv_read_bytes(p, p.context), ops=DUO_OPS))


def _make_vllm_cpu(p: Problem):
    try:
        import vllm  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"vLLM not importable ({type(e).__name__}: {e})") from None
    raise RuntimeError(f"vLLM {vllm.__version__} is importable but this benchmark has no adapter for its CPU "
                       "paged-attention op (compare end to end with bench/vllm_cpu.py)")


register_cpu(CpuCase(
    name="vllm_cpu", description="vLLM's CPU paged attention (only where vLLM is importable)",
    make=_make_vllm_cpu, run=lambda x: None, nbytes=lambda p, x: kv_read_bytes(p, p.context),
    label="vllm", kv_bytes=lambda p: 0))
