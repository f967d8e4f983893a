"""Sparse decode over selected tokens gathered from pages (Triton) vs kvcomp.ref.paged_sparse_attention."""

import pytest
import torch

from kvcomp.ref import mask_to_indices, paged_sparse_attention
from kvcomp.testing import assert_close

RATIO = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


def dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def ref_sparse(q, kc, vc, bt, idx, count, **kw):
    """The reference on NaN-free copies: it gathers block 0 for padded entries and 0 * NaN would leak
    into its P @ V (the kernel itself gets the NaN-filled caches)."""
    return paged_sparse_attention(q, kc.nan_to_num(0.0), vc.nan_to_num(0.0), bt, idx, count, **kw)


def build(lens, hkv, g, d, bs, dtype, density=0.4, empty_row=False, seed=0):
    """Paged K/V (permuted blocks, NaN outside the selected tokens) and a random selection."""
    gen = torch.Generator().manual_seed(seed)
    b = len(lens)
    max_blocks = max(-(-x // bs) for x in lens) + 1
    nb = b * max_blocks + 2
    bt = torch.randperm(nb, generator=gen)[: b * max_blocks].view(b, max_blocks).to(torch.int32)
    t = max(lens)
    mask = torch.rand(b, hkv, t, generator=gen) < density
    mask &= torch.arange(t)[None, None, :] < torch.tensor(lens)[:, None, None]
    mask[:, :, 0] = True
    if empty_row:
        mask[0, 0] = False
    idx, count = mask_to_indices(mask)
    kc = torch.empty(nb, bs, hkv, d).fill_(float("nan"))
    vc = torch.empty(nb, bs, hkv, d).fill_(float("nan"))
    for i in range(b):
        for h in range(hkv):
            for p in mask[i, h].nonzero().flatten().tolist():
                kc[bt[i, p // bs], p % bs, h] = torch.randn(d, generator=gen)
                vc[bt[i, p // bs], p % bs, h] = torch.randn(d, generator=gen)
    q = torch.randn(b, hkv * g, d, generator=gen)
    c = lambda x: x.to(device=dev(), dtype=dtype)  # noqa: E731
    return c(q), c(kc), c(vc), bt.to(dev()), idx.to(dev()), count.to(dev())


# (id, seq_lens, Hkv, G, D, block_size, tokens_per_split, empty row)
CASES = [
    ("b1-g1-split16", [70], 2, 1, 32, 16, 16, False),
    ("b3-g3-odd", [1, 9, 33], 1, 3, 64, 8, None, False),
    ("b3-g4-empty-row", [12, 5, 27], 2, 4, 32, 16, 16, True),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_sparse_decode_fp32(case, nan_empty):
    from kvcomp.kernels.vq_sparse_decode import triton_paged_sparse_attention

    _, lens, hkv, g, d, bs, per, empty = case
    args = build(lens, hkv, g, d, bs, torch.float32, empty_row=empty)
    ref = ref_sparse(*args)
    out = triton_paged_sparse_attention(*args, tokens_per_split=per)
    assert_close("sparse_decode", ref, out, RATIO[torch.float32])
    if empty:
        assert torch.equal(out[0, :g].cpu(), torch.zeros(g, d))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_sparse_decode_half(dtype, nan_empty):
    from kvcomp.kernels.vq_sparse_decode import triton_paged_sparse_attention

    args = build([25, 40], 2, 2, 32, 16, dtype, seed=2)
    ref = ref_sparse(*args, scale=0.25)
    out = triton_paged_sparse_attention(*args, scale=0.25)
    assert out.dtype == dtype
    assert_close("sparse_decode", ref.float(), out.float(), RATIO[dtype])


@pytest.mark.parametrize("bad", ["idx_dtype", "count_shape", "v_dtype", "head_dim"])
def test_sparse_decode_rejects_bad_inputs(bad):
    from kvcomp.kernels.vq_sparse_decode import triton_paged_sparse_attention

    q, kc, vc, bt, idx, count = build([5, 9], 1, 2, 32, 8, torch.float32)
    if bad == "idx_dtype":
        idx = idx.long()
    elif bad == "count_shape":
        count = count[:1]
    elif bad == "v_dtype":
        vc = vc.half()
    elif bad == "head_dim":
        q, kc = q[..., :20], kc[..., :20]
    with pytest.raises(ValueError):
        triton_paged_sparse_attention(q, kc, vc, bt, idx, count)


@pytest.mark.gpu
def test_sparse_decode_gpu_long_bf16():
    from kvcomp.kernels.vq_sparse_decode import triton_paged_sparse_attention

    args = build([3000, 1777], 4, 4, 128, 16, torch.bfloat16, density=0.1, seed=3)
    ref = ref_sparse(*args)
    out = triton_paged_sparse_attention(*args)
    assert_close("sparse_decode_gpu", ref.float(), out.float(), RATIO[torch.bfloat16])
