"""Host-mirror ops: the references (kvcomp.ref.host_mirror) against naive loops; each ops route
(KVCOMP_OPS=reference / native / triton) against them."""

from __future__ import annotations

import math

import pytest
import torch

from kvcomp._ext import has_ext
from kvcomp.ops import host_mirror as hm
from kvcomp.ref import host_mirror as R
from kvcomp.testing import assert_close, assert_equal

native = pytest.mark.skipif(not has_ext(), reason="native extension not built (KVCOMP_BUILD_EXT=1, see setup.py)")


@pytest.fixture(params=["reference", pytest.param("native", marks=native)])
def impl(request, monkeypatch):
    """Run the test through one ops route (KVCOMP_OPS)."""
    monkeypatch.setenv("KVCOMP_OPS", request.param)
    return request.param


@pytest.fixture
def use_native(monkeypatch):
    monkeypatch.setenv("KVCOMP_OPS", "native")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _paged(dense: torch.Tensor, block_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, Hkv, T, D] -> paged cache [NB, BS, Hkv, D] with randomly permuted blocks + [B, max_blocks] table."""
    b, hkv, t, d = dense.shape
    mb = math.ceil(t / block_size)
    nb = b * mb + 3  # spare blocks that no table points to
    perm = torch.randperm(nb, generator=_gen(seed))[: b * mb].reshape(b, mb).to(torch.int32)
    cache = torch.randn(nb, block_size, hkv, d, generator=_gen(seed + 1)).to(dense.dtype)
    for bi in range(b):
        for tok in range(t):
            cache[perm[bi, tok // block_size], tok % block_size] = dense[bi, :, tok]
    return cache, perm


def _naive_attention(q, k, v, idx, count, scale):
    """Per (b, query head) loop in fp64 over dense [B, Hkv, T, D] keys."""
    b, hq, _ = q.shape
    g = hq // k.shape[1]
    out = torch.empty(b, hq, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            sel = idx[bi, h // g, : count[bi, h // g]].long()
            ks, vs = k[bi, h // g, sel].double(), v[bi, h // g, sel].double()
            p = torch.softmax(ks @ q[bi, h].double() * scale, 0)
            out[bi, h] = p @ vs
    return out


# ------------------------------------------------------------------------------------------- gather

GATHER_CASES = [  # (Hkv, T, D, K, dtype)
    (1, 5, 8, 1, torch.float32),
    (3, 97, 17, 13, torch.bfloat16),
    (4, 300, 64, 33, torch.float16),
    (8, 1000, 128, 257, torch.float32),
]


@pytest.mark.parametrize("hkv,t,d,k,dtype", GATHER_CASES, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_gather_dense(impl, hkv, t, d, k, dtype, index_dtype):
    src = torch.randn(hkv, t, d, generator=_gen(0)).to(dtype)
    idx = torch.randint(0, t, (hkv, k), generator=_gen(1)).to(index_dtype)
    idx[:, 0] = idx[:, -1]  # duplicates
    ref = torch.stack([src[h, idx[h].long()] for h in range(hkv)])
    out = torch.full((hkv, k, d), float("nan"), dtype=dtype)
    res = hm.gather_tokens(src, idx, out)
    assert res is out
    assert_equal("gather", ref, out)
    assert_equal("gather (allocated)", ref, hm.gather_tokens(src, idx))


@pytest.mark.parametrize("with_table", [True, False], ids=["table", "slots"])
def test_gather_paged(impl, with_table):
    hkv, t, d, bs, k = 3, 77, 24, 16, 19
    dense = torch.randn(1, hkv, t, d, generator=_gen(2)).to(torch.bfloat16)
    cache, table = _paged(dense, bs, seed=3)
    pos = torch.randint(0, t, (hkv, k), generator=_gen(4))
    ref = torch.stack([dense[0, h, pos[h]] for h in range(hkv)])
    if with_table:
        out = hm.gather_tokens(cache, pos.to(torch.int32), block_table=table[0])
    else:
        slots = table[0].long()[pos // bs] * bs + pos % bs
        out = hm.gather_tokens(cache, slots)
    assert_equal("paged gather", ref, out)


def test_gather_strided_views(impl):
    """A strided source view (time-sliced, heads not adjacent) and a strided out view."""
    big = torch.randn(50, 6, 40, generator=_gen(5))  # [T, Hkv, D] storage
    src = big.transpose(0, 1)[:, 10:45]  # [Hkv, 35, D], strides (40, 240, 1)
    idx = torch.randint(0, 35, (6, 9), generator=_gen(6))
    out_big = torch.full((6, 9, 50), float("nan"))
    out = out_big[:, :, 5:45]
    hm.gather_tokens(src, idx, out)
    assert_equal("strided gather", torch.stack([src[h, idx[h]] for h in range(6)]), out)
    assert torch.isnan(out_big[:, :, :5]).all() and torch.isnan(out_big[:, :, 45:]).all()


def test_gather_errors(impl):
    src = torch.randn(2, 10, 4)
    with pytest.raises(ValueError, match="idx has an out-of-range token index 10"):
        hm.gather_tokens(src, torch.tensor([[0, 10], [1, 2]]))
    with pytest.raises(ValueError, match="out-of-range token index -1"):
        hm.gather_tokens(src, torch.tensor([[0, -1], [1, 2]]))
    with pytest.raises(ValueError, match="idx must be int32 or int64"):
        hm.gather_tokens(src, torch.zeros(2, 3))
    with pytest.raises(ValueError, match="idx has 3 heads but src has Hkv=2"):
        hm.gather_tokens(src, torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="out dtype"):
        hm.gather_tokens(src, torch.zeros(2, 1, dtype=torch.long), torch.empty(2, 1, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="block_table is only valid with a paged src"):
        hm.gather_tokens(src, torch.zeros(2, 1, dtype=torch.long), block_table=torch.zeros(1, dtype=torch.int32))
    cache = torch.randn(4, 8, 2, 4)
    with pytest.raises(ValueError, match="block_table maps"):
        hm.gather_tokens(cache, torch.tensor([[0], [9]]), block_table=torch.tensor([0, 7], dtype=torch.int32))
    with pytest.raises(ValueError, match="out-of-range token index 32"):
        hm.gather_tokens(cache, torch.tensor([[0], [32]]))


# ---------------------------------------------------------------------------------------- attention

ATTN_CASES = [  # (B, Hkv, G, T, D, Dv, K)
    (1, 1, 1, 7, 16, 16, 3),
    (3, 2, 3, 101, 32, 24, 17),
    (1, 4, 4, 600, 64, 64, 333),  # K > 128: the native op splits tokens across threads
    (3, 3, 1, 64, 8, 8, 64),
]
DTYPE_RATIO = {torch.float32: 1e-5, torch.bfloat16: 5e-3, torch.float16: 1e-3}


def _attn_inputs(b, hkv, g, t, d, dv, k, dtype, seed):
    q = torch.randn(b, hkv * g, d, generator=_gen(seed)).to(dtype)
    kk = torch.randn(b, hkv, t, d, generator=_gen(seed + 1)).to(dtype)
    vv = torch.randn(b, hkv, t, dv, generator=_gen(seed + 2)).to(dtype)
    idx = torch.randint(0, t, (b, hkv, k), generator=_gen(seed + 3))
    idx[..., 1::5] = idx[..., :1]  # duplicates count as separate keys
    count = torch.randint(1, k + 1, (b, hkv), generator=_gen(seed + 4))
    count[0, 0] = k
    return q, kk, vv, idx, count


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "B{}-Hkv{}-G{}-T{}-D{}-Dv{}-K{}".format(*c))
def test_sparse_attention_reference_vs_naive(case, dtype):
    q, k, v, idx, count = _attn_inputs(*case, dtype, seed=10)
    scale = 0.7 / math.sqrt(case[4])
    ref = _naive_attention(q, k, v, idx, count, scale)
    out = R.sparse_attention_host(q, k, v, idx, count, scale=scale)
    assert out.dtype == dtype
    assert_close("sparse attention (reference)", ref, out, DTYPE_RATIO[dtype])


@native
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", ATTN_CASES, ids=lambda c: "B{}-Hkv{}-G{}-T{}-D{}-Dv{}-K{}".format(*c))
def test_sparse_attention_native_vs_reference(case, dtype, index_dtype, use_native, cpu_isa):
    q, k, v, idx, count = _attn_inputs(*case, dtype, seed=20)
    idx, count = idx.to(index_dtype), count.to(index_dtype)
    ref = R.sparse_attention_host(q, k, v, idx, count)
    out = hm.sparse_attention_host(q, k, v, idx, count)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close("sparse attention (native)", ref, out, DTYPE_RATIO[dtype])
    assert_close("vs fp64", _naive_attention(q, k, v, idx, count, 1 / math.sqrt(case[4])), out, DTYPE_RATIO[dtype])


def test_sparse_attention_paged(impl):
    b, hkv, g, t, d, k, bs = 3, 2, 4, 90, 32, 21, 16
    q, kk, vv, idx, count = _attn_inputs(b, hkv, g, t, d, d, k, torch.bfloat16, seed=30)
    kc, table = _paged(kk, bs, seed=31)
    vc, vtable = _paged(vv, bs, seed=31)  # same seed: same block permutation
    assert torch.equal(table, vtable)
    ref = _naive_attention(q, kk, vv, idx, count, 1 / math.sqrt(d))
    out = hm.sparse_attention_host(q, kc, vc, idx.to(torch.int32), count, block_table=table)
    assert_close("paged sparse attention", ref, out, DTYPE_RATIO[torch.bfloat16])


@native
def test_sparse_attention_paged_many_sequences_threads(use_native):
    """Many (sequence, head) items over several threads, each sequence with its own block table."""
    b, hkv, g, t, d, k, bs = 9, 2, 2, 48, 16, 7, 8
    q, kk, vv, idx, count = _attn_inputs(b, hkv, g, t, d, d, k, torch.float32, seed=35)
    kc, table = _paged(kk, bs, seed=36)
    vc, _ = _paged(vv, bs, seed=36)
    ref = _naive_attention(q, kk, vv, idx, count, 1 / math.sqrt(d))
    threads = torch.get_num_threads()
    try:
        for n in (2, 4):
            torch.set_num_threads(n)
            for _ in range(20):
                out = hm.sparse_attention_host(q, kc, vc, idx, count, block_table=table)
                assert_close(f"paged attention, {n} threads", ref, out, 1e-5)
    finally:
        torch.set_num_threads(threads)


PAGED_CASES = [  # (B, Hkv, G, T, D, Dv, K, block_size): odd counts around the 32-row tiles, GQA 1-8, B 1-8
    (1, 8, 4, 700, 128, 128, 257, 16),  # the Llama-3.1-8B head shape, several tiles and splits per head
    (8, 2, 8, 90, 64, 64, 33, 16),
    (3, 3, 5, 200, 17, 13, 65, 6),      # block size not a power of two; D, Dv not a multiple of the lanes
    (2, 1, 1, 50, 32, 40, 31, 8),
    (5, 4, 2, 129, 48, 48, 129, 32),
]


@native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", PAGED_CASES, ids=lambda c: "B{}-Hkv{}-G{}-T{}-D{}-Dv{}-K{}-bs{}".format(*c))
def test_sparse_attention_paged_native_vs_naive(case, dtype, use_native, cpu_isa):
    """Paged native op over a mirror laid out like the vLLM backend's (K and V halves of one
    [num_blocks, block_size, Hkv, D + Dv] tensor, permuted blocks, a non-contiguous block table),
    ascending ids with a per-head count (every head a different number of tiles)."""
    b, hkv, g, t, d, dv, k, bs = case
    q, kk, vv, _, _ = _attn_inputs(b, hkv, g, t, d, dv, k, dtype, seed=60)
    kc, table = _paged(kk, bs, seed=61)
    vc, _ = _paged(vv, bs, seed=61)
    kv = torch.cat([kc, vc], dim=-1)  # one row per (slot, head): K then V
    gen = _gen(62)
    idx = torch.stack([torch.randperm(t, generator=gen)[:k].sort().values for _ in range(b * hkv)]).view(b, hkv, k)
    count = torch.randint(1, k + 1, (b, hkv), generator=gen)
    count[0, 0] = k
    wide = torch.full((b, 2 * table.shape[1]), -7, dtype=torch.int32)
    wide[:, ::2] = table  # a strided view: the op's caller makes it contiguous
    out = hm.sparse_attention_host(q, kv[..., :d], kv[..., d:], idx.to(torch.int32), count, block_table=wide[:, ::2])
    assert out.dtype == dtype and out.shape == (b, hkv * g, dv)
    assert_close("paged sparse attention (native)", _naive_attention(q, kk, vv, idx, count, 1 / math.sqrt(d)), out,
                 DTYPE_RATIO[dtype])


@native
def test_sparse_attention_paged_bad_table(use_native):
    """A selected id whose table entry points outside the cache fails before any row is read."""
    b, hkv, g, t, d, k, bs = 2, 2, 2, 64, 16, 9, 16
    q, kk, vv, idx, count = _attn_inputs(b, hkv, g, t, d, d, k, torch.float32, seed=65)
    kc, table = _paged(kk, bs, seed=66)
    vc, _ = _paged(vv, bs, seed=66)
    idx[1, 1, 0], count[1, 1] = 40, k  # token 40 -> table[1, 2]
    table[1, 2] = kc.shape[0] + 5
    with pytest.raises(ValueError, match="block_table maps token 40 to block"):
        hm.sparse_attention_host(q, kc, vc, idx, count, block_table=table)


@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sparse_attention_triton_route(paged, dtype, monkeypatch):
    """KVCOMP_OPS=triton: the Triton sparse decode (kernels/vq_sparse_decode.py) reads dense K/V as
    one page per sequence; int64 idx / count are converted; equal to the reference."""
    monkeypatch.setenv("KVCOMP_OPS", "triton")
    b, hkv, g, t, d, k, bs = 3, 2, 3, 45, 32, 13, 16
    q, kk, vv, idx, count = _attn_inputs(b, hkv, g, t, d, d, k, dtype, seed=37)
    kw = {}
    if paged:
        kk, table = _paged(kk, bs, seed=38)
        vv, _ = _paged(vv, bs, seed=38)
        kw["block_table"] = table
    ref = R.sparse_attention_host(q, kk, vv, idx, count, scale=0.3, **kw)
    out = hm.sparse_attention_host(q, kk, vv, idx, count, scale=0.3, **kw)
    assert out.dtype == dtype
    assert_close("sparse attention (triton)", ref, out, DTYPE_RATIO[dtype])


def test_sparse_attention_strided_mirror(impl):
    """k/v as views of a larger [B, T, Hkv, D] buffer (token-major), padding entries ignored."""
    b, hkv, g, t, d = 2, 3, 2, 40, 16
    store = torch.randn(b, t + 8, hkv, 2 * d, generator=_gen(40))
    k = store[:, :t, :, :d].transpose(1, 2)
    v = store[:, :t, :, d:].transpose(1, 2)
    q = torch.randn(b, hkv * g, d, generator=_gen(41))
    idx = torch.randint(0, t, (b, hkv, 11), generator=_gen(42))
    count = torch.full((b, hkv), 6)
    idx[..., 6:] = 10_000  # beyond count: never read nor checked
    ref = _naive_attention(q, k, v, idx, count, 1 / math.sqrt(d))
    assert_close("strided sparse attention", ref, hm.sparse_attention_host(q, k, v, idx, count), 1e-5)


def test_sparse_attention_errors(impl):
    q, k, v, idx, count = _attn_inputs(2, 2, 2, 30, 8, 8, 5, torch.float32, seed=50)
    bad = idx.clone()
    bad[1, 0, 0] = 30
    count[1, 0] = 5
    with pytest.raises(ValueError, match="out-of-range token index 30"):
        hm.sparse_attention_host(q, k, v, bad, count)
    with pytest.raises(ValueError, match=r"must be in \[1, K\]"):
        hm.sparse_attention_host(q, k, v, idx, torch.zeros_like(count))
    with pytest.raises(ValueError, match=r"must be in \[1, K\]"):
        hm.sparse_attention_host(q, k, v, idx, count + 5)
    with pytest.raises(ValueError, match="must be a multiple of the KV heads"):
        hm.sparse_attention_host(q[:, :3], k, v, idx, count)
    with pytest.raises(ValueError, match="share one dtype"):
        hm.sparse_attention_host(q, k.half(), v, idx, count)
    with pytest.raises(ValueError, match="q must be"):
        hm.sparse_attention_host(q[:, :, None], k, v, idx, count)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        hm.sparse_attention_host(q.double(), k.double(), v.double(), idx, count)
    with pytest.raises(ValueError, match="idx must be"):
        hm.sparse_attention_host(q, k, v, idx[:1], count)


# ------------------------------------------------------------------------------------------ scatter


@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_scatter(impl, paged, dtype):
    hkv, d, n = 3, 20, 11
    shape = (5, 8, hkv, d) if paged else (hkv, 40, d)
    num_slots = 40
    cache = torch.randn(*shape, generator=_gen(60)).to(dtype)
    new = torch.randn(n, hkv, d, generator=_gen(61)).to(dtype)
    slots = torch.randperm(num_slots, generator=_gen(62))[:n]
    slots[3] = -1  # padding: skipped
    ref = cache.clone()
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            if paged:
                ref[s // 8, s % 8] = new[i]
            else:
                ref[:, s] = new[i]
    hm.scatter_tokens(cache, new, slots.to(torch.int32))
    assert_equal("scatter", ref, cache)


def test_scatter_errors(impl):
    cache = torch.zeros(2, 4, 3, 8)
    new = torch.ones(3, 3, 8)
    with pytest.raises(ValueError, match="more than once"):
        hm.scatter_tokens(cache, new, torch.tensor([1, 5, 1]))
    with pytest.raises(ValueError, match="out-of-range slot 8"):
        hm.scatter_tokens(cache, new, torch.tensor([1, 8, 2]))
    with pytest.raises(ValueError, match="new_tokens must have shape"):
        hm.scatter_tokens(cache, new[:, :2], torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="slots has 2 entries"):
        hm.scatter_tokens(cache, new, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="dtype"):
        hm.scatter_tokens(cache, new.half(), torch.tensor([1, 2, 3]))
    assert not cache.any(), "a rejected scatter must not write"


# ----------------------------------------------------------------------------- GPU zero-copy gather


def _has_uva() -> bool:
    if not (has_ext() and torch.cuda.is_available()):
        return False
    from kvcomp._ext import load_ext

    return bool(load_ext().with_cuda())


@pytest.mark.gpu
@pytest.mark.skipif(not _has_uva(), reason="needs CUDA and kvcomp._C built with KVCOMP_CUDA=1")
@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
@pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 128), (torch.float32, 17), (torch.float16, 3)], ids=str)
def test_gather_uva(paged, dtype, d, use_native):
    """Pinned host mirror -> GPU buffer, zero-copy; rows that are 16-byte aligned and ones that are not."""
    hkv, t, k, bs = 4, 300, 37, 16
    dense = torch.randn(1, hkv, t, d, generator=_gen(70)).to(dtype)
    pos = torch.randint(0, t, (hkv, k), generator=_gen(71))
    ref = torch.stack([dense[0, h, pos[h]] for h in range(hkv)])
    if paged:
        cache, table = _paged(dense, bs, seed=72)
        src, kw = cache.pin_memory(), {"block_table": table[0].cuda()}
    else:
        src, kw = dense[0].pin_memory(), {}
    out = hm.gather_tokens(src, pos.to(torch.int32).cuda(), **kw)
    torch.cuda.synchronize()
    assert out.is_cuda
    assert_equal("uva gather", ref, out.cpu())
    bad = pos.clone().cuda()
    bad[1, 3] = 10_000
    with pytest.raises(ValueError, match="out-of-range"):
        hm.gather_tokens(src, bad, **kw)
    with pytest.raises(ValueError, match="pinned"):
        hm.gather_tokens(src.clone(), pos.cuda(), **kw)
