import importlib

import pytest
import torch
from ref_brute import brute_attention, to_pages

import kvcomp.ref as R
from kvcomp.testing import assert_close, assert_equal

# the function kvcomp.ref.attention shadows the submodule of the same name
A = importlib.import_module("kvcomp.ref.attention")

# (B, Hq, Hkv, Tq, Tk, D, Dv)
DENSE = [
    (1, 1, 1, 1, 1, 8, 8),
    (1, 4, 4, 7, 7, 16, 16),
    (3, 6, 2, 7, 33, 16, 24),
    (1, 8, 1, 1, 129, 32, 32),
    (3, 12, 4, 33, 33, 8, 4),
    (1, 8, 2, 129, 129, 16, 16),
]


def _ids(cases):
    return ["B{}-Hq{}-Hkv{}-Tq{}-Tk{}-D{}-Dv{}".format(*c) for c in cases]


def _qkv(b, hq, hkv, tq, tk, d, dv, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, tq, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, tk, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, tk, dv, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("case", DENSE, ids=_ids(DENSE))
def test_attention_causal_matches_brute(case):
    b, hq, hkv, tq, tk, d, dv = case
    q, k, v = _qkv(*case)
    out = R.attention(q, k, v)
    ref = brute_attention(q, k, v, lambda bb, h, i: [j for j in range(tk) if j <= tk - tq + i])
    assert out.shape == (b, hq, tq, dv) and out.dtype == q.dtype
    assert_close("attention", ref, out, 1e-5)


@pytest.mark.parametrize("case", DENSE[2:4], ids=_ids(DENSE[2:4]))
def test_attention_noncausal_scale(case):
    q, k, v = _qkv(*case, seed=1)
    out = R.attention(q, k, v, causal=False, scale=0.3)
    ref = brute_attention(q, k, v, lambda b, h, i: list(range(k.shape[2])), scale=0.3)
    assert_close("attention_noncausal", ref, out, 1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_attention_low_precision_returns_input_dtype(dtype):
    q, k, v = _qkv(2, 6, 3, 5, 9, 16, 16, dtype=dtype)
    out = R.attention(q, k, v)
    assert out.dtype == dtype
    ref = brute_attention(q, k, v, lambda b, h, i: [j for j in range(9) if j <= 4 + i])
    assert_close("attention_lowp", ref, out, 1e-2)


def test_attention_explicit_positions_compact_storage():
    # A compact cache holding a subset of positions in shuffled order, with per-batch positions.
    b, hq, hkv, d = 2, 6, 2, 16
    q, k, v = _qkv(b, hq, hkv, 3, 40, d, d, seed=3)
    keep = [torch.tensor([0, 1, 2, 30, 35, 36, 37, 38, 39]), torch.tensor([0, 5, 9, 33, 34, 36, 37, 38, 39])]
    perm = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    kp = torch.stack([x[perm] for x in keep])
    kc = torch.stack([k[i][:, kp[i]] for i in range(b)])
    vc = torch.stack([v[i][:, kp[i]] for i in range(b)])
    qp = torch.tensor([37, 38, 39])
    out = R.attention(q, kc, vc, q_pos=qp, k_pos=kp)
    ref = brute_attention(q, k, v, lambda bb, h, i: [int(j) for j in keep[bb] if j <= 37 + i])
    assert_close("attention_compact", ref, out, 1e-5)


def test_attention_mask_is_anded_and_empty_rows_are_zero():
    q, k, v = _qkv(2, 4, 2, 6, 6, 8, 8, seed=4)
    g = torch.Generator().manual_seed(5)
    m = torch.rand(2, 4, 6, 6, generator=g) < 0.5
    m[0, 1, 3] = False  # fully hidden row
    out = R.attention(q, k, v, mask=m)
    ref = brute_attention(q, k, v, lambda b, h, i: [j for j in range(6) if j <= i and bool(m[b, h, i, j])])
    assert_close("attention_mask", ref, out, 1e-5)
    assert torch.all(out[0, 1, 3] == 0)
    # broadcast mask [Tk] (e.g. padding)
    pad = torch.tensor([False, True, True, True, True, True])
    out2 = R.attention(q, k, v, mask=pad)
    ref2 = brute_attention(q, k, v, lambda b, h, i: [j for j in range(1, 6) if j <= i])
    assert_close("attention_pad_mask", ref2, out2, 1e-5)


def test_attention_query_chunking_is_exact(monkeypatch):
    q, k, v = _qkv(2, 6, 3, 33, 40, 16, 16, seed=6)
    full = R.attention(q, k, v)
    monkeypatch.setattr(A, "_CHUNK_ELEMS", 500)
    chunked = R.attention(q, k, v)
    assert_close("chunked", full, chunked, 1e-6)


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda q, k, v: R.attention(q[:, :5], k, v), "q"),
        (lambda q, k, v: R.attention(q, k, v[:, :, :3]), "v"),
        (lambda q, k, v: R.attention(q, k[..., :4], v), "k"),
        (lambda q, k, v: R.attention(q, k, v, q_pos=torch.arange(3.0)), "q_pos"),
        (lambda q, k, v: R.attention(q, k, v, k_pos=torch.arange(5)), "k_pos"),
        (lambda q, k, v: R.attention(q, k, v, mask=torch.ones(3, 3, dtype=torch.bool)), "mask"),
        (lambda q, k, v: R.attention(q, k, v, mask=torch.ones(9)), "mask"),
        (lambda q, k, v: R.attention(q.long(), k, v), "q"),
        (lambda q, k, v: R.attention(torch.randn(1, 6, 10, 8), k, v), "Tq=10 > Tk=9"),
    ],
    ids=["hq-not-multiple", "v-len", "k-dim", "qpos-float", "kpos-len", "mask-shape", "mask-dtype", "q-int", "tq-gt-tk"],
)
def test_attention_validation(bad, match):
    q, k, v = _qkv(1, 6, 2, 3, 9, 8, 8)
    with pytest.raises(ValueError, match=match):
        bad(q, k, v)


