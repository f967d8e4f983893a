"""Native sink + window prefill of DuoAttention's streaming heads (torch.ops.kvcomp_C.streaming_prefill)
against kvcomp.ref.streaming_attention, request by request; the ops entry and the transformers path
run it on CPU."""

from __future__ import annotations

import pytest
import torch

from kvcomp._ext import has_ext
from kvcomp.ops.prefill import streaming_prefill
from kvcomp.ref.streaming import streaming_attention

pytestmark = pytest.mark.skipif(not has_ext(), reason="native extension not built (KVCOMP_BUILD_EXT=1, see setup.py)")

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def _request(tq, tk, hkv, g, d, dtype, gen, ring=None):
    """One request's ``(q [tq, Hq, D], k, v [tk, Hkv, D], q_pos, k_pos)``: bottom-right positions, or
    with ``ring=(sink, recent)`` the kept tokens of the context before the queries, in shuffled
    order, followed by the queries' own tokens (DuoAttention's chunked prefill over a ring)."""
    q = torch.randn(tq, hkv * g, d, generator=gen).to(dtype)
    if ring is None:
        k_pos = torch.arange(tk)
    else:
        sink, recent = ring
        ctx = tk - tq  # tokens before the queries; the ring keeps the sinks and the last `recent`
        kept = sorted(set(range(min(sink, ctx))) | set(range(max(0, ctx - recent), ctx)))
        kept = torch.tensor(kept, dtype=torch.long)[torch.randperm(len(kept), generator=gen)]
        k_pos = torch.cat([kept, torch.arange(ctx, tk)])
    k = torch.randn(len(k_pos), hkv, d, generator=gen).to(dtype)
    v = torch.randn(len(k_pos), hkv, d, generator=gen).to(dtype)
    return q, k, v, k_pos[-tq:] if ring else torch.arange(tk - tq, tk), k_pos


