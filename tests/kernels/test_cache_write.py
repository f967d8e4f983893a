"""Paged KV write by slot mapping (Triton) vs kvcomp.ref.cache_write (exact)."""

import pytest
import torch

from kvcomp.ref import cache_write as R
from kvcomp.testing import assert_equal


def dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def same(name, a, b):
    """Exact equality, NaN (never-written slots) included."""
    assert_equal(name + " nan-pattern", torch.isnan(a.float()), torch.isnan(b.float()))
    assert_equal(name, a.float().nan_to_num(0.0), b.float().nan_to_num(0.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64], ids=["i32", "i64"])
def test_write_paged_kv(dtype, slot_dtype, nan_empty):
    from kvcomp.ops.cache_write import triton_write_paged_kv

    gen = torch.Generator().manual_seed(0)
    nb, bs, h, d, n = 5, 4, 3, 16, 19
    kc = torch.full((nb, bs, h, d), float("nan"), dtype=dtype, device=dev())
    vc = kc.clone()
    kc2, vc2 = kc.clone(), vc.clone()
    slots = torch.randperm(nb * bs, generator=gen)[:n]
    slots[[0, 7, 18]] = -1
    # strided key/value: a head slice of a wider projection (last dim contiguous)
    key = torch.randn(n, 2 * h, d, generator=gen).to(device=dev(), dtype=dtype)[:, ::2]
    val = torch.randn(n, h, d, generator=gen).to(device=dev(), dtype=dtype)
    slots = slots.to(device=dev(), dtype=slot_dtype)
    R.write_paged_kv(key, val, kc, vc, slots)
    triton_write_paged_kv(key, val, kc2, vc2, slots)
    same("k_cache", kc, kc2)
    same("v_cache", vc, vc2)


def test_write_paged_kv_rejects():
    from kvcomp.kernels.cache_write import write_paged_kv

    kc = torch.zeros(2, 4, 1, 16)
    key = torch.zeros(3, 1, 16)
    with pytest.raises(ValueError, match="slot_mapping"):
        write_paged_kv(key, key, kc, kc.clone(), torch.tensor([0, 8, 1]))
    with pytest.raises(ValueError, match="key"):
        write_paged_kv(torch.zeros(3, 2, 16), key, kc, kc.clone(), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="dtype"):
        write_paged_kv(key.half(), key.half(), kc, kc.clone(), torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="slot_mapping"):
        write_paged_kv(key, key, kc, kc.clone(), torch.tensor([0.0, 1.0, 2.0]))
