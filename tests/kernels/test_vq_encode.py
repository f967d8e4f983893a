"""A²ATS VQ encoding (Triton, dense and paged) vs kvcomp.ref.vq_encode / compressed_write.vq_encode_paged."""

import pytest
import torch

from kvcomp.ref import vq_encode
from kvcomp.ref.compressed_write import vq_encode_paged


def dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def codebook(hkv, nc, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cb = torch.randn(hkv, nc, d, generator=gen)
    a = torch.randn(hkv, d, d, generator=gen) / d ** 0.5
    lw = torch.linalg.cholesky(a @ a.transpose(1, 2) + 0.5 * torch.eye(d))
    return cb, lw


def whitened_dist(k, cb, lw, codes):
    """fp64 ||(k - c) L||^2 of the chosen codes: k [Hkv, N, D], codes [Hkv, N] -> [Hkv, N]."""
    c = torch.gather(cb.double(), 1, codes.long().unsqueeze(-1).expand(-1, -1, cb.shape[-1]))
    return ((k.double() - c) @ lw.double()).pow(2).sum(-1)


def check_codes(k, cb, lw, ref, out):
    """Codes equal, except where the two centroids are equally near (fp rounding in the argmin)."""
    ref, out = ref.cpu(), out.cpu()
    diff = ref != out
    assert diff.float().mean() <= 0.02, f"{int(diff.sum())} of {diff.numel()} codes differ"
    if diff.any():
        dr = whitened_dist(k, cb, lw, ref)
        do = whitened_dist(k, cb, lw, out)
        assert torch.allclose(do[diff], dr[diff], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("nc", [7, 300], ids=["c7", "c300"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_vq_encode_dense(nc, dtype, nan_empty):
    from kvcomp.kernels.vq_encode import triton_vq_encode

    cb, lw = codebook(2, nc, 32, seed=nc)
    k = torch.randn(3, 2, 13, 32, generator=torch.Generator().manual_seed(1)).to(dtype)
    ref = vq_encode(k, cb, lw)
    out = triton_vq_encode(k.to(dev()), cb.to(dev()), lw.to(dev()))
    assert out.dtype == torch.int16 and out.shape == (3, 2, 13)
    for b in range(3):
        check_codes(k[b].float(), cb, lw, ref[b], out[b])


def test_vq_encode_paged_write(nan_empty):
    """Chunked prefill + decode rows packed by query_start_loc; untouched slots keep their value."""
    from kvcomp.ops.vq import vq_encode_paged as op_encode_paged

    gen = torch.Generator().manual_seed(2)
    hkv, d, bs, nc = 3, 32, 8, 40
    cb, lw = codebook(hkv, nc, d, seed=3)
    lens = torch.tensor([9, 4, 17], dtype=torch.int32)
    qsl = torch.tensor([0, 9, 9, 12], dtype=torch.int32)  # seq 1 adds nothing, seq 2 its last 3 tokens
    nb = 12
    bt = torch.randperm(nb, generator=gen).view(3, 4).to(torch.int32)
    k_new = torch.randn(12, hkv, d, generator=gen)
    init = torch.full((nb, bs, hkv), -7, dtype=torch.int16)
    ref = vq_encode_paged(k_new, cb, lw, init.clone(), bt, lens, qsl)
    out = op_encode_paged(k_new.to(dev()), cb.to(dev()), lw.to(dev()), init.clone().to(dev()), bt.to(dev()),
                          lens.to(dev()), qsl.to(dev())).cpu()
    assert torch.equal(out == -7, ref == -7)
    written = ref != -7
    assert int(written.sum()) == 12 * hkv
    assert (out[written] == ref[written]).float().mean() >= 0.98


def test_vq_encode_paged_head_major_view(nan_empty):
    """Codes written through a permuted ``[blocks, block_size, Hkv]`` view of head-major pages
    (vLLM's code pages) land where the reference puts them in a contiguous cache."""
    from kvcomp.ops.vq import vq_encode_paged as op_encode_paged

    gen = torch.Generator().manual_seed(6)
    hkv, d, bs, nc = 2, 32, 8, 20
    cb, lw = codebook(hkv, nc, d, seed=5)
    lens = torch.tensor([11, 3], dtype=torch.int32)
    qsl = torch.tensor([0, 5, 6], dtype=torch.int32)
    bt = torch.randperm(6, generator=gen).view(2, 3).to(torch.int32)
    k_new = torch.randn(6, hkv, d, generator=gen)
    ref = vq_encode_paged(k_new, cb, lw, torch.full((6, bs, hkv), -7, dtype=torch.int16), bt, lens, qsl)
    pages = torch.full((6, hkv, bs), -7, dtype=torch.int16, device=dev())
    op_encode_paged(k_new.to(dev()), cb.to(dev()), lw.to(dev()), pages.permute(0, 2, 1), bt.to(dev()),
                    lens.to(dev()), qsl.to(dev()))
    out = pages.permute(0, 2, 1).cpu()
    assert torch.equal(out == -7, ref == -7)
    written = ref != -7
    assert (out[written] == ref[written]).float().mean() >= 0.98


@pytest.mark.parametrize("bad", ["codebook_heads", "whiten_shape", "codes_dtype", "head_dim"])
def test_vq_encode_rejects_bad_inputs(bad):
    from kvcomp.kernels.vq_encode import triton_vq_encode, triton_vq_encode_paged

    cb, lw = codebook(2, 9, 32)
    k = torch.randn(1, 2, 5, 32).to(dev())
    cb, lw = cb.to(dev()), lw.to(dev())
    with pytest.raises(ValueError):
        if bad == "codebook_heads":
            triton_vq_encode(k, cb[:1], lw)
        elif bad == "whiten_shape":
            triton_vq_encode(k, cb, lw[:, :16])
        elif bad == "head_dim":
            triton_vq_encode(k[..., :24], cb[..., :24], lw[:, :24, :24])
        else:
            triton_vq_encode_paged(k[0].transpose(0, 1).contiguous(), cb, lw,
                                   torch.zeros(4, 8, 2, dtype=torch.int32, device=dev()),
                                   torch.zeros(1, 1, dtype=torch.int32, device=dev()),
                                   torch.tensor([5], dtype=torch.int32, device=dev()),
                                   torch.tensor([0, 5], dtype=torch.int32, device=dev()))


@pytest.mark.gpu
def test_vq_encode_gpu_4096_codes():
    from kvcomp.kernels.vq_encode import triton_vq_encode

    cb, lw = codebook(4, 4096, 128, seed=4)
    k = torch.randn(2, 4, 500, 128, generator=torch.Generator().manual_seed(5))
    ref = vq_encode(k, cb, lw)
    out = triton_vq_encode(k.cuda(), cb.cuda(), lw.cuda())
    for b in range(2):
        check_codes(k[b], cb, lw, ref[b], out[b])


def test_vq_encode_paged_op_schema_and_fake():
    """torch.library.opcheck: the declared mutation (code_cache) and the fake implementation."""
    from kvcomp.ops import vq  # noqa: F401  (registers the ops)

    d_ = dev()
    cb, lw = codebook(2, 9, 32)
    args = (torch.randn(3, 2, 32, device=d_), cb.to(d_), lw.to(d_), torch.zeros(4, 8, 2, dtype=torch.int16, device=d_),
            torch.tensor([[0, 1], [2, 3]], dtype=torch.int32, device=d_),
            torch.tensor([2, 9], dtype=torch.int32, device=d_), torch.tensor([0, 2, 3], dtype=torch.int32, device=d_))
    res = torch.library.opcheck(torch.ops.kvcomp.vq_encode_paged.default, args,
                                test_utils=("test_schema", "test_faketensor"))
    assert set(res.values()) == {"SUCCESS"}


@pytest.mark.parametrize("bsz", [1, 3, 8])
def test_vq_encode_paged_decode_step_codebook_splits(bsz, nan_empty):
    """A decode step (one token per sequence) over a 300-code codebook: few token tiles, so the codebook
    is split over programs and the merge / re-rank kernel picks each token's code."""
    from kvcomp.kernels import vq_encode as VE

    gen = torch.Generator().manual_seed(bsz)
    hkv, d, bs, nc = 2, 64, 8, 300
    cb, lw = codebook(hkv, nc, d, seed=bsz)
    lens = torch.randint(1, 30, (bsz,), generator=gen).to(torch.int32)
    qsl = torch.arange(bsz + 1, dtype=torch.int32)
    nb = bsz * 4
    bt = torch.randperm(nb, generator=gen).view(bsz, 4).to(torch.int32)
    k_new = torch.randn(bsz, hkv, d, generator=gen)
    init = torch.full((nb, bs, hkv), -7, dtype=torch.int16)
    ref = vq_encode_paged(k_new, cb, lw, init.clone(), bt, lens, qsl)
    out = VE.triton_vq_encode_paged(k_new.to(dev()), cb.to(dev()), lw.to(dev()), init.clone().to(dev()),
                                    bt.to(dev()), lens.to(dev()), qsl.to(dev())).cpu()
    assert torch.equal(out == -7, ref == -7)
    written = ref != -7
    k_rows = torch.stack([k_new[:, h] for h in range(hkv)])  # [Hkv, N, D]
    pos = lens.long() - 1
    got = torch.stack([out[bt[i, pos[i] // bs].long(), pos[i] % bs] for i in range(bsz)]).T  # [Hkv, N]
    exp = torch.stack([ref[bt[i, pos[i] // bs].long(), pos[i] % bs] for i in range(bsz)]).T
    assert int(written.sum()) == bsz * hkv
    check_codes(k_rows, cb, lw, exp, got)


def test_vq_encode_duplicate_centroids_pick_the_lowest_code(nan_empty):
    """Exact distance ties (duplicated centroids in different codebook splits, keys equal to a centroid):
    the lowest code wins, as in the reference's argmin; every code equals the reference."""
    from kvcomp.kernels.vq_encode import triton_vq_encode

    hkv, d, nc = 2, 32, 260
    cb, lw = codebook(hkv, nc, d, seed=8)
    for lo, hi in ((10, 150), (10, 259), (90, 120), (3, 4)):
        cb[:, hi] = cb[:, lo]
    gen = torch.Generator().manual_seed(9)
    pick = torch.tensor([10, 150, 259, 90, 120, 4, 3, 200, 10])
    k = cb[:, pick].unsqueeze(0).clone()  # [1, Hkv, 9, D]: keys exactly on (duplicated) centroids
    k = torch.cat([k, k + 1e-3 * torch.randn(k.shape, generator=gen)], 2)
    ref = vq_encode(k, cb, lw)
    out = triton_vq_encode(k.to(dev()), cb.to(dev()), lw.to(dev())).cpu()
    lowest = torch.tensor([10, 10, 10, 90, 90, 3, 3, 200, 10]).repeat(2)
    assert torch.equal(ref[0], lowest.expand(hkv, -1).to(torch.int16))
    assert torch.equal(out, ref)
