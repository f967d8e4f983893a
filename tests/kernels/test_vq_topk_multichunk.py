"""The VQ top-K radix select (four 8-bit passes over the 32-bit score keys) over awkward inputs.

Large codebooks (C = 8192, and a C that is not a power of two), several sequence chunks in parallel,
scores that share their top 24 bits (only the last radix pass separates them), ties straddling the
threshold, negative and signed-zero scores, ``topk >= L``, GQA 1-8 and batch 1/3/8, all against
:func:`kvcomp.ref.vq_paged.paged_vq_topk`.
"""

import pytest
import torch

from kvcomp.ref.vq_paged import paged_vq_topk


def dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def paged(lens, hkv, bs, codes, gen):
    b = len(lens)
    max_blocks = max(-(-n // bs) for n in lens)
    nb = b * max_blocks + 1
    bt = torch.randperm(nb, generator=gen)[: b * max_blocks].view(b, max_blocks).to(torch.int32)
    cc = codes[torch.randint(0, len(codes), (nb, bs, hkv), generator=gen)]
    return cc, bt, torch.tensor(lens, dtype=torch.int32)


def check(lut, cc, bt, sl, chunk=None, **kw):
    from kvcomp.kernels.vq_topk import triton_vq_topk

    ri, rc = paged_vq_topk(lut, cc, bt, sl, **kw)
    idx, count = triton_vq_topk(lut.to(dev()), cc.to(dev()), bt.to(dev()), sl.to(dev()), chunk=chunk, **kw)
    assert torch.equal(rc, count.cpu())
    assert torch.equal(ri, idx[..., : ri.shape[2]].cpu())
    return rc


@pytest.mark.parametrize("nc", [8192, 5000])
def test_vq_topk_large_codebook_several_chunks(nc, nan_empty):
    lens, hkv, g, bs = [61, 90], 2, 4, 16
    gen = torch.Generator().manual_seed(nc)
    # a dozen codes spread over the whole codebook (the last one too), each repeated: the k-th score
    # ties, and need = k - #greater decides which of the tied tokens are kept
    spread = torch.linspace(0, nc - 1, 12).round().to(torch.int16)
    cc, bt, sl = paged(lens, hkv, bs, spread, gen)
    lut = torch.randn(len(lens), hkv * g, nc, generator=gen)
    rc = check(lut, cc, bt, sl, topk=9, sink=2, local=3, chunk=32)
    assert (rc > 2 + 3 + 9).all()  # the group union selected beyond one query head's top-K


@pytest.mark.parametrize("b,g", [(1, 8), (3, 3), (8, 2)], ids=["b1g8", "b3g3", "b8g2"])
def test_vq_topk_keys_equal_in_their_top_bits(b, g, nan_empty):
    """Scores 1 + i * 2^-23 (and their negatives) share the top 24 key bits: the first three radix passes
    leave every token in one bucket and the last pass decides; equal scores straddle the threshold."""
    nc, hkv, bs = 24, 2, 8
    gen = torch.Generator().manual_seed(b * 10 + g)
    lens = torch.randint(1, 40, (b,), generator=gen).tolist()
    cc, bt, sl = paged(lens, hkv, bs, torch.arange(nc, dtype=torch.int16), gen)
    steps = torch.randint(0, 6, (b, hkv * g, nc), generator=gen).float()  # repeats: ties across codes
    sign = torch.where(torch.rand(b, hkv * g, 1, generator=gen) < 0.5, -1.0, 1.0)
    lut = sign * (1.0 + steps * 2.0 ** -23)
    assert len(torch.unique(lut.view(torch.int32) >> 8)) <= 2
    check(lut, cc, bt, sl, topk=7, sink=1, local=2, chunk=16 if b == 1 else None)


def test_vq_topk_signed_zero_and_extremes(nan_empty):
    """+-0.0 key alike; +-inf, the largest finite and subnormal scores take the extreme digits; topk 9 is
    more than the 8 tokens of the second sequence."""
    nc, hkv, g, bs = 10, 1, 2, 8
    gen = torch.Generator().manual_seed(3)
    cc, bt, sl = paged([45, 8, 30], hkv, bs, torch.arange(nc, dtype=torch.int16), gen)
    vals = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), 3.4e38, -3.4e38, 1e-45, -1e-45, 0.0, 2.0])
    lut = vals[torch.stack([torch.randperm(nc, generator=gen) for _ in range(3 * hkv * g)])].view(3, hkv * g, nc)
    for topk in (1, 6, 9):
        check(lut, cc, bt, sl, topk=topk, sink=0, local=1)
