"""Native CPU paged decode (torch.ops.kvcomp_C.duo_decode) against kvcomp.ref.duo.duo_decode_attention."""

from __future__ import annotations

import math

import pytest
import torch

from kvcomp._ext import has_ext
from kvcomp.ops.duo import triton_duo_decode_attention
from kvcomp.ref.duo import duo_decode_attention, duo_head_map
from kvcomp.testing import ring_pool

pytestmark = pytest.mark.skipif(not has_ext(), reason="native extension not built (KVCOMP_BUILD_EXT=1, see setup.py)")

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def _inputs(bsz, g, n_ret, n_str, d, lens, block_size, sink, window, dtype, *, seed=0, index_dtype=torch.int32,
            strided_cache=False):
    """Random decode inputs: permuted paged blocks (plus spare ones), a transposed-contiguous block
    table with unused columns, rings for the streaming heads, a random head split."""
    gen = torch.Generator().manual_seed(seed)
    hkv = n_ret + n_str
    q = torch.randn(bsz, hkv * g, d, generator=gen).to(dtype)
    max_blocks = max(math.ceil(max(lens) / block_size), 1) + 1
    num_blocks = bsz * max_blocks + 3
    perm = torch.randperm(num_blocks, generator=gen)[: bsz * max_blocks].reshape(bsz, max_blocks)
    block_table = perm.to(index_dtype).t().contiguous().t()  # non-contiguous: strides (1, B)
    if strided_cache:  # vLLM-like [2, num_blocks, block_size, H, D] pages with extra heads, viewed
        pages = torch.randn(2, num_blocks, block_size, n_ret + 2, d, generator=gen).to(dtype)
        k_cache, v_cache = pages[0, :, :, 1:n_ret + 1], pages[1, :, :, 1:n_ret + 1]
    else:
        k_cache = torch.randn(num_blocks, block_size, n_ret, d, generator=gen).to(dtype)
        v_cache = torch.randn(num_blocks, block_size, n_ret, d, generator=gen).to(dtype)
    k_stream = torch.randn(bsz, n_str, sink + window, d, generator=gen).to(dtype)
    v_stream = torch.randn(bsz, n_str, sink + window, d, generator=gen).to(dtype)
    streaming = torch.zeros(hkv, dtype=torch.bool)
    streaming[torch.randperm(hkv, generator=gen)[:n_str]] = True
    head_map = duo_head_map(streaming)
    seq_lens = torch.tensor(lens, dtype=index_dtype)
    return [q, k_cache, v_cache, block_table, seq_lens, k_stream, v_stream, head_map]


CASES = [  # (B, G, n_ret, n_str, D, seq_lens, block_size, sink, window, dtype)
    (1, 1, 1, 0, 64, [1], 16, 4, 8, torch.float32),
    (1, 4, 8, 0, 128, [333], 16, 4, 16, torch.float32),
    (3, 2, 2, 2, 64, [1, 17, 333], 16, 4, 16, torch.float32),
    (2, 8, 1, 1, 128, [17, 1000], 16, 2, 32, torch.float32),
    (2, 4, 2, 2, 72, [333, 5], 8, 3, 7, torch.float32),
    (4, 3, 2, 0, 40, [77, 1, 260, 33], 4, 0, 1, torch.float32),
    (4, 2, 0, 3, 64, [1, 17, 333, 50], 16, 4, 16, torch.float32),
    (8, 1, 3, 1, 128, [1, 17, 333, 64, 65, 2, 100, 257], 16, 8, 24, torch.float32),
    (3, 4, 4, 4, 128, [17, 333, 1], 16, 4, 16, torch.bfloat16),
    (2, 8, 1, 1, 64, [500, 33], 32, 2, 9, torch.bfloat16),
    (2, 2, 3, 1, 128, [333, 17], 16, 4, 16, torch.float16),
    (5, 1, 1, 1, 72, [1, 2, 3, 333, 17], 16, 4, 16, torch.float16),
    (2, 4, 1, 1, 12, [40, 3], 16, 2, 8, torch.bfloat16),  # D < 16 and not a multiple of 8: partial loads only
    # retrieval tiles sized by bytes (paged_decode_cpu.cpp retrieval_tile): 8 rows (16 KiB of K + V per
    # token) and 64 rows (1 KiB per token), with partial last tiles
    (1, 2, 8, 0, 256, [333], 16, 4, 16, torch.float32),
    (2, 4, 2, 2, 128, [1000, 70], 16, 4, 16, torch.bfloat16),
]


