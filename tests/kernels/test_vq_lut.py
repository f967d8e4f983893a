"""The A²ATS LUT kernel (one program per KV head and codebook tile, every query row of the step in it)
vs :func:`kvcomp.ref.vq_lut`: batch 1/3/8/9 (9 x 8 rows take two row tiles under the interpreter), GQA
1-8, odd codebook sizes, strided queries, fp32 and bf16."""

import pytest
import torch

from kvcomp.ref import vq_lut
from kvcomp.testing import assert_close


def dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("b,g,hkv,nc", [(1, 8, 1, 5), (3, 3, 2, 75), (8, 5, 2, 130), (9, 8, 1, 33)],
                         ids=["b1g8", "b3g3", "b8g5", "b9g8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_vq_lut_every_row_of_the_step(b, g, hkv, nc, dtype, nan_empty):
    from kvcomp.kernels.vq_lut import triton_vq_lut

    gen = torch.Generator().manual_seed(b * 100 + g)
    d = 64
    # queries strided over the batch and heads (a slice of a wider buffer), codebook fp32
    big = torch.randn(b, hkv * g + 3, d, generator=gen).to(dtype)
    q = big[:, 2: 2 + hkv * g].to(dev())
    cb = torch.randn(hkv, nc, d, generator=gen).to(dev())
    assert b == 1 or not q.is_contiguous()
    out = triton_vq_lut(q, cb, scale=0.2)
    assert out.shape == (b, hkv * g, nc) and out.dtype == torch.float32
    assert_close("vq_lut", vq_lut(q, cb, scale=0.2), out, 1e-5 if dtype == torch.float32 else 2e-2)


def test_vq_lut_empty_batch_and_bad_inputs():
    from kvcomp.kernels.vq_lut import triton_vq_lut

    cb = torch.randn(2, 10, 32).to(dev())
    assert triton_vq_lut(torch.randn(0, 4, 32).to(dev()), cb).shape == (0, 4, 10)
    with pytest.raises(ValueError, match="multiple"):
        triton_vq_lut(torch.randn(1, 3, 32).to(dev()), cb)
    with pytest.raises(ValueError, match="shape"):
        triton_vq_lut(torch.randn(1, 4, 64).to(dev()), cb)
    with pytest.raises(ValueError, match="contiguous"):
        triton_vq_lut(torch.randn(1, 4, 64).to(dev())[..., ::2], cb)
