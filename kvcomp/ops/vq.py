"""A²ATS ops: ``kvcomp::vq_lut``, ``kvcomp::vq_topk``, ``kvcomp::vq_encode``, ``kvcomp::vq_encode_paged``
(torch.library custom ops with fake implementations).

A decode step is ``lut = vq_lut(q_wrope, codebook)`` -> ``idx, count = vq_topk(lut, code_cache, ...)``
-> ``o = sparse_attention_host(q, k, v, idx, count, block_table=...)`` (:mod:`kvcomp.ops.host_mirror`:
native on the host pages, the Triton sparse decode over GPU pages); new keys are encoded with
``vq_encode_paged`` into the int16 code cache ``[num_blocks, block_size, Hkv]`` (same block table as
the KV pages). Each op body picks its implementation with ``impl_for(tensor, "<native op>")``
(:mod:`kvcomp.ops._dispatch`): the Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``), the
native CPU kernel ``torch.ops.kvcomp_C.vq_lut|vq_topk|vq_encode|vq_encode_paged`` when ``kvcomp._C``
has it, else the pure-PyTorch reference; Triton is imported lazily.
``vq_topk`` returns a static ``Kmax`` (see :func:`topk_kmax`) so its output shape never depends on data.
"""

from __future__ import annotations

import torch

from kvcomp.ops._dispatch import impl_for


def topk_kmax(topk, group: int, sink: int, local: int, capacity: int) -> int:
    """Columns of ``vq_topk``'s ``idx``: ``min(capacity, G*topk + sink + local)`` for an int ``topk``,
    ``capacity`` (= ``max_blocks * block_size``) for a per-sequence tensor."""
    if isinstance(topk, torch.Tensor):
        return max(1, capacity)
    return max(1, min(capacity, group * int(topk) + sink + local))


@torch.library.custom_op("kvcomp::vq_lut", mutates_args=())
def _vq_lut_op(q_wrope: torch.Tensor, codebook: torch.Tensor, scale: float) -> torch.Tensor:
    impl = impl_for(q_wrope, "vq_lut")
    if impl == "native":
        return torch.ops.kvcomp_C.vq_lut(q_wrope, codebook, scale)
    if impl == "reference":
        from kvcomp.ref import vq_lut as ref

        return ref(q_wrope, codebook, scale=scale)
    from kvcomp.kernels.vq_lut import triton_vq_lut

    return triton_vq_lut(q_wrope, codebook, scale=scale)


@_vq_lut_op.register_fake
def _vq_lut_fake(q_wrope, codebook, scale):
    return q_wrope.new_empty(q_wrope.shape[0], q_wrope.shape[1], codebook.shape[1], dtype=torch.float32)