def _ids(c):
    return f"B{c[0]}-G{c[1]}-ret{c[2]}-str{c[3]}-D{c[4]}-L{max(c[5])}-bs{c[6]}-{str(c[9])[6:]}"


@pytest.mark.parametrize("num_splits", [0, 3])
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_native_matches_reference(case, num_splits, cpu_isa):
    bsz, g, n_ret, n_str, d, lens, bs, sink, window, dtype = case
    args = _inputs(bsz, g, n_ret, n_str, d, lens, bs, sink, window, dtype, seed=len(lens) + d)
    scale = 1.0 / math.sqrt(d)
    ref = duo_decode_attention(*args, sink=sink, window=window, scale=scale)
    out = torch.ops.kvcomp_C.duo_decode(*args, sink, window, scale, num_splits)
    assert out.dtype == dtype and out.shape == ref.shape
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_strided_pages_int64_tables_and_mixed_dtypes(dtype, cpu_isa):
    args = _inputs(3, 4, 2, 2, 64, [40, 1, 129], 16, 4, 16, dtype, seed=7, index_dtype=torch.int64,
                   strided_cache=True)
    assert not args[1].is_contiguous()
    args[0] = args[0].float()  # q in fp32 over a low-precision cache: the output follows q
    ref = duo_decode_attention(*args, sink=4, window=16, scale=0.3)
    out = torch.ops.kvcomp_C.duo_decode(*args, 4, 16, 0.3, 0)
    assert out.dtype == torch.float32
    tol = TOL[dtype]
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


# (B, G, n_ret, n_str, D, seq_lens, sink, window, ring capacity, spare rings, dtype)
RING_CASES = [
    (1, 1, 1, 1, 64, [40], 4, 8, 15, 2, torch.float32),  # wider rings (vLLM's page unification)
    (3, 4, 2, 2, 64, [1, 3, 6], 4, 16, 6, 1, torch.float32),  # rings not filled yet: 6 < 20 slots
    (4, 8, 0, 1, 128, [1, 17, 333, 20], 4, 16, 20, 4, torch.float32),  # every head streaming
    (2, 2, 3, 1, 72, [333, 5], 3, 7, 12, 0, torch.bfloat16),
    (5, 3, 1, 2, 40, [1, 2, 3, 333, 17], 0, 5, 5, 3, torch.float16),
]


@pytest.mark.parametrize("int64", [False, True], ids=["rb32", "rb64"])
@pytest.mark.parametrize("case", RING_CASES, ids=[f"B{c[0]}-G{c[1]}-str{c[3]}-cap{c[8]}-{str(c[10])[6:]}"
                                                  for c in RING_CASES])
def test_native_reads_rings_in_place(case, int64, cpu_isa):
    """Rings read through ``ring_block`` from a pool (permuted ids, spare rings, wider or partly filled
    rings, K/V views of one tensor) = the reference over one ring per request; NaN in every slot no
    kept token holds."""
    bsz, g, n_ret, n_str, d, lens, sink, window, cap, spare, dtype = case
    args = _inputs(bsz, g, n_ret, n_str, d, lens, 16, sink, window, dtype, seed=bsz + d)
    ref = duo_decode_attention(*args, sink=sink, window=window, scale=0.2)
    ks, vs, rb = ring_pool(args[5], args[6], capacity=cap, spare_rings=spare, seed=bsz)
    rb = rb.long() if int64 else rb
    out = torch.ops.kvcomp_C.duo_decode(*args[:5], ks, vs, args[7], sink, window, 0.2, 0, rb)
    tol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref.float(), rtol=tol, atol=tol)
    ref_in_place = duo_decode_attention(*args[:5], ks, vs, args[7], sink=sink, window=window, scale=0.2, ring_block=rb)
    torch.testing.assert_close(ref_in_place.float(), ref.float(), rtol=tol, atol=tol)


def _pooled_bad(rb=None, cap=20, lens=(17, 40)):
    args = _inputs(2, 2, 2, 1, 64, list(lens), 16, 4, 16, torch.float32, seed=2)
    ks, vs, ids = ring_pool(args[5], args[6], capacity=cap, spare_rings=1)
    return [*args[:5], ks, vs, args[7]], ids if rb is None else rb


