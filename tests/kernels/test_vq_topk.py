"""A²ATS LUT and exact top-K selection (Triton) vs kvcomp.ref (vq_lut, vq_scores/vq_select/mask_to_indices)."""

import pytest
import torch

from kvcomp.ref import vq_lut
from kvcomp.ref.vq_paged import paged_vq_topk
from kvcomp.testing import assert_close, assert_equal


def dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def paged_codes(lens, hkv, nc, bs, seed=0):
    """Random codes in a paged int16 cache (permuted block table, -1 in unused slots)."""
    gen = torch.Generator().manual_seed(seed)
    b = len(lens)
    max_blocks = max(-(-x // bs) for x in lens) + 1
    nb = b * max_blocks + 2
    bt = torch.randperm(nb, generator=gen)[: b * max_blocks].view(b, max_blocks).to(torch.int32)
    cc = torch.full((nb, bs, hkv), -1, dtype=torch.int16)
    for i, n in enumerate(lens):
        for p in range(n):
            cc[bt[i, p // bs], p % bs] = torch.randint(0, nc, (hkv,), generator=gen, dtype=torch.int16)
    return cc.to(dev()), bt.to(dev()), torch.tensor(lens, dtype=torch.int32, device=dev())


def check_topk(lut, cc, bt, sl, *, chunk=None, kmax=None, **kw):
    from kvcomp.kernels.vq_topk import triton_vq_topk

    ri, rc = paged_vq_topk(lut.cpu(), cc.cpu(), bt.cpu(), sl.cpu(), **{k: (v.cpu() if torch.is_tensor(v) else v)
                                                                       for k, v in kw.items()})
    idx, count = triton_vq_topk(lut, cc, bt, sl, chunk=chunk, kmax=kmax, **kw)
    assert_equal("count", rc, count.cpu())
    k = ri.shape[2]
    assert idx.shape[2] >= k
    assert_equal("idx", ri, idx[..., :k].cpu())
    pad = ri[..., -1:] if k else torch.zeros_like(idx[..., :1].cpu())
    assert_equal("idx padding", pad.expand(-1, -1, idx.shape[2] - k), idx[..., k:].cpu())


@pytest.mark.parametrize("g", [1, 3, 4], ids=["g1", "g3", "g4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_vq_lut(g, dtype, nan_empty):
    from kvcomp.kernels.vq_lut import triton_vq_lut

    gen = torch.Generator().manual_seed(g)
    q = torch.randn(3, 2 * g, 32, generator=gen).to(dev(), dtype)
    cb = torch.randn(2, 75, 32, generator=gen).to(dev())
    ref = vq_lut(q, cb, scale=0.3)
    out = triton_vq_lut(q, cb, scale=0.3)
    assert out.dtype == torch.float32
    assert_close("vq_lut", ref, out, 1e-5)


# (id, seq_lens, Hkv, G, C, block_size, topk, sink, local, chunk)
CASES = [
    ("b3-g3-topk-gt-len", [1, 6, 29], 2, 3, 40, 8, 10, 2, 3, None),
    ("b1-g1-multichunk", [150], 1, 1, 64, 16, 9, 4, 8, 32),
    ("b3-g4-few-codes-ties", [40, 17, 33], 1, 4, 5, 16, 6, 0, 0, 16),
    ("b2-g1-sink-local-overlap", [5, 12], 2, 1, 30, 8, 1, 6, 9, None),
    ("b2-g3-topk0", [9, 20], 2, 3, 16, 8, 0, 1, 2, None),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_vq_topk(case, nan_empty):
    _, lens, hkv, g, nc, bs, topk, sink, local, chunk = case
    cc, bt, sl = paged_codes(lens, hkv, nc, bs, seed=len(lens))
    lut = torch.randn(len(lens), hkv * g, nc, generator=torch.Generator().manual_seed(7)).to(dev())
    check_topk(lut, cc, bt, sl, topk=topk, sink=sink, local=local, chunk=chunk)


def test_vq_topk_head_major_code_pages(nan_empty):
    """vLLM's code pages are ``[blocks, Hkv, block_size, cell]``: the kernel reads them through a
    permuted ``[blocks, block_size, Hkv]`` view (head stride = block_size * cell)."""
    cc, bt, sl = paged_codes([37, 9, 22], 3, 24, 8, seed=9)
    cells = torch.full((cc.shape[0], cc.shape[2], cc.shape[1], 2), -5, dtype=torch.int16, device=cc.device)
    cells[..., 0] = cc.permute(0, 2, 1)  # fp32 models: 4-byte cells, the code in the first int16
    view = cells[..., 0].permute(0, 2, 1)
    assert view.stride(2) == 2 * cc.shape[1] and torch.equal(view, cc)
    lut = torch.randn(3, 6, 24, generator=torch.Generator().manual_seed(4)).to(dev())
    check_topk(lut, view, bt, sl, topk=5, sink=1, local=2, chunk=16)


def test_vq_topk_equal_scores_across_codes_and_signed_zero(nan_empty):
    """Different codes with the same score (and -0.0 vs +0.0) tie; lower positions win, like the ref."""
    cc, bt, sl = paged_codes([37, 23], 2, 8, 8, seed=4)
    lut = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(2))
    lut[..., 3] = lut[..., 1]
    lut[..., 5] = lut[..., 1]
    lut[0, :, 2] = 0.0
    lut[0, :, 6] = -0.0
    lut[0, :, 0] = 5.0  # several codes above zero, then the +-0 tie straddles the threshold
    check_topk(lut.to(dev()), cc, bt, sl, topk=7, sink=1, local=1, chunk=16)
    check_topk(lut.to(dev()), cc, bt, sl, topk=4, sink=0, local=0)


def test_vq_topk_per_sequence_tensor_topk(nan_empty):
    cc, bt, sl = paged_codes([13, 30, 2], 1, 12, 8, seed=5)
    lut = torch.randn(3, 3, 12, generator=torch.Generator().manual_seed(3)).to(dev())
    topk = torch.tensor([2, 5, 9], dtype=torch.int32, device=dev())
    check_topk(lut, cc, bt, sl, topk=topk, sink=1, local=2, kmax=18)


def test_vq_ops_topk_max_bounds_kmax(nan_empty):
    """ops.vq_topk with a tensor topk and a host bound: kmax = G*topk_max + sink + local columns,
    results equal the reference; a bound below the tensor's values is refused."""
    from kvcomp.ops.vq import vq_topk

    cc, bt, sl = paged_codes([13, 30, 2], 1, 12, 8, seed=5)
    lut = torch.randn(3, 3, 12, generator=torch.Generator().manual_seed(3)).to(dev())
    topk = torch.tensor([2, 5, 3], dtype=torch.int32)
    idx, count = vq_topk(lut, cc, bt, sl, topk=topk.to(dev()), sink=1, local=2, topk_max=5)
    assert idx.shape[2] == 3 * 5 + 1 + 2
    ri, rc = paged_vq_topk(lut.cpu(), cc.cpu(), bt.cpu(), sl.cpu(), topk=topk, sink=1, local=2)
    assert_equal("count", rc, count.cpu())
    assert_equal("idx", ri, idx[..., : ri.shape[2]].cpu())
    with pytest.raises(ValueError, match="topk_max=4"):
        vq_topk(lut.cpu(), cc.cpu(), bt.cpu(), sl.cpu(), topk=topk, sink=1, local=2, topk_max=4)
    with pytest.raises(ValueError, match="topk_max must be"):
        vq_topk(lut, cc, bt, sl, topk=5, sink=1, local=2, topk_max=5)


def test_vq_ops_pipeline_and_fake(nan_empty):
    """ops: lut -> topk (static Kmax) -> sparse attention, against the references; fake shapes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from kvcomp.ops import sparse_attention_host
    from kvcomp.ops.vq import topk_kmax, vq_lut as op_lut, vq_topk
    from kvcomp.ref import paged_sparse_attention

    gen = torch.Generator().manual_seed(11)
    cc, bt, sl = paged_codes([19, 44], 2, 20, 16, seed=6)
    q = torch.randn(2, 4, 32, generator=gen).to(dev())
    cb = torch.randn(2, 20, 32, generator=gen).to(dev())
    lut = op_lut(q, cb)
    assert_close("lut", vq_lut(q, cb), lut, 1e-5)
    idx, count = vq_topk(lut, cc, bt, sl, topk=5, sink=2, local=3)
    assert idx.shape == (2, 2, topk_kmax(5, 2, 2, 3, bt.shape[1] * 16))
    ri, rc = paged_vq_topk(lut, cc, bt, sl, topk=5, sink=2, local=3)
    assert_equal("count", rc, count)
    kc = torch.randn(cc.shape[0], 16, 2, 32, generator=gen).to(dev())
    vc = torch.randn(cc.shape[0], 16, 2, 32, generator=gen).to(dev())
    out = sparse_attention_host(q, kc, vc, idx, count, block_table=bt)
    assert_close("sparse", paged_sparse_attention(q, kc, vc, bt, ri, rc), out, 1e-5)  # kc, vc NaN-free
    with FakeTensorMode():
        fl = torch.ops.kvcomp.vq_lut(torch.empty(2, 8, 64), torch.empty(4, 4096, 64), 0.1)
        fi, fc = torch.ops.kvcomp.vq_topk(fl, torch.empty(9, 16, 4, dtype=torch.int16),
                                          torch.empty(2, 4, dtype=torch.int32), torch.empty(2, dtype=torch.int32),
                                          torch.empty(2, dtype=torch.int32), 8, 64, 100)
    assert tuple(fl.shape) == (2, 8, 4096) and tuple(fi.shape) == (2, 4, 100) and tuple(fc.shape) == (2, 4)


@pytest.mark.parametrize("bad", ["lut_dtype", "codes_dtype", "gqa", "kmax_small", "topk_neg", "sink"])
def test_vq_topk_rejects_bad_inputs(bad):
    from kvcomp.kernels.vq_topk import triton_vq_topk

    cc, bt, sl = paged_codes([5, 9], 2, 8, 8)
    lut = torch.randn(2, 4, 8).to(dev())
    kw = dict(topk=2, sink=1, local=1)
    if bad == "lut_dtype":
        lut = lut.half()
    elif bad == "codes_dtype":
        cc = cc.int()
    elif bad == "gqa":
        lut = lut[:, :3].contiguous()
    elif bad == "kmax_small":
        kw["kmax"] = 3
    elif bad == "topk_neg":
        kw["topk"] = -1
    elif bad == "sink":
        kw["sink"] = 1.5
    with pytest.raises(ValueError):
        triton_vq_topk(lut, cc, bt, sl, **kw)


@pytest.mark.gpu
def test_vq_topk_gpu_long():
    lens = [20000, 7001]
    gen = torch.Generator().manual_seed(9)
    bs, hkv, nc = 16, 4, 4096
    b = len(lens)
    max_blocks = max(-(-x // bs) for x in lens)
    nb = b * max_blocks
    bt = torch.randperm(nb, generator=gen).view(b, max_blocks).to(torch.int32).cuda()
    cc = torch.randint(0, nc, (nb, bs, hkv), generator=gen, dtype=torch.int16).cuda()
    lut = torch.randn(b, hkv * 4, nc, generator=gen).cuda()
    check_topk(lut, cc, bt, torch.tensor(lens, dtype=torch.int32).cuda(), topk=600, sink=8, local=64)


def test_vq_ops_cpu_fallback_pads_like_the_kernel(monkeypatch):
    """Without CUDA and without the interpreter ``vq_topk`` runs the reference, padded to the same Kmax."""
    from kvcomp.ops.vq import vq_topk

    cc, bt, sl = (t.cpu() for t in paged_codes([6, 21], 1, 9, 8, seed=8))
    lut = torch.randn(2, 2, 9, generator=torch.Generator().manual_seed(4))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    idx, count = vq_topk(lut, cc, bt, sl, topk=3, sink=1, local=2)
    ri, rc = paged_vq_topk(lut, cc, bt, sl, topk=3, sink=1, local=2)
    k = ri.shape[2]
    assert idx.shape == (2, 1, 2 * 3 + 1 + 2)
    assert_equal("count", rc, count)
    assert_equal("idx", ri, idx[..., :k])
    assert_equal("pad", ri[..., -1:].expand(-1, -1, idx.shape[2] - k), idx[..., k:])


def test_vq_ops_encode_select_attend_end_to_end(nan_empty):
    """Codes written by the paged encode op, then LUT -> top-K -> sparse decode ops, against the dense
    reference chain vq_encode -> vq_scores -> vq_select -> mask_to_indices -> sparse_attention."""
    from kvcomp.ops import sparse_attention_host
    from kvcomp.ops.vq import vq_encode_paged, vq_lut as op_lut, vq_topk
    from kvcomp.ref import mask_to_indices, sparse_attention, vq_encode, vq_scores, vq_select

    gen = torch.Generator().manual_seed(21)
    b, hkv, g, d, nc, bs, lens = 2, 2, 2, 32, 16, 8, [13, 30]
    cb = torch.randn(hkv, nc, d, generator=gen)
    a = torch.randn(hkv, d, d, generator=gen) / d ** 0.5
    lw = torch.linalg.cholesky(a @ a.transpose(1, 2) + 0.5 * torch.eye(d))
    t = max(lens)
    k_pre = torch.randn(b, hkv, t, d, generator=gen)
    k = torch.randn(b, hkv, t, d, generator=gen)
    v = torch.randn(b, hkv, t, d, generator=gen)
    max_blocks = -(-t // bs)
    nb = b * max_blocks
    bt = torch.randperm(nb, generator=gen).view(b, max_blocks).to(torch.int32)
    kc, vc = torch.zeros(nb, bs, hkv, d), torch.zeros(nb, bs, hkv, d)
    for i, n in enumerate(lens):
        for p in range(n):
            kc[bt[i, p // bs], p % bs] = k[i, :, p]
            vc[bt[i, p // bs], p % bs] = v[i, :, p]
    sl = torch.tensor(lens, dtype=torch.int32)
    k_new = torch.cat([k_pre[i, :, :n].transpose(0, 1) for i, n in enumerate(lens)])
    qsl = torch.tensor([0, lens[0], sum(lens)], dtype=torch.int32)
    cc = vq_encode_paged(k_new, cb, lw, torch.zeros(nb, bs, hkv, dtype=torch.int16), bt, sl, qsl)
    q = torch.randn(b, hkv * g, d, generator=gen)
    qw = torch.randn(b, hkv * g, d, generator=gen)
    idx, count = vq_topk(op_lut(qw, cb), cc, bt, sl, topk=4, sink=1, local=3)
    out = sparse_attention_host(q, kc, vc, idx, count, block_table=bt)
    codes = vq_encode(k_pre, cb, lw)
    for i, n in enumerate(lens):
        codes_i = cc[bt[i].long()].reshape(-1, hkv)[:n].T.unsqueeze(0)
        assert (codes_i == codes[i:i + 1, :, :n]).float().mean() >= 0.95  # near-ties may differ
        mask = vq_select(vq_scores(vq_lut(qw[i:i + 1], cb), codes_i), topk=4, sink=1, local=3, num_kv_heads=hkv)
        ri, rc = mask_to_indices(mask)
        assert_equal(f"count[{i}]", rc, count[i:i + 1])
        ref = sparse_attention(q[i:i + 1, :, None], k[i:i + 1, :, :n], v[i:i + 1, :, :n], ri, rc)[:, :, 0]
        assert_close(f"out[{i}]", ref, out[i:i + 1], 1e-5)
