"""Decode rows through kvcomp's ops (Triton kernels under the interpreter, or the ops' references)
give what the per-request paths give, in a batch that mixes decodes and a chunked prefill.

Each method's Impl runs one forward twice on copies of the same cache and rings: once as vLLM
calls it (one-token requests through the method's decode), once with every request on
the per-request path (the path the engine tests compare with kvcomp's HF path). Outputs and the
rings left behind must agree.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

_spec = importlib.util.find_spec("vllm")
pytestmark = pytest.mark.skipif(
    _spec is None or _spec.origin is None, reason="vllm is not importable in this interpreter")

HQ, HKV, D, BS, NB = 6, 3, 32, 16, 24
LAYER = SimpleNamespace(layer_name="model.layers.0.self_attn.attn")


#: the batches of :func:`_batch`: decodes and a chunk (decodes not all first); decodes only (the
#: decode rows are every packed row: no slice, no copy of q, k, v); decodes only with padded rows
#: past ``num_actual_tokens`` (as vLLM may hand them)
BATCHES = ["mixed", "decodes", "decodes-padded"]


def _batch(seed: int, kind: str = "mixed"):
    """Four requests (``kind`` ``mixed``): decode (ctx 40), chunk (ctx 20 + 7), decode (ctx 2), decode
    (ctx 70); or (``decodes``) the three decodes alone, with two padding rows in q, k, v
    (``decodes-padded``)."""
    from kvcomp.vllm_plugin.backend import KVCompAttentionMetadata

    g = torch.Generator().manual_seed(seed)
    ctx, new = ([40, 20, 2, 70], [1, 7, 1, 1]) if kind == "mixed" else ([40, 2, 70], [1, 1, 1])
    r = len(ctx)
    bt = torch.randperm(NB, generator=g)[:5 * r].view(r, 5).to(torch.int32)
    lens = torch.tensor([c + n for c, n in zip(ctx, new)], dtype=torch.int32)
    qsl = torch.tensor([0, *new], dtype=torch.int32).cumsum(0, dtype=torch.int32)
    slots = [int(bt[b, p // BS]) * BS + p % BS for b in range(r) for p in range(ctx[b], ctx[b] + new[b])]
    n = int(qsl[-1])
    md = KVCompAttentionMetadata(num_reqs=r, num_actual_tokens=n, max_query_len=max(new), max_seq_len=int(lens.max()),
                                 query_start_loc=qsl, seq_lens=lens, block_table=bt,
                                 slot_mapping=torch.tensor(slots, dtype=torch.int64))
    rows = n + 2 if kind == "decodes-padded" else n
    q, k, v = (torch.randn(rows, h, D, generator=g) for h in (HQ, HKV, HKV))
    return md, q, k, v, g


def _impl(plan):
    from kvcomp.vllm_plugin.backend import KVCompAttentionImpl

    impl = KVCompAttentionImpl(HQ, D, D ** -0.5, HKV)
    impl.plan = plan
    return impl


def _run_both(impl, method, md, q, k, v, kv_cache, ring, ring_block, monkeypatch):
    """(outputs, caches, rings) of the split forward and of the all-per-request path."""
    from kvcomp.vllm_plugin import backend

    results = []
    for route in ("split", "loop"):
        kc = kv_cache.clone()
        rg = None if ring is None else ring.clone()
        monkeypatch.setattr(backend, "ring_of", lambda name, rg=rg: (rg, ring_block))
        impl.do_kv_cache_update(LAYER, k, v, kc, md.slot_mapping)
        out = torch.full((q.shape[0], HQ, D), float("nan"))
        impl.forward(LAYER, q, k, v, kc, md if route == "split" else md.all_multi(), out)
        results.append((out, kc, rg))
    return results


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("interpret", ["0", "1"], ids=["ops-ref", "triton-interp"])
def test_dense_decode_rows(interpret, batch, monkeypatch):
    from kvcomp.ref import paged_attention
    from kvcomp.testing import assert_close
    from kvcomp.vllm_plugin.plan import Plan

    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    md, q, k, v, g = _batch(0, batch)
    impl = _impl(Plan())
    kv_cache = torch.randn(NB, HKV, BS, 2 * D, generator=g)
    n = md.num_actual_tokens
    for step in range(2):  # the second step reuses what the layer kept (its page views, the decode op's rings)
        impl.do_kv_cache_update(LAYER, k, v, kv_cache, md.slot_mapping)
        out = torch.full((q.shape[0], HQ, D), float("nan"))
        impl.forward(LAYER, q, k, v, kv_cache, md, out)
        kv = kv_cache.permute(0, 2, 1, 3)
        ref = paged_attention(q[:n], kv[..., :D], kv[..., D:], md.block_table, md.seq_lens, md.query_start_loc,
                              scale=D ** -0.5)
        assert_close(f"dense decode rows, step {step}", ref, out[:n], 1e-5)
        assert out[n:].isnan().all(), "padding rows of the output are not the layer's"
        q = q * 0.5


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("window", [0, 5], ids=["w0", "w5"])
@pytest.mark.parametrize("interpret", ["0", "1"], ids=["ops-ref", "triton-interp"])
def test_think_decode_rows(window, interpret, batch, monkeypatch):
    from kvcomp.testing import assert_close
    from kvcomp.vllm_plugin.plan import Plan

    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    md, q, k, v, g = _batch(1, batch)
    keep = 20
    ch = torch.stack([torch.randperm(D, generator=g)[:keep].sort().values for _ in range(HKV)])[None]
    impl = _impl(Plan(num_layers=1, num_kv_heads=HKV, head_dim=D, think_channels=ch, think_window=window,
                      source="test"))
    impl.ring_name = "ring" if window else None
    kv_cache = torch.randn(NB, HKV, BS, keep + D, generator=g)
    # rings of 4 requests in a pool of 6, one slot more than the window (vLLM may enlarge them)
    ring = torch.randn(6, HKV, window + 1, D, generator=g) if window else None
    ring_block = torch.tensor([4, 0, 5, 2][: md.num_reqs], dtype=torch.int32)
    (o1, c1, r1), (o2, c2, r2) = _run_both(impl, "think", md, q, k, v, kv_cache, ring, ring_block, monkeypatch)
    n = md.num_actual_tokens
    assert_close("ThinK decode rows vs per-request path", o2[:n], o1[:n], 1e-5)
    assert o1[n:].isnan().all() and o2[n:].isnan().all(), "padding rows of the output are not the layer's"
    assert torch.equal(c1, c2)
    if window:
        assert torch.equal(r1, r2), "the ring must hold the same keys after either path"


@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("interpret", ["0", "1"], ids=["ops-ref", "triton-interp"])
def test_duo_decode_rows(interpret, batch, monkeypatch):
    from kvcomp.testing import assert_close
    from kvcomp.vllm_plugin.plan import Plan

    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    md, q, k, v, g = _batch(2, batch)
    sink, recent = 4, 8
    impl = _impl(Plan(num_layers=1, num_kv_heads=HKV, head_dim=D, streaming=torch.tensor([[False, True, False]]),
                      sink=sink, recent=recent, source="test"))
    impl.ring_name = "ring"
    kv_cache = torch.randn(NB, 2, BS, 2 * D, generator=g)  # the two retrieval heads
    ring = torch.randn(6, 1, sink + recent + 4, 2 * D, generator=g)  # capacity rounded up past sink + recent
    ring_block = torch.tensor([1, 3, 0, 5][: md.num_reqs], dtype=torch.int32)
    (o1, c1, r1), (o2, c2, r2) = _run_both(impl, "duo", md, q, k, v, kv_cache, ring, ring_block, monkeypatch)
    n = md.num_actual_tokens
    assert_close("DuoAttention decode rows vs per-request path", o2[:n], o1[:n], 1e-5)
    assert o1[n:].isnan().all() and o2[n:].isnan().all(), "padding rows of the output are not the layer's"
    assert torch.equal(c1, c2)
    used = r1[:, :, : sink + recent]
    assert torch.equal(used, r2[:, :, : sink + recent]), "the ring must hold the same tokens after either path"


def test_streaming_selection_matches_streaming_positions():
    from kvcomp.ref.duo import streaming_positions
    from kvcomp.methods.duo import streaming_selection

    lens = torch.tensor([1, 3, 4, 5, 11, 12, 13, 40], dtype=torch.int32)
    idx, count = streaming_selection(lens, 2, 4, 8)
    assert idx.shape == (8, 2, 12) and count.shape == (8, 2)
    for b, n in enumerate(lens.tolist()):
        _, pos = streaming_positions(n, 4, 8)
        assert count[b, 0] == count[b, 1] == len(pos)
        assert idx[b, 1, : len(pos)].tolist() == sorted(pos)
        assert set(idx[b, 0].tolist()) <= set(pos)


@pytest.mark.parametrize("layout", ["contiguous", "ring-page-view", "slot-major", "slot-major-one-head"])
def test_full_width_tail_layout(layout):
    """Slot s of the tail holds position p with p % (w + 1) == s among the last w + 1 tokens: the
    ring's w keys (slot p % w) and this step's key; read from a contiguous ring and from a view like
    vLLM's shared ring (other heads first, wider slots, more slots than the window), and slot-major
    pages whose head stride is below the slot stride (vLLM's ring page: every head's key and value in a slot)."""
    from kvcomp.methods.think import full_width_tail

    w, hkv = 3, 1 if layout == "slot-major-one-head" else 2
    if layout == "contiguous":
        ring = torch.zeros(4, hkv, w, 1)
    elif layout.startswith("slot-major"):  # vLLM's ring page [blocks, slots, H, key | value], heads inside a slot
        ring = torch.full((4, w + 2, hkv, 2), -1.0).permute(0, 2, 1, 3)[..., :1]
    else:
        ring = torch.full((4, hkv + 1, w + 2, 3), -1.0)[:, 1:, :, 1:2]
    lens = torch.tensor([9, 2], dtype=torch.int32)
    for blk, n in zip([2, 0], lens.tolist()):
        for p in range(max(0, n - 1 - w), n - 1):
            ring[blk, :, p % w] = p
    k_new = (lens.float() - 1)[:, None, None].expand(2, hkv, 1)
    tail = full_width_tail(k_new, ring, torch.tensor([2, 0]), lens, w)
    assert tail.shape == (2, hkv, w + 1, 1)
    for b, n in enumerate(lens.tolist()):
        for p in range(max(0, n - 1 - w), n):
            assert float(tail[b, 0, p % (w + 1), 0]) == p


def test_full_width_tail_refuses_rings_without_rows():
    from kvcomp.methods.think import full_width_tail

    ring = torch.zeros(4, 2, 6, 2)[..., ::2]  # strided last dim
    with pytest.raises(ValueError, match="contiguous last dim"):
        full_width_tail(torch.zeros(1, 2, 1), ring, torch.tensor([0]), torch.tensor([5]), 3)


@pytest.mark.parametrize("heads", [[1], [0, 2], [0, 1, 2], [1, 2], [0, 1, 3], [2, 0], [1, 1]])
def test_head_picker_equals_index_select(heads):
    from kvcomp.methods.duo import head_picker

    x = torch.randn(5, 4, 8)
    got = head_picker(heads)(x)
    assert torch.equal(got, x.index_select(1, torch.tensor(heads)))
    evenly = len(heads) == 1 or (len({b - a for a, b in zip(heads, heads[1:])}) == 1 and heads[1] > heads[0])
    assert got._is_view() == evenly, "evenly spaced heads are a view of x (no copy), others a copy"


def test_decode_only_rows_are_the_step_tensors():
    from kvcomp.methods.step import split_rows

    bt, lens = torch.zeros(3, 2, dtype=torch.int32), torch.tensor([5, 9, 2], dtype=torch.int32)
    single, multi = split_rows(3, [0, 1, 2, 3], bt, lens, torch.device("cpu"))
    assert multi is None and single.whole and single.span == (0, 3) and single.reqs == [0, 1, 2]
    assert torch.equal(single.rows, torch.arange(3)) and torch.equal(single.req_index, torch.arange(3))
    assert torch.equal(single.query_start_loc, torch.arange(4, dtype=torch.int32))
    q = torch.randn(3, 2)
    assert single.take(q) is q and single.take(torch.randn(4, 2)).shape[0] == 3  # padded rows: a slice
    out = torch.zeros(4, 2)
    single.put(out, q)
    assert torch.equal(out[:3], q) and not out[3].any()
    single, multi = split_rows(3, [0, 1, 4, 5], bt, lens, torch.device("cpu"))
    assert not single.whole and single.reqs == [0, 2] and multi.reqs == [1] and not multi.whole
