"""Native causal varlen prefill over the pages (torch.ops.kvcomp_C.paged_prefill) against
kvcomp.ref.attention.paged_attention."""

from __future__ import annotations

import math

import pytest
import torch

from kvcomp._ext import has_ext
from kvcomp.ops.paged_prefill import paged_prefill
from kvcomp.ref.attention import paged_attention

pytestmark = pytest.mark.skipif(not has_ext(), reason="native extension not built (KVCOMP_BUILD_EXT=1, see setup.py)")

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def _inputs(seq_lens, q_lens, hkv, g, d, block_size, dtype, seed=0, q_dtype=None, strided=False):
    """Permuted pages (plus spare blocks), a transposed-contiguous block table (``strided``: every
    other column of a wider one, and K / V pages as views of one stacked tensor), packed queries."""
    gen = torch.Generator().manual_seed(seed)
    bsz = len(seq_lens)
    max_blocks = max(math.ceil(max(seq_lens) / block_size), 1) + 1
    num_blocks = bsz * max_blocks + 2
    perm = torch.randperm(num_blocks, generator=gen)[: bsz * max_blocks].reshape(bsz, max_blocks)
    block_table = perm.to(torch.int32).t().contiguous().t()
    if strided:
        wide = torch.full((bsz, 2 * max_blocks), -1, dtype=torch.int32)
        wide[:, ::2] = block_table
        block_table = wide[:, ::2]
        kv = torch.randn(num_blocks, block_size, 2, hkv, d, generator=gen).to(dtype)
        k_cache, v_cache = kv[:, :, 0], kv[:, :, 1]
    else:
        k_cache = torch.randn(num_blocks, block_size, hkv, d, generator=gen).to(dtype)
        v_cache = torch.randn(num_blocks, block_size, hkv, d, generator=gen).to(dtype)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(qsl[-1]), hkv * g, d, generator=gen).to(q_dtype or dtype)
    return [q, k_cache, v_cache, block_table, torch.tensor(seq_lens, dtype=torch.int32), qsl]