@torch.library.custom_op("kvcomp::vq_topk", mutates_args=())
def _vq_topk_op(lut: torch.Tensor, code_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
                topk: torch.Tensor, sink: int, local: int, kmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    impl = impl_for(lut, "vq_topk")
    if impl == "native":
        return torch.ops.kvcomp_C.vq_topk(lut, code_cache, block_table, seq_lens, topk, sink, local, kmax)
    if impl == "reference":
        from kvcomp.ref.vq_paged import paged_vq_topk

        idx, count = paged_vq_topk(lut, code_cache, block_table, seq_lens, topk=topk, sink=sink, local=local)
        out = torch.zeros(idx.shape[0], idx.shape[1], kmax, dtype=torch.int32, device=lut.device)
        k = min(idx.shape[2], kmax)
        out[..., :k] = idx[..., :k]
        last = idx[..., -1:] if idx.shape[2] else out[..., :1]
        out[..., k:] = last
        return out, count
    from kvcomp.kernels.vq_topk import triton_vq_topk

    return triton_vq_topk(lut, code_cache, block_table, seq_lens, topk=topk, sink=sink, local=local, kmax=kmax)


@_vq_topk_op.register_fake
def _vq_topk_fake(lut, code_cache, block_table, seq_lens, topk, sink, local, kmax):
    b, hkv = lut.shape[0], code_cache.shape[2]
    return (lut.new_empty(b, hkv, kmax, dtype=torch.int32), lut.new_empty(b, hkv, dtype=torch.int32))


@torch.library.custom_op("kvcomp::vq_encode", mutates_args=())
def _vq_encode_op(k_pre: torch.Tensor, codebook: torch.Tensor, whiten: torch.Tensor) -> torch.Tensor:
    impl = impl_for(k_pre, "vq_encode")
    if impl == "native":
        return torch.ops.kvcomp_C.vq_encode(k_pre, codebook, whiten)
    if impl == "reference":
        from kvcomp.ref import vq_encode as ref

        return ref(k_pre, codebook, whiten)
    from kvcomp.kernels.vq_encode import triton_vq_encode

    return triton_vq_encode(k_pre, codebook, whiten)


@_vq_encode_op.register_fake
def _vq_encode_fake(k_pre, codebook, whiten):
    return k_pre.new_empty(k_pre.shape[:3], dtype=torch.int16)


@torch.library.custom_op("kvcomp::vq_encode_paged", mutates_args=("code_cache",))
def _vq_encode_paged_op(k_new: torch.Tensor, codebook: torch.Tensor, whiten: torch.Tensor, code_cache: torch.Tensor,
                        block_table: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor) -> None:
    impl = impl_for(k_new, "vq_encode_paged")
    if impl == "native":
        torch.ops.kvcomp_C.vq_encode_paged(k_new, codebook, whiten, code_cache, block_table, seq_lens,
                                           query_start_loc)
        return
    if impl == "reference":
        from kvcomp.ref.compressed_write import vq_encode_paged as ref

        ref(k_new, codebook, whiten, code_cache, block_table, seq_lens, query_start_loc)
        return
    from kvcomp.kernels.vq_encode import triton_vq_encode_paged

    triton_vq_encode_paged(k_new, codebook, whiten, code_cache, block_table, seq_lens, query_start_loc)


@_vq_encode_paged_op.register_fake
def _vq_encode_paged_fake(k_new, codebook, whiten, code_cache, block_table, seq_lens, query_start_loc):
    return None


def _scale(scale, d: int) -> float:
    if scale is None:
        return 1.0 / d ** 0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a float or None, got {scale!r}")
    return float(scale)


def vq_lut(q_wrope: torch.Tensor, codebook: torch.Tensor, *, scale: float | None = None) -> torch.Tensor:
    """``[B, Hq, C]`` fp32 centroid scores (contract of :func:`kvcomp.ref.vq_lut`), via ``kvcomp::vq_lut``."""
    if not isinstance(q_wrope, torch.Tensor) or q_wrope.dim() != 3:
        raise ValueError("q_wrope must be a [B, Hq, D] tensor")
    return torch.ops.kvcomp.vq_lut(q_wrope, codebook, _scale(scale, q_wrope.shape[-1]))


def vq_topk(lut: torch.Tensor, code_cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor, *,
            topk, sink: int, local: int, kmax: int | None = None,
            topk_max: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact A²ATS selection over a paged code cache, via ``kvcomp::vq_topk``.

    Contract of :func:`kvcomp.ref.vq_paged.paged_vq_topk` (ties prefer the lower position), except
    that ``idx`` has ``kmax`` columns (default :func:`topk_kmax`), of which the reference's
    ``max(count)`` are a prefix; the rest repeat each row's last index.

    Args:
        lut: ``[B, Hq, C]`` fp32; code_cache: ``[num_blocks, block_size, Hkv]`` int16;
        block_table: ``[B, max_blocks]``; seq_lens: ``[B]``; topk: int or ``[B]`` int tensor;
        sink, local: always-kept leading / trailing tokens.
        kmax: columns of ``idx`` (default and minimum: :func:`topk_kmax`).
        topk_max: a host-known bound on a tensor ``topk`` (e.g. from vLLM's ``max_seq_len``): it
            bounds the count, so ``kmax`` may be ``G*topk_max + sink + local`` instead of the
            block-table capacity. Checked against ``topk`` when that lives on the CPU
            (in eager mode; not while ``torch.compile`` traces).
    Returns:
        ``(idx [B, Hkv, kmax] int32, count [B, Hkv] int32)``.
    """
    for name, t in (("lut", lut), ("code_cache", code_cache), ("block_table", block_table)):
        if not isinstance(t, torch.Tensor) or t.dim() != (2 if name == "block_table" else 3):
            raise ValueError(f"{name} must be a tensor with {2 if name == 'block_table' else 3} dims")
    for name, x in (("sink", sink), ("local", local)):
        if isinstance(x, bool) or not isinstance(x, int) or x < 0:
            raise ValueError(f"{name} must be a non-negative int, got {x!r}")
    b, hq = lut.shape[0], lut.shape[1]
    hkv = code_cache.shape[2]
    if hkv < 1 or hq % hkv:
        raise ValueError(f"lut: {hq} query heads is not a multiple of {hkv} KV heads")
    if isinstance(topk, torch.Tensor):
        topk_t = topk
    elif isinstance(topk, int) and not isinstance(topk, bool) and topk >= 0:
        topk_t = torch.full((b,), min(topk, 2**31 - 1), dtype=torch.int32, device=lut.device)
    else:
        raise ValueError(f"topk must be a non-negative int or a [B] int tensor, got {topk!r}")
    bound = topk
    if topk_max is not None:
        if not isinstance(topk, torch.Tensor) or isinstance(topk_max, bool) or not isinstance(topk_max, int) \
                or topk_max < 0:
            raise ValueError(f"topk_max must be a non-negative int bounding a tensor topk, got {topk_max!r}")
        # a value check (host read): eager only, so a traced / captured step stays free of host syncs
        if topk.device.type == "cpu" and topk.numel() and not torch.compiler.is_compiling() \
                and int(topk.max()) > topk_max:
            raise ValueError(f"topk has {int(topk.max())}, more than topk_max={topk_max}")
        bound = topk_max
    need = topk_kmax(bound, hq // hkv, sink, local, block_table.shape[1] * code_cache.shape[1])
    if kmax is None:
        kmax = need
    elif isinstance(kmax, bool) or not isinstance(kmax, int) or kmax < need:
        raise ValueError(f"kmax must be an int >= {need} (the largest possible count), got {kmax!r}")
    return torch.ops.kvcomp.vq_topk(lut, code_cache, block_table, seq_lens, topk_t, sink, local, kmax)


def vq_encode(k_pre: torch.Tensor, codebook: torch.Tensor, whiten: torch.Tensor) -> torch.Tensor:
    """``[B, Hkv, T]`` int16 codes of dense keys (contract of :func:`kvcomp.ref.vq_encode`)."""
    return torch.ops.kvcomp.vq_encode(k_pre, codebook, whiten)


def vq_encode_paged(k_new: torch.Tensor, codebook: torch.Tensor, whiten: torch.Tensor, code_cache: torch.Tensor,
                    block_table: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor) -> torch.Tensor:
    """Encode new keys ``[N, Hkv, D]`` into ``code_cache`` in place (contract of
    :func:`kvcomp.ref.compressed_write.vq_encode_paged`); returns ``code_cache``."""
    torch.ops.kvcomp.vq_encode_paged(k_new, codebook, whiten, code_cache, block_table, seq_lens, query_start_loc)
    return code_cache
