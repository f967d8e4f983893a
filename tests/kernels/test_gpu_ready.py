"""Fixes that make the Triton kernels safe for their first GPU run, checked on the CPU (interpreter).

- offsets past 2^31 elements: a view with a head / sequence stride of 2^30 elements over a lazily
  allocated 4 GiB storage (only the touched pages are ever backed), so ``index * stride`` overflows
  32-bit arithmetic unless the kernel computes it in int64;
- ``streaming_prefill``'s grid: ``B * Hq`` query rows folded onto axis 0 (axes 1/2 stop at 65535);
- DuoAttention's split count sized from the retrieval heads (>= 4 programs per SM);
- the fixed ``BLOCK_B`` / split-count tiles are covered by test_sm90_compile.py (one compiled variant per
  kernel across batch sizes 1, 4 and 13).
"""

import pytest
import torch

from kvcomp.ref import vq_encode
from kvcomp.ref.think_paged import paged_pruned_key_attention

BIG = 2**30


def huge_stride_copy(x: torch.Tensor, dim: int) -> torch.Tensor:
    """``x`` as a view whose ``dim`` stride is 2^30 elements (index 2 of ``dim`` lies past 2^31)."""
    assert x.shape[dim] == 3 and x.is_contiguous()
    strides = list(x.stride())
    strides[dim] = BIG
    size = sum((n - 1) * st for n, st in zip(x.shape, strides)) + 1
    base = torch.empty(size, dtype=x.dtype)  # virtual memory: only the written pages are backed
    view = base.as_strided(x.shape, strides)
    view.copy_(x)
    return view


def test_vq_encode_head_offset_past_int32():
    """Dense ``[B, Hkv, T, D]`` keys whose head stride makes ``h * s_kh`` reach 2^31 (head 2)."""
    from kvcomp.kernels.vq_encode import triton_vq_encode

    gen = torch.Generator().manual_seed(0)
    d, nc = 16, 24
    cb = torch.randn(3, nc, d, generator=gen)
    lw = torch.eye(d).expand(3, d, d).contiguous()
    k = torch.randn(1, 3, 10, d, generator=gen).to(torch.float16)
    kv = huge_stride_copy(k, 1)
    assert kv.stride(1) * 2 >= 2**31
    out = triton_vq_encode(kv, cb, lw)
    ref = vq_encode(k, cb, lw)
    assert torch.equal(out, ref)


def test_think_decode_ring_offset_past_int32():
    """A ``k_recent`` ring whose sequence stride makes ``b * s_krb`` reach 2^31 (sequence 2)."""
    from kvcomp.kernels.think_decode import triton_think_decode

    gen = torch.Generator().manual_seed(1)
    b, hkv, g, d, dk, w, bs = 3, 1, 2, 16, 8, 4, 4
    lens = [5, 9, 7]
    mb = 3
    bt = torch.arange(b * mb, dtype=torch.int32).view(b, mb)
    kp = torch.randn(b * mb, bs, hkv, dk, generator=gen).half()
    vc = torch.randn(b * mb, bs, hkv, d, generator=gen).half()
    kr = torch.randn(b, hkv, w, d, generator=gen).half()
    chan = torch.stack([torch.randperm(d, generator=gen)[:dk].sort().values for _ in range(hkv)]).view(1, hkv, dk)
    q = torch.randn(b, hkv * g, d, generator=gen).half()
    sl = torch.tensor(lens, dtype=torch.int32)
    krv = huge_stride_copy(kr, 0)
    out = triton_think_decode(q, kp, chan, krv, vc, bt, sl)
    ref = paged_pruned_key_attention(q, kp, chan, kr, vc, bt, sl)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-3, rtol=2e-3)


def test_streaming_prefill_grid_on_axis0():
    """B * Hq = 131072 query rows: one flat axis-0 grid (axis 1 would stop at 65535)."""
    from kvcomp.kernels.streaming_prefill import prefill_grid

    assert prefill_grid(4096, 32, 16, 16) == (131072,)
    assert prefill_grid(2, 32, 100, 64) == (2 * 32 * 2,)
    with pytest.raises(ValueError, match="2\\^31"):
        prefill_grid(2**16, 64, 2**20, 16)


def test_streaming_prefill_many_rows_one_tile_each():
    """Many (sequence, head) rows with several query tiles each: the folded program id maps back right."""
    from kvcomp.kernels.streaming_prefill import streaming_prefill
    from kvcomp.ref import streaming_attention

    gen = torch.Generator().manual_seed(2)
    q = torch.randn(3, 4, 37, 16, generator=gen)
    k = torch.randn(3, 2, 37, 16, generator=gen)
    v = torch.randn(3, 2, 37, 16, generator=gen)
    out = streaming_prefill(q, k, v, sink=3, window=9)
    ref = streaming_attention(q, k, v, sink=3, window=9)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch, n_ret, tokens", [(1, 4, 131072), (1, 1, 32768), (16, 4, 131072), (4, 8, 32768)])
def test_duo_splits_fill_an_h100_from_the_retrieval_heads(monkeypatch, batch, n_ret, tokens):
    from kvcomp.kernels import duo_decode as DD

    monkeypatch.setattr(DD, "num_sms", lambda device: 132)
    s = DD.default_num_splits(batch, n_ret, tokens, 64, torch.device("cpu"))
    assert 1 <= s <= 256 and s <= tokens // 64
    assert batch * n_ret * s >= 4 * 132 or s == 256
    # a short context: at most one split per tile
    assert DD.default_num_splits(batch, n_ret, 100, 64, torch.device("cpu")) <= 2
