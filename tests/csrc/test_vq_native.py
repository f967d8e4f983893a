"""Native A²ATS ops (torch.ops.kvcomp_C.vq_lut / vq_topk / vq_encode / vq_encode_paged) against kvcomp.ref.

The native ops are called explicitly (the suite runs with TRITON_INTERPRET=1, which routes kvcomp.ops to
Triton); one test checks that kvcomp.ops dispatches to them on CPU. Selection and codes must be equal.
"""

from __future__ import annotations

import math

import pytest
import torch

from kvcomp import ops, ref
from kvcomp._ext import has_ext
from kvcomp.ref.compressed_write import vq_encode_paged as ref_encode_paged
from kvcomp.ref.vq_paged import paged_vq_topk

pytestmark = pytest.mark.skipif(not has_ext(), reason="native extension not built (KVCOMP_BUILD_EXT=1, see setup.py)")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _C():
    return torch.ops.kvcomp_C


def _paged_codes(codes: list[torch.Tensor], hkv: int, bs: int, seed: int, t_table: bool):
    """Per-sequence codes ``[Hkv, L_b]`` -> a head-major code cache viewed ``[NB, BS, Hkv]`` (vLLM's layout:
    storage ``[NB, Hkv, BS]``), randomly permuted blocks, and a block table (transposed-contiguous when
    ``t_table``). Unused slots and spare blocks hold invalid codes, so reading past ``seq_lens`` fails."""
    b = len(codes)
    mb = max(1, max(math.ceil(c.shape[1] / bs) for c in codes))
    nb = b * mb + 3
    perm = torch.randperm(nb, generator=_gen(seed))[: b * mb]
    table = perm.reshape(mb, b).T if t_table else perm.reshape(b, mb)
    store = torch.full((nb, hkv, bs), -7, dtype=torch.int16)
    for bi, c in enumerate(codes):
        for tok in range(c.shape[1]):
            store[table[bi, tok // bs], :, tok % bs] = c[:, tok].to(torch.int16)
    return store.permute(0, 2, 1), table.to(torch.int32)


def _ref_topk(lut, cache, table, lens, topk, sink, local, kmax):
    """kvcomp::vq_topk's reference body: paged_vq_topk padded to kmax columns with each row's last index."""
    idx, count = paged_vq_topk(lut, cache, table, lens, topk=topk, sink=sink, local=local)
    out = torch.zeros(idx.shape[0], idx.shape[1], kmax, dtype=torch.int32)
    k = min(idx.shape[2], kmax)
    out[..., :k] = idx[..., :k]
    out[..., k:] = idx[..., -1:] if idx.shape[2] else 0
    return out, count


# ------------------------------------------------------------------------------------------- vq_lut

@pytest.mark.parametrize("b,hq,hkv,d,nc", [(1, 1, 1, 8, 16), (3, 8, 2, 64, 256), (8, 32, 8, 128, 4096),
                                           (2, 7, 7, 17, 33), (2, 16, 2, 64, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vq_lut(b, hq, hkv, d, nc, dtype):
    q = torch.randn(b, hq, d, generator=_gen(1)).to(dtype)
    cb = torch.randn(hkv, nc, d, generator=_gen(2)).to(dtype)
    got = _C().vq_lut(q, cb, 0.3)
    want = ref.vq_lut(q, cb, scale=0.3)
    assert got.dtype == torch.float32 and got.shape == (b, hq, nc)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------- vq_topk

TOPK_CASES = [  # (lens, hq, hkv, nc, bs, topk, sink, local)
    ([1], 1, 1, 16, 16, 1, 0, 0),
    ([17], 2, 1, 16, 4, 3, 1, 2),
    ([333], 8, 2, 256, 16, 10, 8, 64),
    ([1000], 32, 8, 256, 16, 0.03, 8, 64),
    ([1000, 17, 333, 1], 8, 8, 16, 16, 0.1, 4, 16),
    ([333, 1000, 17, 1, 64, 200, 999, 5], 16, 4, 4096, 32, 25, 2, 3),
    ([17, 40], 4, 1, 16, 8, 5, 16, 16),     # sink + local cover the whole of the first sequence
    ([50, 333], 4, 2, 256, 16, 1000, 0, 0),  # topk larger than every sequence: all tokens
    ([333, 90], 8, 2, 16, 16, 0, 3, 5),      # topk 0: sink and local only
    ([1000, 333, 17], 16, 2, 256, 16, 0.03, 8, 64),  # GQA 8
]


def _topk_problem(lens, hq, hkv, nc, bs, topk, seed, t_table, ties):
    b = len(lens)
    codes = [torch.randint(0, nc, (hkv, n), generator=_gen(seed + i)) for i, n in enumerate(lens)]
    cache, table = _paged_codes(codes, hkv, bs, seed, t_table)
    lut = torch.randn(b, hq, nc, generator=_gen(seed + 99))
    if ties:  # few distinct values: equal scores across codes as well as within a code
        lut = (lut * 2).round() / 2
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    if isinstance(topk, float):  # a fraction of each sequence, as a per-sequence tensor
        topk = torch.tensor([math.ceil(topk * n) for n in lens], dtype=torch.int32)
    return lut, cache, table, seq_lens, topk


@pytest.mark.parametrize("lens,hq,hkv,nc,bs,topk,sink,local", TOPK_CASES)
@pytest.mark.parametrize("t_table", [False, True])
@pytest.mark.parametrize("ties", [False, True])
def test_vq_topk(lens, hq, hkv, nc, bs, topk, sink, local, t_table, ties):
    lut, cache, table, seq_lens, topk = _topk_problem(lens, hq, hkv, nc, bs, topk, 5, t_table, ties)
    kmax = ops.topk_kmax(topk, hq // hkv, sink, local, table.shape[1] * bs)
    topk_t = topk if isinstance(topk, torch.Tensor) else torch.full((len(lens),), topk, dtype=torch.int32)
    idx, count = _C().vq_topk(lut, cache, table, seq_lens, topk_t, sink, local, kmax)
    want_idx, want_count = _ref_topk(lut, cache, table, seq_lens, topk, sink, local, kmax)
    assert idx.dtype == torch.int32 and count.dtype == torch.int32
    assert torch.equal(count, want_count)
    assert torch.equal(idx, want_idx)


def test_vq_topk_int64_inputs_and_bf16_lut():
    lut, cache, table, seq_lens, topk = _topk_problem([333, 17], 8, 2, 256, 16, 0.1, 11, False, True)
    lut = lut.bfloat16()
    kmax = table.shape[1] * 16
    idx, count = _C().vq_topk(lut, cache, table.long(), seq_lens.long(), topk.long(), 4, 8, kmax)
    want_idx, want_count = _ref_topk(lut.float(), cache, table, seq_lens, topk, 4, 8, kmax)
    assert torch.equal(count, want_count) and torch.equal(idx, want_idx)


# ------------------------------------------------------------------------------------------- vq_encode

def _codebook(hkv, nc, d, seed):
    cb = torch.randn(hkv, nc, d, generator=_gen(seed))
    whiten = torch.linalg.cholesky(torch.eye(d) + 0.1 * torch.ones(d, d)).expand(hkv, d, d).contiguous()
    return cb, whiten


def _near_codewords(cb, shape_bht, seed):
    """Keys = a random codeword + small noise: the nearest code is unambiguous (no fp32 near-ties), so
    native and reference must agree exactly whatever their summation order."""
    hkv, nc, d = cb.shape
    b, t = shape_bht
    pick = torch.randint(0, nc, (b, hkv, t), generator=_gen(seed))
    k = cb[torch.arange(hkv)[None, :, None], pick] + 0.01 * torch.randn(b, hkv, t, d, generator=_gen(seed + 1))
    return k, pick


@pytest.mark.parametrize("b,hkv,t,d,nc", [(1, 1, 1, 8, 16), (2, 2, 17, 64, 256), (1, 8, 333, 128, 256),
                                          (3, 4, 100, 32, 4096), (1, 1, 5, 16, 32767)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_vq_encode(b, hkv, t, d, nc, dtype):
    cb, whiten = _codebook(hkv, nc, d, 3)
    k, _ = _near_codewords(cb, (b, t), 4)
    k, cb = k.to(dtype), cb.to(dtype)
    got = _C().vq_encode(k, cb, whiten)
    assert got.dtype == torch.int16 and got.shape == (b, hkv, t)
    assert torch.equal(got, ref.vq_encode(k, cb, whiten))


def test_vq_encode_random_keys_only_near_ties_differ():
    """Random keys: any code that differs from the reference's must be as near (fp64, 1e-5 relative)."""
    hkv, nc, d = 4, 256, 64
    cb, whiten = _codebook(hkv, nc, d, 6)
    k = torch.randn(2, hkv, 300, d, generator=_gen(7))
    got = _C().vq_encode(k, cb, whiten).long()
    want = ref.vq_encode(k, cb, whiten).long()
    xw = k.double() @ whiten.double()
    cw = cb.double() @ whiten.double()
    dist = ((xw[:, :, :, None, :] - cw[None, :, None]) ** 2).sum(-1)  # [B, Hkv, T, C]
    dg, dw = dist.gather(3, got[..., None])[..., 0], dist.gather(3, want[..., None])[..., 0]
    assert torch.all((got == want) | ((dg - dw).abs() <= 1e-5 * dw.abs()))


@pytest.mark.parametrize("lens,new,hkv,nc,bs", [([1], [1], 1, 16, 16), ([17, 333], [17, 1], 2, 256, 16),
                                                ([1000, 5, 64], [1, 5, 33], 8, 4096, 32)])
@pytest.mark.parametrize("t_table", [False, True])
def test_vq_encode_paged(lens, new, hkv, nc, bs, t_table):
    d = 32
    cb, whiten = _codebook(hkv, nc, d, 8)
    k, _ = _near_codewords(cb, (1, sum(new)), 9)
    k_new = k[0].permute(1, 0, 2).contiguous()  # [N, Hkv, D]
    cache, table = _paged_codes([torch.zeros(hkv, n, dtype=torch.long) for n in lens], hkv, bs, 10, t_table)
    qsl = torch.tensor([0] + list(torch.tensor(new).cumsum(0)), dtype=torch.int32)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    want = cache.clone()
    ref_encode_paged(k_new, cb, whiten, want, table, seq_lens, qsl)
    got = cache.clone()
    _C().vq_encode_paged(k_new, cb, whiten, got, table, seq_lens, qsl)
    assert torch.equal(got, want)


# ------------------------------------------------------------------------------------------- dispatch, errors

def test_ops_dispatch_to_native(monkeypatch):
    from kvcomp.ops._dispatch import impl_for

    monkeypatch.delenv("KVCOMP_OPS", raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    lut, cache, table, seq_lens, topk = _topk_problem([333, 17], 8, 2, 256, 16, 0.1, 12, True, False)
    for name in ("vq_lut", "vq_topk", "vq_encode", "vq_encode_paged"):
        assert impl_for(lut, name) == "native"
    want_idx, want_count = _ref_topk(lut, cache, table, seq_lens, topk, 4, 8,
                                     ops.topk_kmax(topk, 4, 4, 8, table.shape[1] * 16))
    q, cb = torch.randn(2, 8, 16, generator=_gen(1)), torch.randn(2, 256, 16, generator=_gen(2))
    want_lut = ref.vq_lut(q, cb)
    k, _ = _near_codewords(cb, (1, 9), 3)
    whiten = torch.eye(16).expand(2, 16, 16).contiguous()
    want_codes = ref.vq_encode(k, cb, whiten)

    def boom(*a, **kw):
        raise AssertionError("the reference ran instead of the native op")

    import kvcomp.ref.vq_paged

    monkeypatch.setattr(kvcomp.ref.vq_paged, "paged_vq_topk", boom)
    monkeypatch.setattr(ref, "vq_lut", boom)
    monkeypatch.setattr(ref, "vq_encode", boom)
    idx, count = ops.vq_topk(lut, cache, table, seq_lens, topk=topk, sink=4, local=8)
    assert torch.equal(idx, want_idx) and torch.equal(count, want_count)
    torch.testing.assert_close(ops.vq_lut(q, cb), want_lut, rtol=1e-5, atol=1e-5)
    assert torch.equal(ops.vq_encode(k, cb, whiten), want_codes)


def _topk_args(**over):
    lut, cache, table, seq_lens, topk = _topk_problem([40, 17], 4, 2, 16, 8, 5, 13, False, False)
    args = dict(lut=lut, code_cache=cache, block_table=table, seq_lens=seq_lens,
                topk=torch.full((2,), topk, dtype=torch.int32), sink=1, local=2, kmax=40)
    args.update(over)
    return args


def _bad_cache():
    c = _topk_args()["code_cache"].clone()
    c[_topk_args()["block_table"][0, 0], 3, 1] = 16  # code == C for a valid token
    return c


@pytest.mark.parametrize("over,match", [
    (lambda: dict(code_cache=_bad_cache()), "outside \\[0, C=16\\)"),
    (lambda: dict(code_cache=_topk_args()["code_cache"].int()), "int16"),
    (lambda: dict(block_table=torch.full((2, 6), 999, dtype=torch.int32)), "outside the cache"),
    (lambda: dict(seq_lens=torch.tensor([40, 10_000], dtype=torch.int32)), "max_blocks"),
    (lambda: dict(topk=torch.tensor([5, -1], dtype=torch.int32)), "topk"),
    (lambda: dict(kmax=3), "kmax"),
    (lambda: dict(lut=torch.randn(2, 3, 16)), "multiple"),
    (lambda: dict(lut=torch.randn(2, 4, 16, dtype=torch.float32).int()), "floating"),
    (lambda: dict(sink=-1), "sink"),
])
def test_vq_topk_bad_input(over, match):
    a = _topk_args(**over())
    with pytest.raises(ValueError, match=match):
        _C().vq_topk(a["lut"], a["code_cache"], a["block_table"], a["seq_lens"], a["topk"], a["sink"], a["local"],
                     a["kmax"])


def test_vq_lut_and_encode_bad_input():
    cb, whiten = _codebook(2, 16, 8, 1)
    with pytest.raises(ValueError, match="head dim"):
        _C().vq_lut(torch.randn(1, 4, 9), cb, 1.0)
    with pytest.raises(ValueError, match="codebook"):
        _C().vq_encode(torch.randn(1, 3, 5, 8), cb, whiten)
    with pytest.raises(ValueError, match="whiten"):
        _C().vq_encode(torch.randn(1, 2, 5, 8), cb, whiten[:, :4])
    cache = torch.zeros(4, 4, 2, dtype=torch.int16)
    k_new = torch.randn(3, 2, 8)
    table = torch.tensor([[0, 1]], dtype=torch.int32)
    for lens, qsl, bt, match in [([5], [0, 2], table, "from 0 to N=3"), ([2], [0, 3], table, "smaller than"),
                                 ([9], [0, 3], table, "needs 3 blocks"),
                                 ([6], [0, 3], torch.tensor([[0, 4]], dtype=torch.int32), "outside")]:
        with pytest.raises(ValueError, match=match):
            _C().vq_encode_paged(k_new, cb, whiten, cache, bt, torch.tensor(lens), torch.tensor(qsl))
    assert not cache.any()  # nothing written on error