def _check(reqs, sink, window, dtype, scale=0.125):
    q, k, v, qp, kp = (torch.cat(x) for x in zip(*reqs))
    cu_q = torch.tensor([0, *torch.tensor([len(r[0]) for r in reqs]).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor([len(r[1]) for r in reqs]).cumsum(0).tolist()], dtype=torch.int32)
    out = torch.ops.kvcomp_C.streaming_prefill(q, k, v, qp.to(torch.int32), kp, cu_q, cu_k, sink, window, scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    for b, (rq, rk, rv, rqp, rkp) in enumerate(reqs):
        ref = streaming_attention(rq.transpose(0, 1)[None], rk.transpose(0, 1)[None], rv.transpose(0, 1)[None],
                                  sink=sink, window=window, scale=scale, q_pos=rqp, k_pos=rkp)[0].transpose(0, 1)
        got = out[cu_q[b]:cu_q[b + 1]]
        torch.testing.assert_close(got.float(), ref.float(), rtol=TOL[dtype], atol=TOL[dtype])


CASES = [  # (per request (tq, tk, ring?), Hkv, G, D, sink, window, dtype)
    ([(1, 1, False)], 1, 1, 64, 4, 8, torch.float32),
    ([(333, 333, False)], 2, 4, 64, 4, 16, torch.float32),
    ([(601, 601, False)], 1, 3, 128, 64, 256, torch.float32),
    ([(97, 97, False), (300, 513, True), (5, 40, True)], 3, 3, 64, 4, 64, torch.float32),
    ([(129, 129, False), (64, 1000, True), (1, 77, True), (250, 251, False)], 2, 8, 32, 16, 100, torch.float32),
    ([(400, 400, False), (33, 300, True)], 2, 4, 128, 64, 256, torch.bfloat16),
    ([(77, 77, False), (260, 700, True)], 1, 8, 64, 3, 31, torch.bfloat16),
    # edge cases: no sinks, a window of just the query's token, both, sinks wider than the prompt
    ([(300, 300, False), (20, 90, True)], 2, 3, 64, 0, 200, torch.float32),
    ([(300, 300, False), (20, 90, True)], 2, 3, 64, 5, 1, torch.float32),
    ([(257, 257, False)], 1, 4, 16, 0, 1, torch.float32),
    ([(50, 50, False), (30, 60, True)], 1, 1, 256, 64, 8, torch.float32),
    # sink and window runs longer than a key tile (512), query tiles (256 rows / G) not dividing
    ([(700, 1300, True)], 1, 2, 64, 520, 600, torch.float32),
    ([(900, 900, False)], 1, 1, 32, 0, 700, torch.float32),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"B{len(c[0])}-kv{c[1]}-G{c[2]}-D{c[3]}-s{c[4]}-w{c[5]}-"
                         f"{str(c[6])[6:]}")
def test_native_streaming_matches_reference(case, cpu_isa):
    shapes, hkv, g, d, sink, window, dtype = case
    gen = torch.Generator().manual_seed(len(shapes) * 100 + g)
    reqs = [_request(tq, tk, hkv, g, d, dtype, gen, ring=(sink, window - 1) if ring else None)
            for tq, tk, ring in shapes]
    _check(reqs, sink, window, dtype)


@pytest.mark.parametrize("g", [1, 3, 4, 8])
@pytest.mark.parametrize("batch", [1, 2, 4])
def test_native_streaming_gqa_batch(g, batch):
    """GQA 1/3/4/8 x batch 1-4, odd varlen lengths, ring-ordered and bottom-right requests."""
    gen = torch.Generator().manual_seed(10 * g + batch)
    shapes = [(211, 211, False), (45, 390, True), (130, 131, False), (3, 67, True)][:batch]
    reqs = [_request(tq, tk, 2, g, 64, torch.float32, gen, ring=(4, 47) if ring else None) for tq, tk, ring in shapes]
    _check(reqs, 4, 48, torch.float32)


def test_ops_entry_runs_native(monkeypatch):
    """``ops.prefill.streaming_prefill`` ([B, H, T, D], B > 1, strided views) dispatches to the native op."""
    monkeypatch.setenv("KVCOMP_OPS", "native")
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(2, 150, 6, 64, generator=gen).transpose(1, 2)  # [B, Hq, Tq, D], not contiguous
    k, v = torch.randn(2, 2, 2, 200, 64, generator=gen).unbind(0)
    ref = streaming_attention(q, k, v, sink=4, window=32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = streaming_prefill(q, k, v, sink=4, window=32)
    assert "kvcomp_C::streaming_prefill" in {e.key for e in prof.key_averages()}
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def _duo_generate(model, cfg):
    from kvcomp.hf import compress, restore

    ids = torch.randint(0, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    cache = compress(model, cfg)
    try:
        with torch.inference_mode():
            return model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=3,
                                  do_sample=False, pad_token_id=0)
    finally:
        restore(model)


def test_transformers_duo_prefill_runs_native(monkeypatch):
    """A DuoAttention layer's streaming heads prefill through the native op in the transformers path
    (default CPU dispatch), one call per layer for the batch's two prompts, with the same tokens as
    the reference route."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvcomp.config import CompressionConfig, DuoAttention

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("KVCOMP_OPS", raising=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=192, num_hidden_layers=2,
                                         num_attention_heads=6, num_key_value_heads=2, head_dim=16,
                                         max_position_embeddings=1024)).eval()
    cfg = CompressionConfig.for_model(model, duo=DuoAttention(pattern=torch.tensor([[True, False]] * 2), sink=2,
                                                              recent=8))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        native = _duo_generate(model, cfg)
    # the prompts of both requests in one call per layer (2 layers), decode steps through the decode op
    assert {e.key: e.count for e in prof.key_averages()}.get("kvcomp_C::streaming_prefill") == 2
    monkeypatch.setenv("KVCOMP_OPS", "reference")
    assert torch.equal(native, _duo_generate(model, cfg))


def _bad_cases():
    gen = torch.Generator().manual_seed(2)
    q, k, v, qp, kp = _request(40, 60, 2, 2, 64, torch.float32, gen)
    cu_q, cu_k = torch.tensor([0, 40]), torch.tensor([0, 60])
    a = [q, k, v, qp, kp, cu_q, cu_k, 4, 8, 0.125]

    def put(i, val):
        b = list(a)
        b[i] = val
        return b

    return {
        "q 2-D": (put(0, q[0]), "q must be"),
        "q int": (put(0, q.to(torch.int32)), "q must be float32"),
        "q strided last dim": (put(0, torch.randn(40, 4, 128)[..., ::2]), "q must be contiguous"),
        "v dtype": (put(2, v.double()), "v must be float32"),
        "v bf16": (put(2, v.bfloat16()), "v dtype"),
        "v shape": (put(2, v[:50]), "v shape"),
        "k head dim": ([q, k[..., :32], v[..., :32], *a[3:]], "k head dim 32 must equal q's 64"),
        "head dim 72": ([torch.randn(40, 4, 72), torch.randn(60, 2, 72), torch.randn(60, 2, 72), *a[3:]],
                        "head dim 72 is not supported"),
        "gqa": (put(0, q[:, :3]), "multiple of the KV heads"),
        "q_pos float": (put(3, qp.float()), "q_pos must be int32 or int64"),
        "q_pos length": (put(3, qp[:-1]), "q_pos must be"),
        "k_pos 2-D": (put(4, kp[None]), "k_pos must be"),
        "cu_q end": (put(5, torch.tensor([0, 39])), "cu_q must run from 0"),
        "cu_k length": (put(6, torch.tensor([0, 30, 60])), "cu_q and cu_k must both be"),
        "cu_k order": ([*a[:5], torch.tensor([0, 20, 40]), torch.tensor([0, 61, 60]), *a[7:]], "non-decreasing"),
        "sink": (put(7, -1), "sink must be >= 0"),
        "window": (put(8, 0), "window must be >= 1"),
        "scale": (put(9, float("nan")), "scale must be finite"),
    }


@pytest.mark.parametrize("name", list(_bad_cases()))
def test_native_streaming_rejects_bad_input(name):
    args, msg = _bad_cases()[name]
    with pytest.raises(ValueError, match=msg):
        torch.ops.kvcomp_C.streaming_prefill(*args)
