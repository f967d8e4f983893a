"""kvcomp's vLLM Impl outside an engine: page writes by slot mapping and paged attention.

Runs only in an interpreter that imports vLLM (e.g. ``<vllm venv>/bin/pytest tests/vllm_plugin``); the
engine tests cover the same code end to end from any interpreter.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

_spec = importlib.util.find_spec("vllm")
pytestmark = pytest.mark.skipif(
    _spec is None or _spec.origin is None, reason="vllm is not importable in this interpreter")

HQ, HKV, D, BS, NB = 4, 2, 64, 16, 12


def _impl(plan=None):
    from kvcomp.vllm_plugin.backend import KVCompAttentionImpl

    impl = KVCompAttentionImpl(HQ, D, D ** -0.5, HKV)
    if plan is not None:
        impl.plan = plan
    return impl


def _batch(seed=0):
    """Two sequences: b0 continues a prefill (ctx 20, 7 new), b1 decodes (ctx 33, 1 new)."""
    g = torch.Generator().manual_seed(seed)
    ctx, new = [20, 33], [7, 1]
    block_table = torch.tensor([[5, 2, 9, 0], [1, 7, 3, 11]], dtype=torch.int32)
    seq_lens = torch.tensor([c + n for c, n in zip(ctx, new)], dtype=torch.int32)
    qsl = torch.tensor([0, 7, 8], dtype=torch.int32)
    slots = []
    for b in range(2):
        for p in range(ctx[b], ctx[b] + new[b]):
            slots.append(int(block_table[b, p // BS]) * BS + p % BS)
    T = sum(new) + 3  # 3 padding rows past num_actual_tokens
    q = torch.randn(T, HQ, D, generator=g)
    k = torch.randn(T, HKV, D, generator=g)
    v = torch.randn(T, HKV, D, generator=g)
    return SimpleNamespace(ctx=ctx, new=new, block_table=block_table, seq_lens=seq_lens, qsl=qsl,
                           slots=torch.tensor(slots + [-1], dtype=torch.int64), q=q, k=k, v=v, g=g)


def _meta(bt):
    from kvcomp.vllm_plugin.backend import KVCompAttentionMetadata

    n = int(bt.qsl[-1])
    return KVCompAttentionMetadata(num_reqs=2, num_actual_tokens=n, max_query_len=7, max_seq_len=int(bt.seq_lens.max()),
                                   query_start_loc=bt.qsl, seq_lens=bt.seq_lens, block_table=bt.block_table,
                                   slot_mapping=bt.slots[:n])


def _prefill_context(kv_cache, bt, dk):
    """Random keys/values for the context tokens, written straight into the pages."""
    for b in range(2):
        for p in range(bt.ctx[b]):
            blk, off = int(bt.block_table[b, p // BS]), p % BS
            kv_cache[blk, :, off] = torch.randn(HKV, dk + D, generator=bt.g)


def test_write_then_attend_matches_reference():
    from kvcomp.ref import paged_attention

    bt = _batch()
    impl = _impl()
    kv_cache = torch.zeros(NB, HKV, BS, 2 * D)
    _prefill_context(kv_cache, bt, D)
    untouched = kv_cache.clone()
    layer = SimpleNamespace(layer_name="model.layers.0.self_attn.attn")
    impl.do_kv_cache_update(layer, bt.k, bt.v, kv_cache, bt.slots)  # includes a -1 slot: skipped
    n = int(bt.qsl[-1])
    written = torch.zeros(NB * BS, dtype=torch.bool)
    written[bt.slots[:n]] = True
    written = written.view(NB, BS)
    for s, t in zip(bt.slots[:n].tolist(), range(n)):
        assert torch.equal(kv_cache[s // BS, :, s % BS, :D], bt.k[t])
        assert torch.equal(kv_cache[s // BS, :, s % BS, D:], bt.v[t])
    assert torch.equal(kv_cache.permute(0, 2, 1, 3)[~written], untouched.permute(0, 2, 1, 3)[~written])

    out = torch.full((bt.q.shape[0], HQ, D), 7.0)
    impl.forward(layer, bt.q, bt.k, bt.v, kv_cache, _meta(bt), out)
    kc = kv_cache[..., :D].permute(0, 2, 1, 3)
    vc = kv_cache[..., D:].permute(0, 2, 1, 3)
    ref = paged_attention(bt.q[:n], kc, vc, bt.block_table, bt.seq_lens, bt.qsl, scale=D ** -0.5)
    from kvcomp.testing import assert_close

    assert_close("kvcomp vllm forward", ref, out[:n], 1e-6)
    assert bool((out[n:] == 7.0).all()), "padding rows must stay untouched"
    assert impl.forward(layer, bt.q, bt.k, bt.v, kv_cache, None, out) is out  # profiling run


def test_think_pages_and_attention():
    from kvcomp.testing import assert_close
    from kvcomp.vllm_plugin.plan import Plan

    keep = 40
    g = torch.Generator().manual_seed(3)
    ch = torch.stack([torch.stack([torch.randperm(D, generator=g)[:keep].sort().values for _ in range(HKV)])
                      for _ in range(2)])
    plan = Plan(num_layers=2, num_kv_heads=HKV, head_dim=D, think_channels=ch, source="test")
    bt = _batch(seed=1)
    impl = _impl(plan)
    layer = SimpleNamespace(layer_name="model.layers.1.self_attn.attn")
    kv_cache = torch.zeros(NB, HKV, BS, keep + D)
    _prefill_context(kv_cache, bt, keep)
    impl.do_kv_cache_update(layer, bt.k, bt.v, kv_cache, bt.slots)
    n = int(bt.qsl[-1])
    for t, s in enumerate(bt.slots[:n].tolist()):
        for h in range(HKV):
            assert torch.equal(kv_cache[s // BS, h, s % BS, :keep], bt.k[t, h, ch[1, h]])
    out = torch.empty(bt.q.shape[0], HQ, D)
    impl.forward(layer, bt.q, bt.k, bt.v, kv_cache, _meta(bt), out)
    # reference (fp64 loops): keys already in the pages (earlier steps) score with the kept channels
    # only; this step's own keys score at full width (kvcomp's HF ThinK path with window 0)
    mask = torch.zeros(HKV, D, dtype=torch.float64)
    mask.scatter_(1, ch[1], 1.0)
    qsl, lens, gq = bt.qsl.tolist(), bt.seq_lens.tolist(), HQ // HKV
    kpages = torch.zeros(NB, BS, HKV, D, dtype=torch.float64)
    kpages.scatter_(3, ch[1].view(1, 1, HKV, keep).expand(NB, BS, HKV, keep),
                    kv_cache[..., :keep].permute(0, 2, 1, 3).double())
    vpages = kv_cache[..., keep:].permute(0, 2, 1, 3).double()
    ref = torch.zeros(n, HQ, D, dtype=torch.float64)
    for b, seq_len in enumerate(lens):
        s0, e0 = qsl[b], qsl[b + 1]
        ctx = seq_len - (e0 - s0)
        blocks = [int(x) for x in bt.block_table[b]]
        kk = torch.stack([kpages[blocks[p // BS], p % BS] for p in range(seq_len)])  # [T, Hkv, D]
        vv = torch.stack([vpages[blocks[p // BS], p % BS] for p in range(seq_len)])
        kk[ctx:] = bt.k[s0:e0].double()
        for i in range(e0 - s0):
            p = ctx + i
            for h in range(HQ):
                qh = bt.q[s0 + i, h].double()
                logits = torch.stack([((qh * mask[h // gq]) if j < ctx else qh) @ kk[j, h // gq]
                                      for j in range(p + 1)]) * D ** -0.5
                ref[s0 + i, h] = torch.softmax(logits, 0) @ vv[: p + 1, h // gq]
    assert_close("kvcomp vllm ThinK forward", ref.float(), out[:n], 1e-5)


def test_unsupported_features_refused():
    from kvcomp.vllm_plugin.backend import KVCompAttentionImpl

    with pytest.raises(ValueError, match="logits soft cap 30"):  # a sliding window is served (test_plugin_gemma3)
        KVCompAttentionImpl(HQ, D, 0.1, HKV, logits_soft_cap=30.0)
    with pytest.raises(ValueError, match="kv_cache_dtype fp8_e5m2"):
        KVCompAttentionImpl(HQ, D, 0.1, HKV, kv_cache_dtype="fp8_e5m2")


@pytest.mark.parametrize("interpret", ["0", "1"], ids=["ops-ref", "triton-interp"])
def test_vq_code_pages_and_mirror_match_references(interpret, monkeypatch):
    """A²ATS pieces outside an engine: codes land in their permuted pages exactly as
    ``kvcomp.ref.vq_encode_paged`` puts them, the mirror holds the raw K/V at vLLM's slots, and a
    decode row attends over the reference top-K selection gathered from the mirror; through the
    ops' references and through the Triton kernels (interpreter)."""
    from kvcomp.config import VQRetrieval
    from kvcomp.ref import (paged_sparse_attention, paged_vq_topk, rope_cos_sin, unapply_rope, vq_encode_paged, vq_lut,
                            windowed_rope_query)
    from kvcomp.testing import assert_close
    from kvcomp.methods.a2ats import A2ATS
    from kvcomp.methods.layout import Store, code_view
    from kvcomp.vllm_plugin.mirror import HostMirror

    monkeypatch.setenv("TRITON_INTERPRET", interpret)  # the ops' Triton kernels on CPU tensors, or refs

    bt = _batch(seed=4)
    g = torch.Generator().manual_seed(5)
    vq = VQRetrieval(codebook=torch.randn(1, HKV, 16, D, generator=g),
                     whiten=torch.linalg.cholesky(torch.eye(D) * 2).expand(1, HKV, D, D).contiguous(),
                     topk=5, sink=2, local=3, rel_pos=64)
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2).float() / D))
    mirror = HostMirror("l0", NB, BS, HKV, D, D, torch.float32, pin=False)
    mirror.kv.normal_(generator=g)  # context tokens already mirrored
    layer = A2ATS(vq, 0, list(range(HKV)), inv, 1.0, D ** -0.5, torch.device("cpu"))
    kv_cache = torch.zeros(NB, HKV, BS, 1)
    store = Store(codes=code_view(kv_cache), mirror=(mirror.k, mirror.v))
    md = _meta(bt)
    n = md.num_actual_tokens
    layer.write(store, bt.slots[:n], bt.k[:n], bt.v[:n])
    for t, s in enumerate(bt.slots[:n].tolist()):
        assert torch.equal(mirror.k[s // BS, s % BS], bt.k[t]) and torch.equal(mirror.v[s // BS, s % BS], bt.v[t])
    pos = md.positions()
    assert pos.tolist() == list(range(20, 27)) + [33]
    layer.write_codes(store, bt.k[:n], md)
    cos, sin = rope_cos_sin(pos, inv)
    want = vq_encode_paged(unapply_rope(bt.k[:n], cos[:, None], sin[:, None]), vq.codebook[0], vq.whiten[0],
                           torch.zeros(NB, BS, HKV, dtype=torch.int16), bt.block_table, bt.seq_lens, bt.qsl)
    got = code_view(kv_cache)
    written = torch.zeros(NB, BS, dtype=torch.bool)
    written.view(-1)[bt.slots[:n]] = True
    assert torch.equal(got[written], want[written]) and not bool(got[~written].any())
    # context codes, then one decode row (sequence 1) against the reference selection
    code_view(kv_cache)[~written] = torch.randint(0, 16, (int((~written).sum()), HKV), generator=g, dtype=torch.int16)
    out = torch.zeros(bt.q.shape[0], HQ, D)
    single, multi = md.rows()
    assert single.reqs == [1] and multi.reqs == [0]
    layer.attend(store, bt.q[:n], bt.k[:n], None, md, out)
    q1 = bt.q[7:8]
    c1, s1 = rope_cos_sin(torch.tensor([33]), inv)
    qw = windowed_rope_query(unapply_rope(q1, c1[:, None], s1[:, None]), inv, 64)
    idx, cnt = paged_vq_topk(vq_lut(qw, vq.codebook[0], scale=D ** -0.5), code_view(kv_cache), bt.block_table[1:],
                             bt.seq_lens[1:], topk=5, sink=2, local=3)
    assert int(cnt.max()) < 34  # a real selection, not every token
    ref = paged_sparse_attention(q1, mirror.k, mirror.v, bt.block_table[1:], idx, cnt, scale=D ** -0.5)
    assert_close("kvcomp vllm A2ATS decode", ref, out[7:8], 1e-6)


def test_ring_capacity_is_a_whole_number_of_pages():
    from kvcomp.methods.layout import ring_capacity

    # SmolLM2, 1 of 3 KV heads streaming, sink 64 + recent 256, CPU blocks of 128: a page holds
    # 2 heads x 128 tokens, so the ring takes 512 slots (2 pages) instead of 320 (2.5 pages)
    assert ring_capacity(320, 1, 2, 128) == 512
    assert ring_capacity(64, 1, 1, 128) == 128
    for tokens, rh, ph, bs in [(320, 2, 1, 16), (100, 3, 5, 16), (7, 4, 6, 32)]:
        cap = ring_capacity(tokens, rh, ph, bs)
        assert cap >= tokens and (cap * rh) % (ph * bs) == 0 and cap - tokens < ph * bs
    assert ring_capacity(320, 1, 2, None) == 320
