"""The VQ top-K threshold pass over more codebook entries than one chunk holds.

``_threshold_kernel`` reads ``[rows, C]`` of lut and histogram in one tile when it fits
(``ONE_CHUNK``: ``C <= 4096`` on a GPU, ``C * rows <= 2^16`` under the interpreter) and otherwise
loops over chunks of 1024 codes. These cases take the chunked branch (C = 8192 and a C that is
not a multiple of the chunk) and compare with :func:`kvcomp.ref.vq_paged.paged_vq_topk`.
"""

import pytest
import torch

from kvcomp.ref.vq_paged import paged_vq_topk


def dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("nc", [8192, 5000])
def test_vq_topk_threshold_over_several_code_chunks(nc, nan_empty):
    from kvcomp.kernels.vq_topk import triton_vq_topk

    lens, hkv, g, bs = [61, 90], 2, 4, 16  # B * Hq = 16 rows: 16 * 8192 > 2^16 -> chunked
    gen = torch.Generator().manual_seed(nc)
    b = len(lens)
    max_blocks = max(-(-n // bs) for n in lens)
    nb = b * max_blocks + 1
    bt = torch.randperm(nb, generator=gen)[: b * max_blocks].view(b, max_blocks).to(torch.int32)
    # a dozen codes spread over every chunk (the last one too, partial when nc = 5000): a wrong chunk
    # offset changes the threshold, and each code repeats, so the k-th score ties and the count of
    # scores above it (need = k - #greater) decides which of the tied tokens are kept
    spread = torch.linspace(0, nc - 1, 12).round().to(torch.int16)
    cc = spread[torch.randint(0, 12, (nb, bs, hkv), generator=gen)]
    sl = torch.tensor(lens, dtype=torch.int32)
    lut = torch.randn(b, hkv * g, nc, generator=gen)
    ri, rc = paged_vq_topk(lut, cc, bt, sl, topk=9, sink=2, local=3)
    idx, count = triton_vq_topk(lut.to(dev()), cc.to(dev()), bt.to(dev()), sl.to(dev()), topk=9, sink=2, local=3)
    assert torch.equal(rc, count.cpu())
    k = ri.shape[2]
    assert torch.equal(ri, idx[..., :k].cpu())
    assert (rc > 2 + 3 + 9).all()  # the group union selected beyond one query head's top-K
