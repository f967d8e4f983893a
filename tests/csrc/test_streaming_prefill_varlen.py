"""Several requests' streaming-head prefill in one call: the native varlen
``torch.ops.kvcomp_C.streaming_prefill`` against ``kvcomp.ref.varlen_streaming_attention`` (same
signature) per CPU ISA over awkward shapes, the reference's input checks, and
``StreamingHeads.prefill`` (the method object the transformers path and the vLLM backend share)
making one native call for every multi-token request of a step, ring and outputs against
``ref.streaming_attention`` over each request's full history."""

from __future__ import annotations

import pytest
import torch

from kvcomp._ext import has_ext
from kvcomp.methods.duo import StreamingHeads, ring_kept, ring_slot
from kvcomp.methods.step import Step, Store
from kvcomp.ref.streaming import streaming_attention, varlen_streaming_attention

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
native = pytest.mark.skipif(not has_ext(), reason="native extension not built (KVCOMP_BUILD_EXT=1, see setup.py)")


def _packed(ctxs, qlens, hkv, g, d, dtype, sink, recent, gen):
    """Packed ``(q, k, v, q_pos, k_pos, cu_q, cu_k)`` of requests with ``ctxs[i]`` earlier tokens
    (their ring's kept ones, shuffled) and ``qlens[i]`` new ones, as DuoAttention's chunked prefill
    lays them out."""
    qs, ks, vs, qps, kps, cq, ck = [], [], [], [], [], [0], [0]
    for ctx, n in zip(ctxs, qlens):
        kept = torch.tensor(ring_kept(0, ctx, sink, recent), dtype=torch.long)
        kept = kept[torch.randperm(len(kept), generator=gen)]
        kp = torch.cat([kept, torch.arange(ctx, ctx + n)])
        qs.append(torch.randn(n, hkv * g, d, generator=gen))
        ks.append(torch.randn(len(kp), hkv, d, generator=gen))
        vs.append(torch.randn(len(kp), hkv, d, generator=gen))
        qps.append(torch.arange(ctx, ctx + n))
        kps.append(kp)
        cq.append(cq[-1] + n)
        ck.append(ck[-1] + len(kp))
    q, k, v = (torch.cat(x).to(dtype) for x in (qs, ks, vs))
    return q, k, v, torch.cat(qps), torch.cat(kps), torch.tensor(cq), torch.tensor(ck, dtype=torch.int32)


# (context before, new tokens) per request: odd lengths, a request shorter than sink + window, one
# longer, one starting at 0, one past a key tile (512)
REQUESTS = [(0, 37), (5, 3), (60, 101), (0, 11), (700, 9), (13, 2), (2, 613), (31, 1)]


@native
@pytest.mark.parametrize("batch", [1, 3, 8])
@pytest.mark.parametrize("g", [1, 2, 5, 8])
def test_native_varlen_equals_reference(batch, g, cpu_isa):
    sink, window = 4, 24
    gen = torch.Generator().manual_seed(17 * g + batch)
    ctxs, qlens = zip(*REQUESTS[8 - batch:])
    args = _packed(ctxs, qlens, 2, g, 64, torch.float32, sink, window - 1, gen)
    got = torch.ops.kvcomp_C.streaming_prefill(*args, sink, window, 0.125)
    want = varlen_streaming_attention(*args, sink, window, 0.125)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@native
@pytest.mark.parametrize("d", [32, 128])
def test_native_varlen_bf16(d, cpu_isa):
    gen = torch.Generator().manual_seed(d)
    args = _packed([3, 90, 0], [17, 33, 45], 3, 3, d, torch.bfloat16, 2, 15, gen)
    got = torch.ops.kvcomp_C.streaming_prefill(*args, 2, 16, d ** -0.5)
    want = varlen_streaming_attention(*args, 2, 16, d ** -0.5)
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=TOL[torch.bfloat16], atol=TOL[torch.bfloat16])


def test_reference_is_the_per_request_attention():
    gen = torch.Generator().manual_seed(3)
    q, k, v, qp, kp, cq, ck = _packed([9, 0], [5, 8], 2, 2, 16, torch.float32, 2, 5, gen)
    out = varlen_streaming_attention(q, k, v, qp, kp, cq, ck, 2, 6)
    for b in range(2):
        rq, rk = slice(cq[b], cq[b + 1]), slice(ck[b], ck[b + 1])
        want = streaming_attention(q[rq].transpose(0, 1)[None], k[rk].transpose(0, 1)[None],
                                   v[rk].transpose(0, 1)[None], sink=2, window=6, q_pos=qp[rq], k_pos=kp[rk])
        torch.testing.assert_close(out[rq], want[0].transpose(0, 1))


