"""pytest-benchmark micro-benchmarks of the CPU decode ops through ``kvcomp.ops`` (small shapes, whatever
the dispatch picks: the native kvcomp_C op when built, else the reference). Each also checks its result
against the reference; the implementation that ran is in ``benchmark.extra_info["impl"]``. Timed only
with ``--benchmark-enable`` / ``--benchmark-only`` (see conftest.py)."""

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from kvcomp.bench.core import Problem, observed_impl  # noqa: E402
from kvcomp.bench.methods import dense, duo, think, vq  # noqa: E402

P = Problem(2, 203, 8, 2, 64, torch.float32, "cpu", dict(block_size=16, sink=4, window=16, streaming_frac=0.5,
                                                           prune_ratio=0.4, n_codes=64, topk=0.1, local=8))


@pytest.fixture(autouse=True)
def _cpu_dispatch(monkeypatch):
    """What a CPU user gets: not the Triton interpreter the rest of the suite runs under."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("KVCOMP_OPS", raising=False)


def _close(a, b):
    torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-4)


def test_dense_paged_decode(benchmark):
    x = dense.make_dense_paged(P)
    benchmark.extra_info["impl"] = observed_impl(lambda: dense.run_duo_ops(x), dense.DUO_OPS)[0]
    out = benchmark(dense.run_duo_ops, x)
    _close(out, duo.ref_duo_decode(x))


def test_duo_decode(benchmark):
    x = duo.make_duo_decode(P)
    benchmark.extra_info["impl"] = observed_impl(lambda: dense.run_duo_ops(x), dense.DUO_OPS)[0]
    out = benchmark(dense.run_duo_ops, x)
    _close(out, duo.ref_duo_decode(x))


def test_think_decode(benchmark):
    x = think.make_think_decode(P)
    benchmark.extra_info["impl"] = observed_impl(lambda: think.run_think_decode(x), (("", "think_decode"),))[0]
    out = benchmark(think.run_think_decode, x)
    _close(out, think.ref_think_decode(x))


def test_vq_lut_topk(benchmark):
    from kvcomp.ops import vq_lut, vq_topk
    from kvcomp.ref import vq_lut as ref_lut
    from kvcomp.ref.vq_paged import paged_vq_topk

    x = vq.make_vq_decode(P)
    x["q_wrope"] = x["q_wrope"].float()

    def step():
        lut = vq_lut(x["q_wrope"], x["codebook"])
        return lut, vq_topk(lut, x["code_cache"], x["block_table"], x["seq_lens"], topk=x["topk"], sink=x["sink"],
                            local=x["local"])

    benchmark.extra_info["impl"] = observed_impl(step, vq.CHAIN_OPS[:2])[0]
    lut, (idx, count) = benchmark(step)
    want_lut = ref_lut(x["q_wrope"], x["codebook"])
    _close(lut, want_lut)
    ridx, rcount = paged_vq_topk(want_lut, x["code_cache"], x["block_table"], x["seq_lens"], topk=x["topk"],
                                 sink=x["sink"], local=x["local"])
    assert torch.equal(count, rcount)
    for b in range(P.batch):
        for h in range(P.hkv):
            n = int(count[b, h])
            assert torch.equal(idx[b, h, :n].sort().values, ridx[b, h, :n].sort().values)


def test_a2ats_host_mirror_chain(benchmark):
    from kvcomp.ops import vq_lut, vq_topk
    from kvcomp.ref.host_mirror import sparse_attention_host

    x = vq.make_mirror_chain(P, P.hkv)
    benchmark.extra_info["impl"] = observed_impl(lambda: vq.run_mirror_chain(x), vq.CHAIN_OPS)[0]
    out = benchmark(vq.run_mirror_chain, x)
    lut = vq_lut(x["q_wrope"], x["codebook"])
    idx, count = vq_topk(lut, x["code_cache"], x["block_table"], x["seq_lens"], topk=x["topk"], sink=x["sink"],
                         local=x["local"])
    _close(out, sparse_attention_host(x["q_vq"], x["k"], x["v"], idx, count, block_table=x["block_table"]))


def test_vq_encode(benchmark):
    from kvcomp.ops import vq_encode
    from kvcomp.ref import vq_encode as ref_encode

    g = torch.Generator().manual_seed(0)
    k = torch.randn(2, P.hkv, 37, P.d, generator=g)
    cb = torch.randn(P.hkv, 64, P.d, generator=g)
    whiten = torch.eye(P.d).expand(P.hkv, P.d, P.d).contiguous()
    benchmark.extra_info["impl"] = observed_impl(lambda: vq_encode(k, cb, whiten), (("", "vq_encode"),))[0]
    codes = benchmark(vq_encode, k, cb, whiten)
    assert torch.equal(codes, ref_encode(k, cb, whiten))