CASES = [  # (seq_lens, q_lens, Hkv, G, D, block_size, dtype)
    ([1], [1], 1, 1, 64, 16, torch.float32),
    ([333], [333], 2, 4, 128, 16, torch.float32),
    ([17, 333, 40], [17, 100, 1], 2, 2, 64, 16, torch.float32),
    ([5, 0, 77, 9], [5, 0, 3, 9], 1, 8, 72, 4, torch.float32),
    ([260, 33], [7, 33], 3, 3, 40, 8, torch.float32),
    ([300, 17, 1], [300, 2, 1], 2, 4, 128, 16, torch.bfloat16),
    ([129, 64], [64, 64], 4, 2, 64, 32, torch.float16),
    # query tiles (256 rows / G tokens) and key tiles (512) that do not divide the lengths
    ([601], [601], 1, 1, 64, 16, torch.float32),
    ([700, 515], [389, 515], 3, 3, 64, 16, torch.float32),
    ([1000], [257], 1, 8, 32, 16, torch.float32),
    ([11, 300, 2, 97, 513, 64, 5, 260], [11, 1, 2, 50, 300, 64, 3, 259], 2, 5, 48, 8, torch.float32),
    ([530, 77], [530, 70], 2, 6, 64, 16, torch.bfloat16),
    ([257, 1], [200, 1], 4, 7, 24, 16, torch.bfloat16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"L{max(c[0])}-q{sum(c[1])}-kv{c[2]}-G{c[3]}-D{c[4]}-{str(c[6])[6:]}")
def test_native_prefill_matches_reference(case, cpu_isa):
    seq_lens, q_lens, hkv, g, d, bs, dtype = case
    args = _inputs(seq_lens, q_lens, hkv, g, d, bs, dtype, seed=sum(seq_lens))
    ref = paged_attention(*args, scale=0.2)
    out = torch.ops.kvcomp_C.paged_prefill(*args, 0.2)
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("g", [1, 2, 3, 4, 8])
def test_native_prefill_gqa_batch_strided(batch, g):
    """GQA 1-8 x batch 1-8, odd lengths, chunked rows, non-contiguous tables and K/V page views."""
    lens = [[333], [45, 130, 267], [9, 260, 31, 77, 300, 3, 129, 64]][[1, 3, 8].index(batch)]
    q_lens = [max(1, n // (i + 1)) for i, n in enumerate(lens)]
    args = _inputs(lens, q_lens, 2, g, 40, 8, torch.float32, seed=batch * 10 + g, strided=True)
    assert not args[3].is_contiguous() and not args[1].is_contiguous()
    ref = paged_attention(*args, scale=0.15)
    torch.testing.assert_close(torch.ops.kvcomp_C.paged_prefill(*args, 0.15), ref, rtol=1e-5, atol=1e-5)


def test_native_prefill_fp32_queries_bf16_pages():
    args = _inputs([390, 20], [390, 7], 2, 3, 64, 16, torch.bfloat16, seed=4, q_dtype=torch.float32)
    ref = paged_attention(*args)
    out = torch.ops.kvcomp_C.paged_prefill(*args, 64**-0.5)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


def test_ops_entry_runs_native(monkeypatch):
    monkeypatch.setenv("KVCOMP_OPS", "native")
    args = _inputs([40, 333], [40, 5], 2, 4, 64, 16, torch.float32, seed=1)
    ref = paged_attention(*args)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = paged_prefill(*args)
    assert "kvcomp_C::paged_prefill" in {e.key for e in prof.key_averages()}
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _bad_cases():
    a = _inputs([17, 40], [17, 3], 2, 2, 64, 16, torch.float32, seed=2)
    q, kc, vc, bt, sl, qsl = a
    out_of_range = bt.clone()
    out_of_range[1, 2] = kc.shape[0]

    def put(i, v):
        b = list(a)
        b[i] = v
        return b

    return {
        "q 2-D": put(0, q[0]),
        "q int": put(0, q.to(torch.int32)),
        "v_cache dtype": put(2, vc.double()),
        "k_cache head dim": put(1, kc[..., :32]),
        "gqa": put(0, q[:, :3]),
        "block_table float": put(3, bt.float()),
        "block_table rows": put(3, bt[:1]),
        "block_table too short": put(3, bt[:, :2]),
        "block id out of range": put(3, out_of_range),
        "seq_lens 2-D": put(4, sl[None]),
        "query_start_loc end": put(5, torch.tensor([0, 17, 19], dtype=torch.int32)),
        "query_start_loc decreasing": put(5, torch.tensor([0, 21, 20], dtype=torch.int32)),
        "q_len > seq_len": put(4, torch.tensor([16, 40], dtype=torch.int32)),
    }


BAD = _bad_cases()


@pytest.mark.parametrize("name", list(BAD))
def test_native_prefill_rejects_bad_inputs(name):
    with pytest.raises(ValueError):
        torch.ops.kvcomp_C.paged_prefill(*BAD[name], 0.125)


def _step(seq_lens, q_lens, block_table):
    from kvcomp.methods.step import Step

    qsl = [0, *torch.tensor(q_lens).cumsum(0).tolist()]
    return Step(len(seq_lens), qsl[-1], max(q_lens), max(seq_lens), torch.tensor(qsl, dtype=torch.int32),
                torch.tensor(seq_lens, dtype=torch.int32), block_table, torch.zeros(0, dtype=torch.long), qsl,
                list(seq_lens))


def _count_native(monkeypatch):
    """KVCOMP_OPS=native, and a list that grows by one per call of dense_rows' varlen entry point."""
    from kvcomp.methods import dense

    monkeypatch.setenv("KVCOMP_OPS", "native")
    calls, real = [], dense.paged_prefill
    monkeypatch.setattr(dense, "paged_prefill", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


@pytest.mark.parametrize("subset", [False, True], ids=["all-heads", "heads-subset"])
def test_dense_rows_one_native_call(monkeypatch, subset):
    """Multi-token rows of a mixed step (decode rows in between) through one native call, equal to the
    per-request gather + SDPA loop; with ``heads=`` (DuoAttention's retrieval heads: one KV head's
    query heads) only those output columns change."""
    from kvcomp.methods.dense import dense_rows, dense_rows_loop

    calls = _count_native(monkeypatch)
    seq_lens, q_lens = [40, 9, 333, 17, 260], [40, 1, 5, 1, 259]
    q, kc, vc, bt, _, _ = _inputs(seq_lens, q_lens, 2, 4, 64, 16, torch.float32, seed=7)
    md = _step(seq_lens, q_lens, bt)
    heads = torch.arange(4, 8) if subset else None
    if subset:
        q, kc, vc = q[:, 4:8], kc[:, :, 1:2], vc[:, :, 1:2]
    reqs = md.rows()[1].reqs
    out, expect = (torch.full((md.num_actual_tokens, 8, 64), 7.0) for _ in range(2))
    dense_rows(q, kc, vc, md, reqs, 0.125, out, heads)
    assert len(calls) == 1
    dense_rows_loop(q, kc, vc, md, reqs, 0.125, expect, heads)
    torch.testing.assert_close(out, expect, rtol=1e-5, atol=1e-5)
    assert (out[md.rows()[0].rows] == 7.0).all()


def test_dense_attend_runs_native(monkeypatch):
    """Dense.attend (compression off): decode rows through duo_decode, multi-token rows through one
    paged_prefill call; equal to the reference over every row."""
    from kvcomp.methods.dense import Dense
    from kvcomp.methods.step import Store

    calls = _count_native(monkeypatch)
    seq_lens, q_lens = [300, 50, 1, 129], [300, 1, 1, 64]
    q, kc, vc, bt, sl, qsl = _inputs(seq_lens, q_lens, 3, 3, 64, 16, torch.float32, seed=9)
    md = _step(seq_lens, q_lens, bt)
    out = torch.empty_like(q)
    Dense(3, 0.125, "cpu").attend(Store(k=kc, v=vc), q, None, None, md, out)
    assert len(calls) == 1
    torch.testing.assert_close(out, paged_attention(q, kc, vc, bt, sl, qsl, scale=0.125), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("limit, native", [(4096, True), (76, False)])
def test_dense_rows_whole_single_prompt_route(monkeypatch, limit, native):
    """One whole prompt alone in the step runs the native op up to ``LOOP_PROMPT_TOKENS`` tokens and
    the gather + SDPA loop beyond (measured faster there); both equal the reference."""
    from kvcomp.methods import dense

    calls = _count_native(monkeypatch)
    monkeypatch.setattr(dense, "LOOP_PROMPT_TOKENS", limit)
    q, kc, vc, bt, sl, qsl = _inputs([77], [77], 2, 2, 32, 16, torch.float32, seed=3)
    md = _step([77], [77], bt)
    out = torch.empty_like(q)
    dense.dense_rows(q, kc, vc, md, [0], 0.2, out)
    assert len(calls) == int(native)
    torch.testing.assert_close(out, paged_attention(q, kc, vc, bt, sl, qsl, scale=0.2), rtol=1e-5, atol=1e-5)
