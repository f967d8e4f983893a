"""kvcomp's vLLM Impl reads nothing back to the host per layer in a decode step (issue 10):
``do_kv_cache_update`` + ``forward`` of a step's second layer run with every host read of a tensor
(``.item()``, ``.tolist()``, ``int``, ``bool``, ``float``, tensor-as-index) raising. The step's metadata
and its per-step values (request split, ring indices) come from the builder / the first layer, as in
vLLM. The slot mapping carries vLLM's padding rows (-1), which the page writes skip themselves.
CPU product route (native kernels): on CUDA each such read would be a device sync per layer.
"""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace

import pytest
import torch

_spec = importlib.util.find_spec("vllm")
pytestmark = pytest.mark.skipif(
    _spec is None or _spec.origin is None, reason="vllm is not importable in this interpreter")

HQ, HKV, D, BS, NB, KEEP, WINDOW = 6, 3, 32, 16, 24, 16, 4
READS = ("item", "tolist", "__int__", "__bool__", "__float__", "__index__")
CTX = [40, 2, 70]  # three decodes


class HostRead(AssertionError):
    pass


def _step(g):
    from kvcomp.vllm_plugin.backend import KVCompAttentionMetadata

    bt = torch.randperm(NB, generator=g)[:15].view(3, 5).to(torch.int32)
    lens = torch.tensor([c + 1 for c in CTX], dtype=torch.int32)
    slots = [int(bt[b, c // BS]) * BS + c % BS for b, c in enumerate(CTX)]
    md = KVCompAttentionMetadata(num_reqs=3, num_actual_tokens=3, max_query_len=1, max_seq_len=int(lens.max()),
                                 query_start_loc=torch.arange(4, dtype=torch.int32), seq_lens=lens, block_table=bt,
                                 slot_mapping=torch.tensor(slots, dtype=torch.int64),
                                 query_start_loc_host=[0, 1, 2, 3])
    md.rows()  # the builder's per-step split
    return md


def _plan(method, g):
    from kvcomp.vllm_plugin.plan import Plan

    if method == "off":
        return Plan(), 2 * D, None
    if method == "think":
        ch = torch.stack([torch.stack([torch.randperm(D, generator=g)[:KEEP].sort().values for _ in range(HKV)])
                          for _ in range(2)])
        return (Plan(num_layers=2, num_kv_heads=HKV, head_dim=D, think_channels=ch, think_window=WINDOW,
                     source="test"), KEEP + D, (HKV, WINDOW + 1, D))
    streaming = torch.tensor([[False, True, False]] * 2)
    return (Plan(num_layers=2, num_kv_heads=HKV, head_dim=D, streaming=streaming, sink=2, recent=6, source="test"),
            2 * D, (1, 2 + 6 + 4, 2 * D))


@pytest.mark.parametrize("method", ["off", "think", "duo"])
def test_second_layer_reads_nothing_back(method, monkeypatch):
    from kvcomp.ops._dispatch import has_native
    from kvcomp.vllm_plugin import backend
    from kvcomp.vllm_plugin.backend import KVCompAttentionImpl

    if not has_native("duo_decode"):
        pytest.skip("kvcomp._C is not built")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    g = torch.Generator().manual_seed(5)
    md = _step(g)
    plan, width, ring_shape = _plan(method, g)
    heads = 2 if method == "duo" else HKV  # DuoAttention's pages: the retrieval heads
    ring_block = torch.tensor([4, 0, 2], dtype=torch.int32)
    q, k, v = (torch.randn(5, h, D, generator=g) for h in (HQ, HKV, HKV))  # 2 padding rows past the 3 tokens
    slot_mapping = torch.cat([md.slot_mapping, torch.full((2,), -1, dtype=torch.int64)])
    caches, rings, impls = {}, {}, {}
    for name in ("l0", "l1", "check"):
        impl = impls[name] = KVCompAttentionImpl(HQ, D, D ** -0.5, HKV)
        impl.plan = plan
        impl.ring_name = None if ring_shape is None else name
        caches[name] = torch.randn(NB, heads, BS, width, generator=torch.Generator().manual_seed(1))
        if ring_shape is not None:
            rings[name] = torch.randn(6, *ring_shape, generator=torch.Generator().manual_seed(2))
    monkeypatch.setattr(backend, "ring_of", lambda name: (rings[name], ring_block))

    def layer(name, idx):
        lay = SimpleNamespace(layer_name=f"model.layers.{idx}.self_attn.attn")
        out = torch.empty(5, HQ, D)
        impls[name].do_kv_cache_update(lay, k, v, caches[name], slot_mapping)
        impls[name].forward(lay, q, k, v, caches[name], md, out)
        return out[:3]

    layer("l0", 0)
    want = layer("check", 1)  # unpatched, for the values
    # the layer's method object is bound at its first call (once per layer, not per step)
    impls["l1"]._setup_layer(SimpleNamespace(layer_name="model.layers.1.self_attn.attn"), caches["l1"])
    with monkeypatch.context() as mp:
        for read in READS:
            def raiser(self, *a, _read=read, **kw):
                raise HostRead(f"Tensor.{_read} in a layer's decode step")

            mp.setattr(torch.Tensor, read, raiser)
        got = layer("l1", 1)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(caches["l1"], caches["check"])
    if ring_shape is not None:
        assert torch.equal(rings["l1"], rings["check"])
