"""Every Triton launcher that reads a block table gives the same result for a block table whose
column stride is not 1 (``bt.t().contiguous().t()``: same values, strides ``(1, B)``) as for the
contiguous one. Before the launchers made it contiguous, vq_topk returned wrong indices and
think_decode NaN (the kernels index ``bt_ptr + b * stride0 + column``)."""

import pytest
import torch

from kvcomp.testing import assert_close

LENS = [13, 30, 7]
BS, MAX_BLOCKS = 8, 5  # capacity 40 tokens per sequence
B = len(LENS)
NB = B * MAX_BLOCKS + 2


def dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def tables(dtype=torch.int32):
    """The contiguous block table (permuted blocks) and the same values with column stride B."""
    bt = torch.randperm(NB, generator=gen(1))[: B * MAX_BLOCKS].view(B, MAX_BLOCKS).to(dtype).to(dev())
    strided = bt.t().contiguous().t()
    assert torch.equal(strided, bt) and strided.stride() == (1, B)
    return bt, strided


def seq_lens():
    return torch.tensor(LENS, dtype=torch.int32, device=dev())


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=gen(seed)).to(dev())


def new_token_meta(new):
    """``query_start_loc`` for ``new`` tokens per sequence, and their total."""
    qsl = torch.tensor([0] + torch.tensor(new).cumsum(0).tolist(), dtype=torch.int32, device=dev())
    return qsl, sum(new)


def both(fn):
    bt, strided = tables()
    return fn(bt), fn(strided)


def test_duo_decode(nan_empty):
    from kvcomp.kernels.duo_decode import duo_decode_attention

    sink, window, d = 2, 6, 32
    q = randn(B, 4, d, seed=2)
    kc, vc = randn(NB, BS, 1, d, seed=3), randn(NB, BS, 1, d, seed=4)
    ks, vs = randn(B, 1, sink + window, d, seed=5), randn(B, 1, sink + window, d, seed=6)
    head_map = torch.tensor([[0, 0], [1, 0]], dtype=torch.int32, device=dev())
    ref, out = both(lambda bt: duo_decode_attention(q, kc, vc, bt, seq_lens(), ks, vs, head_map,
                                                    sink=sink, window=window))
    assert_close("duo_decode strided block table", ref, out, 1e-6)


def test_think_decode(nan_empty):
    from kvcomp.kernels.think_decode import triton_think_decode

    hkv, g, d, dk, w = 2, 2, 32, 20, 4
    q = randn(B, hkv * g, d, seed=2)
    kp, vc = randn(NB, BS, hkv, dk, seed=3), randn(NB, BS, hkv, d, seed=4)
    chan = torch.stack([torch.randperm(d, generator=gen(h))[:dk].sort().values for h in range(hkv)])[None]
    k_recent = randn(B, hkv, w, d, seed=5)
    ref, out = both(lambda bt: triton_think_decode(q, kp, chan.to(dev()), k_recent, vc, bt, seq_lens()))
    assert not ref.isnan().any()
    assert_close("think_decode strided block table", ref, out, 1e-6)


def test_vq_topk(nan_empty):
    from kvcomp.kernels.vq_topk import triton_vq_topk

    hkv, g, nc = 2, 3, 24
    codes = torch.randint(0, nc, (NB, BS, hkv), generator=gen(2), dtype=torch.int16).to(dev())
    lut = randn(B, hkv * g, nc, seed=3)
    (ri, rc), (oi, oc) = both(lambda bt: triton_vq_topk(lut, codes, bt, seq_lens(), topk=4, sink=1, local=2))
    assert torch.equal(rc, oc) and torch.equal(ri, oi)


def test_vq_encode_paged():
    from kvcomp.kernels.vq_encode import triton_vq_encode_paged

    hkv, d, nc = 2, 32, 16
    new = [5, 1, 7]
    qsl, n = new_token_meta(new)
    k_new = randn(n, hkv, d, seed=2)
    codebook = randn(hkv, nc, d, seed=3)
    whiten = (torch.eye(d) + 0.1 * torch.randn(d, d, generator=gen(4)).tril()).expand(hkv, d, d).contiguous().to(dev())
    fresh = lambda: torch.full((NB, BS, hkv), -1, dtype=torch.int16, device=dev())  # noqa: E731
    ref, out = both(lambda bt: triton_vq_encode_paged(k_new, codebook, whiten, fresh(), bt, seq_lens(), qsl))
    assert (ref >= 0).sum() == n * hkv
    assert torch.equal(ref, out)


def test_vq_sparse_decode(nan_empty):
    from kvcomp.kernels.vq_sparse_decode import triton_paged_sparse_attention

    hkv, g, d, kmax = 2, 2, 32, 9
    q = randn(B, hkv * g, d, seed=2)
    kc, vc = randn(NB, BS, hkv, d, seed=3), randn(NB, BS, hkv, d, seed=4)
    count = torch.tensor([[5, 9], [9, 3], [7, 7]], dtype=torch.int32)
    idx = torch.zeros(B, hkv, kmax, dtype=torch.int32)
    for b, n in enumerate(LENS):
        for h in range(hkv):
            picks = torch.randperm(n, generator=gen(10 * b + h))[: count[b, h]].sort().values
            count[b, h] = len(picks)
            idx[b, h, : len(picks)] = picks
            idx[b, h, len(picks):] = picks[-1]
    ref, out = both(lambda bt: triton_paged_sparse_attention(q, kc, vc, bt, idx.to(dev()), count.to(dev())))
    assert_close("sparse decode strided block table", ref, out, 1e-6)
