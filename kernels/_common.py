"""Shared helpers for the Triton kernels in ``kernels/`` (host-side checks and small device helpers).

Importing this module imports triton; ``import kvcomp`` never does (the ops in ``kvcomp/ops`` import
kernels lazily, inside the op).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when Triton runs in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_head_dim(name: str, d: int) -> None:
    """Head dims the kernels support (:data:`kvcomp.defaults.SUPPORTED_HEAD_DIMS`; 64 and 128 are the tuned ones)."""
    from kvcomp.defaults import check_head_dim as check

    check(name, d)


def check_float(name: str, t: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    """``t`` is a fp32/fp16/bf16 tensor (of ``dtype`` when given) with a contiguous last dim."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; supported: float32, float16, bfloat16")
    if dtype is not None and t.dtype != dtype:
        raise ValueError(f"{name} has dtype {t.dtype} but must match {dtype}")
    if t.dim() and t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim (stride {t.stride(-1)})")


def check_int(name: str, t: torch.Tensor, ndim: int) -> None:
    """``t`` is an int32/int64 tensor with ``ndim`` dims."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")


def check_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    """Exact shape check (entries of ``None`` are free)."""
    if t.dim() != len(shape) or any(w is not None and g != w for g, w in zip(t.shape, shape)):
        want = "[" + ", ".join("*" if w is None else str(w) for w in shape) + "]"
        raise ValueError(f"{name} must have shape {want}, got {list(t.shape)}")


def check_device(**tensors: torch.Tensor) -> torch.device:
    """All tensors on one device; CPU only under the interpreter. Returns the device."""
    items = list(tensors.items())
    dev = items[0][1].device
    for n, t in items[1:]:
        if t.device != dev:
            raise ValueError(f"{n} is on {t.device} but {items[0][0]} is on {dev}")
    if dev.type == "cpu" and not interpreting():
        raise ValueError(f"{items[0][0]} is on the CPU: the Triton kernels need CUDA tensors "
                         "(or TRITON_INTERPRET=1 for the interpreter)")
    return dev


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else triton.next_power_of_2(int(x))


def kv_block_n(d: int, dtype: torch.dtype, num_warps: int = 4) -> int:
    """GPU key-tile length for a head dim, KV dtype and warp count, so K, V and the fp32 accumulator stay
    in registers on sm_90 (checked by tests/kernels/test_sm90_compile.py): a ``[BLOCK_N, D]`` tile of at
    most 16 KiB in 16-bit (64 rows at D=128, 32 at D=256); fp32 dots run at IEEE precision on the FMA
    units and need more registers, so 2 KiB per warp (4 warps, D=128: 16 rows; 8 warps: 32)."""
    size = torch.finfo(dtype).bits // 8
    budget = 2048 * num_warps if dtype == torch.float32 else 16384
    return max(16, min(64, budget // (d * size)))


def autotune(configs: list, key: list, prune=None, restore: list | None = None):
    """``triton.autotune`` over ``configs`` keyed by ``key`` (kernel argument names; Triton adds the
    tensors' dtypes): the key must not name the batch size or a sequence length, so serving tunes once
    per model geometry and never per batch. ``prune(configs, nargs, **meta)`` drops the configs that do
    not fit a launch. ``restore``: arguments a launch accumulates into (atomics), restored after each
    benchmark run. Under the interpreter only the first config exists (no benchmark, no extra runs)."""
    if interpreting():
        return triton.autotune(configs=configs[:1], key=key, restore_value=restore)
    return triton.autotune(configs=configs, key=key, restore_value=restore,
                           prune_configs_by={"early_config_prune": prune} if prune else None)


SHARED_LIMIT = 232448  # bytes of shared memory a block may opt into on sm_90 (227 KB)


def reg_budget(f32: bool, num_warps: int) -> int:
    """Bytes of one streamed operand tile (e.g. ``[BLOCK_N, D]`` keys) that stay in registers on sm_90 next
    to a kernel's accumulators (the budget of :func:`kv_block_n`): 16 KiB in 16-bit; fp32 dots run at IEEE
    precision on the FMA units and need more registers, so 2 KiB per warp."""
    return 2048 * num_warps if f32 else 16384


def prune_sm90(tiles, *, f32_strict: bool = False, fallback=None):
    """An ``early_config_prune`` for :func:`autotune`. ``tiles(config, nargs, meta) -> (reg, smem, f32)``:
    the bytes of the largest operand tile one loop step holds, the shared memory one pipeline stage needs
    and whether the dots run in fp32. Keeps the configs with ``reg <= reg_budget(f32, warps)`` (strictly
    under it for fp32 tiles with ``f32_strict``: a kernel holding two such tiles a step, which spilled at
    exactly the budget) and ``num_stages * smem <= SHARED_LIMIT`` (tests/kernels/test_sm90_compile.py
    compiles every kept config and checks shared memory and spills). When none fits (a shape outside the
    tuned range), the configs ``fallback(config)`` accepts, else the config with the smallest register tile."""
    def prune(configs, nargs, **meta):
        size = {c: tiles(c, nargs, meta) for c in configs}

        def fits(c):
            reg, smem, f32 = size[c]
            budget = reg_budget(f32, c.num_warps)
            return (reg < budget if f32 and f32_strict else reg <= budget) and c.num_stages * smem <= SHARED_LIMIT

        kept = [c for c in configs if fits(c)]
        if not kept and fallback is not None:
            kept = [c for c in configs if fallback(c)]
        return kept or [min(configs, key=lambda c: size[c][0])]
    return prune


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a fixed 8 under the interpreter / on the CPU)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def dot_f32(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a kernel should compute its dots in fp32: always under the interpreter (bf16 arithmetic
    is wrong there) and for fp32 inputs (then with IEEE precision, not TF32)."""
    return interpreting() or device.type != "cuda" or dtype == torch.float32


@triton.jit
def dot(a, b, F32: tl.constexpr):
    """``a @ b`` accumulated in fp32. ``F32``: inputs already fp32, use IEEE precision (no TF32)."""
    if F32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)
