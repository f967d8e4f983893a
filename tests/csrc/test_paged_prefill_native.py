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


def _inputs(seq_lens, q_lens, hkv, g, d, block_size, dtype, seed=0):
    """Permuted pages (plus spare blocks), a transposed-contiguous block table, packed queries."""
    gen = torch.Generator().manual_seed(seed)
    bsz = len(seq_lens)
    max_blocks = max(math.ceil(max(seq_lens) / block_size), 1) + 1
    num_blocks = bsz * max_blocks + 2
    perm = torch.randperm(num_blocks, generator=gen)[: bsz * max_blocks].reshape(bsz, max_blocks)
    block_table = perm.to(torch.int32).t().contiguous().t()
    k_cache = torch.randn(num_blocks, block_size, hkv, d, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, hkv, d, generator=gen).to(dtype)
    qsl = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    q = torch.randn(int(qsl[-1]), hkv * g, d, generator=gen).to(dtype)
    return [q, k_cache, v_cache, block_table, torch.tensor(seq_lens, dtype=torch.int32), qsl]


CASES = [  # (seq_lens, q_lens, Hkv, G, D, block_size, dtype)
    ([1], [1], 1, 1, 64, 16, torch.float32),
    ([333], [333], 2, 4, 128, 16, torch.float32),
    ([17, 333, 40], [17, 100, 1], 2, 2, 64, 16, torch.float32),
    ([5, 0, 77, 9], [5, 0, 3, 9], 1, 8, 72, 4, torch.float32),
    ([260, 33], [7, 33], 3, 3, 40, 8, torch.float32),
    ([300, 17, 1], [300, 2, 1], 2, 4, 128, 16, torch.bfloat16),
    ([129, 64], [64, 64], 4, 2, 64, 32, torch.float16),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"L{max(c[0])}-q{sum(c[1])}-kv{c[2]}-G{c[3]}-D{c[4]}-{str(c[6])[6:]}")
def test_native_prefill_matches_reference(case):
    seq_lens, q_lens, hkv, g, d, bs, dtype = case
    args = _inputs(seq_lens, q_lens, hkv, g, d, bs, dtype, seed=sum(seq_lens))
    ref = paged_attention(*args, scale=0.2)
    out = torch.ops.kvcomp_C.paged_prefill(*args, 0.2)
    assert out.dtype == dtype and out.shape == ref.shape
    torch.testing.assert_close(out.float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype])


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
