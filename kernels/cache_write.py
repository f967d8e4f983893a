"""Cache write (Triton): paged KV by slot mapping.

``write_paged_kv``: vLLM ``reshape_and_cache`` semantics; grid ``(cdiv(N, BLOCK_T), Hkv)``, each program
copies a ``[BLOCK_T, D]`` tile of one head to its slots (``slot == -1`` skips the token). ``BLOCK_T`` and
the warps are autotuned per (D, dtypes); ``N`` is not specialised (one compiled kernel for every step).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kvcomp.kernels._common import autotune, check_device, check_float, check_head_dim, check_int, check_shape

# a copy: the token tile and warps only (the first config is the interpreter's)
_CONFIGS = [triton.Config({"BLOCK_T": 16}, num_warps=4),
            triton.Config({"BLOCK_T": 8}, num_warps=2),
            triton.Config({"BLOCK_T": 32}, num_warps=4),
            triton.Config({"BLOCK_T": 64}, num_warps=8)]


# keyed by head dim (and dtypes): never by the token count
@autotune(_CONFIGS, key=["D"])
@triton.jit(do_not_specialize=["N"])
def _paged_write_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr, N, page_size,
                        sk_n, sk_h, sv_n, sv_h, skc_b, skc_s, skc_h, svc_b, svc_s, svc_h,
                        D: tl.constexpr, BLOCK_T: tl.constexpr):
    pid_t = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    tok = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, D)
    in_range = tok < N
    slot = tl.load(slot_ptr + tok, mask=in_range, other=-1).to(tl.int64)
    keep = in_range & (slot >= 0)
    blk = tl.where(keep, slot // page_size, 0)
    off = tl.where(keep, slot % page_size, 0)
    tok64 = tok.to(tl.int64)
    k = tl.load(k_ptr + tok64[:, None] * sk_n + h * sk_h + offs_d[None, :], mask=keep[:, None])
    v = tl.load(v_ptr + tok64[:, None] * sv_n + h * sv_h + offs_d[None, :], mask=keep[:, None])
    tl.store(kc_ptr + (blk * skc_b + off * skc_s + h * skc_h)[:, None] + offs_d[None, :], k, mask=keep[:, None])
    tl.store(vc_ptr + (blk * svc_b + off * svc_s + h * svc_h)[:, None] + offs_d[None, :], v, mask=keep[:, None])


def write_paged_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Write ``N`` tokens into a paged cache in place (Triton; same contract as
    ``kvcomp.ref.cache_write.write_paged_kv``).

    Args:
        key, value: ``[N, Hkv, D]`` (last dim contiguous, any other strides).
        k_cache, v_cache: ``[num_blocks, block_size, Hkv, D]``, same dtype as key.
        slot_mapping: ``[N]`` int32/int64, ``block * block_size + offset`` or ``-1`` (skip).
    Slot values are range-checked only for CPU tensors (no host sync on CUDA).
    """
    check_int("slot_mapping", slot_mapping, 1)
    n = slot_mapping.shape[0]
    check_float("k_cache", k_cache)
    if k_cache.dim() != 4:
        raise ValueError(f"k_cache must have shape [num_blocks, block_size, Hkv, D], got {list(k_cache.shape)}")
    nb, bs, h, d = k_cache.shape
    check_shape("v_cache", v_cache, (nb, bs, h, d))
    check_float("v_cache", v_cache, k_cache.dtype)
    check_shape("key", key, (n, h, d))
    check_shape("value", value, (n, h, d))
    check_float("key", key, k_cache.dtype)
    check_float("value", value, k_cache.dtype)
    check_head_dim("k_cache", d)
    dev = check_device(key=key, value=value, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)
    if dev.type == "cpu" and n and (int(slot_mapping.min()) < -1 or int(slot_mapping.max()) >= nb * bs):
        raise ValueError(f"slot_mapping values must be -1 or in [0, {nb * bs})")
    if n == 0 or h == 0:
        return
    _paged_write_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK_T"]), h)](
        key, value, k_cache, v_cache, slot_mapping.contiguous(), n, bs,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        D=d)