def _bad():
    gen = torch.Generator().manual_seed(4)
    a = list(_packed([10, 3], [4, 6], 2, 2, 16, torch.float32, 2, 5, gen)) + [2, 6, None]

    def put(i, val):
        b = list(a)
        b[i] = val
        return b

    return {
        "q 2-D": (put(0, a[0][0]), "q must have 3 dims"),
        "q int": (put(0, a[0].int()), "q must be a floating-point"),
        "v shape": (put(2, a[2][:-1]), "v shape"),
        "gqa": (put(0, a[0][:, :3]), "not a multiple of KV heads"),
        "q_pos float": (put(3, a[3].float()), "q_pos must be an integer"),
        "k_pos length": (put(4, a[4][:-1]), "k_pos"),
        "cu_q end": (put(5, torch.tensor([0, 4, 9])), "cu_q must run from 0"),
        "cu_k order": (put(6, torch.tensor([0, a[6][-1].item() + 1, a[6][-1].item()])), "cu_k must be non-decreasing"),
        "cu_k length": (put(6, a[6][:2]), "cu_q and cu_k must both be"),
        "window": (put(8, 0), "window must be an int >= 1"),
    }


@pytest.mark.parametrize("name", list(_bad()))
def test_reference_rejects_bad_input(name):
    args, msg = _bad()[name]
    with pytest.raises(ValueError, match=msg):
        varlen_streaming_attention(*args)


# ------------------------------------------------------------------ StreamingHeads.prefill, one call


SINK, RECENT, NSTR, G, D = 3, 9, 2, 3, 64
# (earlier tokens, this step's) per request; 1 = a decode row (not in the prefill); the multi-token
# requests 0, 2, 4 are not one contiguous range of rows
STEP = [(0, 7), (20, 1), (40, 13), (5, 1), (2, 5), (100, 4)]


@pytest.mark.parametrize("impl", [pytest.param("native", marks=native), "reference"])
def test_streaming_heads_prefill_is_one_call(impl, monkeypatch):
    monkeypatch.setenv("KVCOMP_OPS", impl)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    gen = torch.Generator().manual_seed(11)
    heads = StreamingHeads(SINK, RECENT, D ** -0.5)
    n_req, cap = len(STEP), SINK + RECENT
    ring_block = torch.tensor([4, 0, 5, 2, 1, 3])
    ring = torch.full((n_req, NSTR, cap, 2 * D), float("nan"))
    hist = [(torch.randn(c + n, NSTR, D, generator=gen), torch.randn(c + n, NSTR, D, generator=gen)) for c, n in STEP]
    for b, (c, _) in enumerate(STEP):  # the ring as the earlier steps left it
        for p in ring_kept(0, c, SINK, RECENT):
            ring[ring_block[b], :, ring_slot(p, SINK, RECENT)] = torch.cat([hist[b][0][p], hist[b][1][p]], -1)
    qsl = [0]
    for _, n in STEP:
        qsl.append(qsl[-1] + n)
    lens = [c + n for c, n in STEP]
    md = Step(n_req, qsl[-1], max(n for _, n in STEP), max(lens), torch.tensor(qsl, dtype=torch.int32),
              torch.tensor(lens, dtype=torch.int32), torch.zeros(n_req, 1, dtype=torch.int32),
              torch.zeros(qsl[-1], dtype=torch.long), qsl)
    q = torch.randn(qsl[-1], NSTR * G, D, generator=gen)
    k_new = torch.cat([k[c:] for (k, _), (c, _) in zip(hist, STEP)])
    v_new = torch.cat([v[c:] for (_, v), (c, _) in zip(hist, STEP)])
    out = torch.full_like(q, float("nan"))
    _, multi = md.rows()
    assert multi.reqs == [0, 2, 4, 5] and multi.span is None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        heads.prefill(Store(ring=ring, ring_block=ring_block), q, k_new, v_new, md, multi.reqs, out)
    calls = {e.key: e.count for e in prof.key_averages()}.get("kvcomp_C::streaming_prefill", 0)
    assert calls == (1 if impl == "native" else 0)
    for b, (c, n) in enumerate(STEP):
        rows = slice(qsl[b], qsl[b + 1])
        if n == 1:
            assert out[rows].isnan().all()  # decode rows are not the prefill's
            continue
        k, v = hist[b]
        want = streaming_attention(q[rows].transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                   sink=SINK, window=RECENT, scale=D ** -0.5)[0].transpose(0, 1)
        torch.testing.assert_close(out[rows], want, rtol=1e-5, atol=1e-5)
        for p in ring_kept(0, c + n, SINK, RECENT):  # the ring holds the step's kept tokens after it
            torch.testing.assert_close(ring[ring_block[b], :, ring_slot(p, SINK, RECENT)], torch.cat([k[p], v[p]], -1))
