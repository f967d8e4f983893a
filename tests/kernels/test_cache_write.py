"""Paged KV write by slot mapping and streaming ring write (Triton) vs kvcomp.ref.cache_write (exact)."""

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


# ragged steps of new tokens per sequence: prefill longer than sink + window, partial sink fills,
# decode steps that wrap the ring, empty steps
STEPS = [[2, 1, 12, 0], [1, 0, 1, 3], [6, 3, 1, 1], [1, 1, 20, 1], [0, 9, 1, 5]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("sink, window", [(3, 5), (0, 4), (6, 1)], ids=["s3w5", "s0w4", "s6w1"])
def test_write_streaming_kv(dtype, sink, window, nan_empty):
    from kvcomp.ops.cache_write import triton_write_streaming_kv

    gen = torch.Generator().manual_seed(1)
    b, h, d = 4, 2, 16
    kb = torch.full((b, h, sink + window, d), float("nan"), dtype=dtype, device=dev())
    vb = kb.clone()
    kb2, vb2 = kb.clone(), vb.clone()
    lens = [0] * b
    for step in STEPS:
        lens = [x + s for x, s in zip(lens, step)]
        qsl = torch.tensor([0] + list(torch.tensor(step).cumsum(0)), dtype=torch.int32, device=dev())
        sl = torch.tensor(lens, dtype=torch.int32, device=dev())
        key = torch.randn(sum(step), h, d, generator=gen).to(device=dev(), dtype=dtype)
        val = torch.randn(sum(step), h, d, generator=gen).to(device=dev(), dtype=dtype)
        R.write_streaming_kv(key, val, kb, vb, qsl, sl, sink=sink)
        triton_write_streaming_kv(key, val, kb2, vb2, qsl, sl, sink=sink)
        same(f"k_buf after {lens}", kb, kb2)
        same(f"v_buf after {lens}", vb, vb2)


def test_write_streaming_kv_keeps_last_window():
    """A chunk longer than the window leaves exactly the sinks and the last `window` tokens."""
    from kvcomp.kernels.cache_write import write_streaming_kv

    sink, window, d, n = 2, 3, 16, 11
    key = torch.arange(n, dtype=torch.float32).view(n, 1, 1).expand(n, 1, d).contiguous().to(dev())
    kb = torch.full((1, 1, sink + window, d), -1.0, device=dev())
    vb = kb.clone()
    write_streaming_kv(key, key, kb, vb, torch.tensor([0, n], device=dev()), torch.tensor([n], device=dev()),
                       sink=sink)
    # tokens 0, 1 in the sinks; 8, 9, 10 in ring slots 2 + (p - 2) % 3 = 2 + [0, 1, 2]
    assert kb[0, 0, :, 0].tolist() == [0.0, 1.0, 8.0, 9.0, 10.0]


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


def test_write_streaming_kv_rejects():
    from kvcomp.kernels.cache_write import write_streaming_kv

    kb = torch.zeros(2, 1, 5, 16)
    key = torch.zeros(3, 1, 16)
    qsl = torch.tensor([0, 1, 3])
    with pytest.raises(ValueError, match="window"):
        write_streaming_kv(key, key, kb, kb.clone(), qsl, torch.tensor([1, 2]), sink=5)
    with pytest.raises(ValueError, match="seq_lens"):
        write_streaming_kv(key, key, kb, kb.clone(), qsl, torch.tensor([1, 1]), sink=2)
    with pytest.raises(ValueError, match="query_start_loc"):
        write_streaming_kv(key, key, kb, kb.clone(), torch.tensor([0, 1, 2]), torch.tensor([1, 2]), sink=2)