# ---------------------------------------------------------------------------------------- paged

# (name, seq_lens, q_lens, Hq, Hkv, D, Dv, block_size)
PAGED = [
    ("decode-b1", [1], [1], 4, 4, 8, 8, 16),
    ("decode-b3-g3", [7, 33, 129], [1, 1, 1], 6, 2, 16, 16, 5),
    ("prefill-b3-g4", [7, 33, 20], [7, 33, 20], 8, 2, 16, 16, 16),
    ("chunked-g8", [40, 17, 64], [9, 17, 1], 8, 1, 8, 8, 5),
    ("mixed-dv", [16, 5, 33], [16, 2, 0], 3, 1, 8, 12, 16),
    ("block-exact", [10, 15], [3, 15], 4, 2, 8, 8, 5),
]


@pytest.mark.parametrize("case", PAGED, ids=[c[0] for c in PAGED])
def test_paged_attention_matches_brute(case):
    _, lens, qlens, hq, hkv, d, dv, bs = case
    g = torch.Generator().manual_seed(11)
    ks = [torch.randn(hkv, n, d, generator=g) for n in lens]
    vs = [torch.randn(hkv, n, dv, generator=g) for n in lens]
    k_cache, table = to_pages(ks, bs, hkv, d, seed=1)
    v_cache, table_v = to_pages(vs, bs, hkv, dv, seed=1)
    assert torch.equal(table, table_v)
    qsl = torch.tensor([0] + list(torch.tensor(qlens).cumsum(0)), dtype=torch.int32)
    q = torch.randn(int(qsl[-1]), hq, d, generator=g)
    out = R.paged_attention(q, k_cache, v_cache, table, torch.tensor(lens, dtype=torch.int32), qsl)
    assert out.shape == (q.shape[0], hq, dv)
    for b, (n, ql) in enumerate(zip(lens, qlens)):
        if ql == 0:
            continue
        qb = q[int(qsl[b]):int(qsl[b + 1])].permute(1, 0, 2)[None]
        ref = brute_attention(qb, ks[b][None], vs[b][None], lambda bb, h, i: [j for j in range(n) if j <= n - ql + i])
        assert_close(f"paged seq {b}", ref[0].permute(1, 0, 2), out[int(qsl[b]):int(qsl[b + 1])], 1e-5)


def test_gather_paged_roundtrip():
    g = torch.Generator().manual_seed(2)
    ks = [torch.randn(3, n, 4, generator=g) for n in (1, 5, 11)]
    cache, table = to_pages(ks, 5, 3, 4, seed=4)
    for b, x in enumerate(ks):
        assert_equal(f"gather {b}", x, R.gather_paged(cache, table, x.shape[1], b))
    assert R.gather_paged(cache, table, 0, 0).shape == (3, 0, 4)


def test_paged_validation():
    g = torch.Generator().manual_seed(0)
    ks = [torch.randn(2, 9, 8, generator=g)]
    cache, table = to_pages(ks, 4, 2, 8)
    q = torch.randn(3, 4, 8)
    lens = torch.tensor([9], dtype=torch.int32)
    qsl = torch.tensor([0, 3], dtype=torch.int32)
    R.paged_attention(q, cache, cache, table, lens, qsl)
    with pytest.raises(ValueError, match="seq_lens"):
        R.paged_attention(q, cache, cache, table, torch.tensor([2], dtype=torch.int32), qsl)
    with pytest.raises(ValueError, match="query_start_loc"):
        R.paged_attention(q, cache, cache, table, lens, torch.tensor([0, 2], dtype=torch.int32))
    with pytest.raises(ValueError, match="block_table"):
        R.paged_attention(q, cache, cache, table * 0 + 999, lens, qsl)
    with pytest.raises(ValueError, match="block_table"):
        R.paged_attention(q, cache, cache, table, torch.tensor([40], dtype=torch.int32), qsl)
    with pytest.raises(ValueError, match="q"):
        R.paged_attention(torch.randn(3, 3, 8), cache, cache, table, lens, qsl)
    with pytest.raises(ValueError, match="b must"):
        R.gather_paged(cache, table, 3, 1)