@pytest.mark.parametrize("name, rb, cap, match", [
    ("id past the pool", torch.tensor([0, 3], dtype=torch.int32), 20, "ring_block\\[1\\] = 3 is outside"),
    ("negative id", torch.tensor([-1, 0]), 20, "ring_block\\[0\\] = -1 is outside"),
    ("length", torch.tensor([0], dtype=torch.int32), 20, "ring_block has 1 entries"),
    ("float ids", torch.tensor([0.0, 1.0]), 20, "ring_block"),
    ("2-D ids", torch.tensor([[0, 1]], dtype=torch.int32), 20, "ring_block"),
    ("ring too short", None, 19, "19 ring slots but request 1"),
], ids=lambda x: x if isinstance(x, str) else "")
def test_native_rejects_bad_rings(name, rb, cap, match):
    args, ids = _pooled_bad(rb, cap)
    with pytest.raises(ValueError, match=match):
        torch.ops.kvcomp_C.duo_decode(*args, 4, 16, 0.125, 0, ids)
    with pytest.raises(ValueError):  # the reference refuses them too
        duo_decode_attention(*args, sink=4, window=16, ring_block=ids)


def test_native_rings_without_ids_must_be_one_per_request():
    args, _ = _pooled_bad()
    with pytest.raises(ValueError, match="one ring per request"):
        torch.ops.kvcomp_C.duo_decode(*args, 4, 16, 0.125, 0)


def test_ops_entry_runs_native(monkeypatch):
    monkeypatch.setenv("KVCOMP_OPS", "native")
    args = _inputs(2, 4, 3, 1, 128, [333, 17], 16, 4, 16, torch.float32, seed=3)
    ref = duo_decode_attention(*args, sink=4, window=16)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = triton_duo_decode_attention(*args, sink=4, window=16)
    assert "kvcomp_C::duo_decode" in {e.key for e in prof.key_averages()}
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _bad(args, i, value):
    args = list(args)
    args[i] = value
    return args


def _bad_cases():
    a = _inputs(2, 2, 2, 1, 64, [17, 40], 16, 4, 16, torch.float32, seed=1)
    q, kc, vc, bt, sl, ks, vs, hm = a
    out_of_range = bt.clone()
    out_of_range[1, 1] = kc.shape[0]  # block 1 of sequence 1 (40 tokens need 3 blocks)
    negative = bt.clone()
    negative[0, 1] = -1
    return {
        "q 2-D": (_bad(a, 0, q[0]), {}),
        "q int": (_bad(a, 0, q.to(torch.int32)), {}),
        "k_cache 3-D": (_bad(a, 1, kc[0]), {}),
        "v_cache dtype": (_bad(a, 2, vc.double()), {}),
        "v_cache shape": (_bad(a, 2, vc[:, :8]), {}),
        "k_cache head dim": (_bad(_bad(a, 1, kc[..., :32]), 2, vc[..., :32]), {}),
        "k_cache last dim strided": (_bad(a, 1, torch.randn(*kc.shape[:-1], 2 * kc.shape[-1])[..., ::2]), {}),
        "block_table float": (_bad(a, 3, bt.float()), {}),
        "block_table rows": (_bad(a, 3, bt[:1]), {}),
        "block_table too short": (_bad(a, 3, bt[:, :2]), {}),
        "block id out of range": (_bad(a, 3, out_of_range), {}),
        "block id negative": (_bad(a, 3, negative), {}),
        "seq_lens zero": (_bad(a, 4, torch.tensor([17, 0], dtype=torch.int32)), {}),
        "seq_lens 2-D": (_bad(a, 4, sl[None]), {}),
        "k_stream window": (_bad(_bad(a, 5, ks[:, :, :-1]), 6, vs[:, :, :-1]), {}),
        "v_stream dtype": (_bad(a, 6, vs.half()), {}),
        "head_map kind": (_bad(a, 7, torch.tensor([[0, 0], [2, 0], [1, 0]], dtype=torch.int32)), {}),
        "head_map index": (_bad(a, 7, torch.tensor([[0, 0], [0, 2], [1, 0]], dtype=torch.int32)), {}),
        "head_map duplicate": (_bad(a, 7, torch.tensor([[0, 1], [0, 1], [1, 0]], dtype=torch.int32)), {}),
        "head_map rows": (_bad(a, 7, hm[:2]), {}),
        "gqa": (_bad(a, 0, q[:, :5]), {}),
        "window 0": (a, {"window": 0, "sink": 20}),
        "sink negative": (a, {"sink": -1, "window": 21}),
        "scale nan": (a, {"scale": float("nan")}),
        "num_splits negative": (a, {"num_splits": -1}),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("name", list(BAD))
def test_native_rejects_bad_inputs(name):
    args, kw = BAD[name]
    opts = {"sink": 4, "window": 16, "scale": 0.125, "num_splits": 0, **kw}
    with pytest.raises(ValueError):
        torch.ops.kvcomp_C.duo_decode(*args, opts["sink"], opts["window"], opts["scale"], opts["num_splits"])
