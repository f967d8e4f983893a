"""Every decode-path op of ``kvcomp.ops``, and one decode step of every method object, traces under
``torch.compile(fullgraph=True)`` (no graph break: no ``.item()`` / ``.tolist()`` / data-dependent Python
on the path) and gives eager's result and cache contents.

``aot_eager`` runs dynamo and functionalization of the mutating custom ops through their fake
implementations, without code generation; the ops themselves run what ``impl_for`` picks (the Triton
interpreter in this suite; the native kernels with ``KVCOMP_OPS=native``). The host mirror's
``sparse_attention_host`` chooses its route in Python: it is traced through each (``KVCOMP_OPS``).
"""

import pytest
import torch

from _decode_steps import METHODS, build, decode_inputs
from kvcomp import ops
from kvcomp.ops._dispatch import has_native
from kvcomp.ref.duo import duo_head_map

D, B, HKV, G, BS, NB, C = 16, 2, 2, 2, 8, 6, 12


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _r(gen, *shape):
    return torch.randn(*shape, generator=gen)


BT = torch.tensor([[3, 0, 5], [1, 4, 2]], dtype=torch.int32)  # permuted blocks
LENS = torch.tensor([13, 20], dtype=torch.int32)
QSL = torch.tensor([0, 1, 2], dtype=torch.int32)


def _compiled_equals_eager(fn, *args, state=()):
    """``fn`` compiled with fullgraph=True returns eager's result and leaves ``state`` (tensors it
    mutates, among ``args``) as eager does; run on clones so both start alike."""
    eager_args = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    ids = [next(i for i, a in enumerate(args) if a is s) for s in state]
    want = fn(*eager_args)
    torch._dynamo.reset()
    got = torch.compile(fn, backend="aot_eager", fullgraph=True)(*args)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for i in ids:
        torch.testing.assert_close(args[i], eager_args[i], rtol=0, atol=0)


def test_duo_decode_fullgraph():
    g = _gen(0)
    hm = duo_head_map(torch.tensor([True, False]))  # KV head 0 streaming, 1 retrieval

    def fn(q, kc, vc, ks, vs):
        return ops.triton_duo_decode_attention(q, kc, vc, BT, LENS, ks, vs, hm, sink=2, window=4)

    _compiled_equals_eager(fn, _r(g, B, HKV * G, D), _r(g, NB, BS, 1, D), _r(g, NB, BS, 1, D),
                           _r(g, B, 1, 6, D), _r(g, B, 1, 6, D))


def test_duo_decode_ring_in_place_fullgraph():
    """The rings read in place from a pool through their ids (vLLM's ring pages: K/V views of one
    tensor, permuted ids, more slots than sink + window) trace too."""
    g = _gen(2)
    hm = duo_head_map(torch.tensor([True, False]))
    ring_block = torch.tensor([2, 0], dtype=torch.int32)

    def fn(q, kc, vc, ring):
        return ops.triton_duo_decode_attention(q, kc, vc, BT, LENS, ring[..., :D], ring[..., D:], hm, sink=2,
                                               window=4, ring_block=ring_block)

    _compiled_equals_eager(fn, _r(g, B, HKV * G, D), _r(g, NB, BS, 1, D), _r(g, NB, BS, 1, D), _r(g, 3, 1, 9, 2 * D))


def test_think_decode_fullgraph():
    g = _gen(1)
    chan = torch.stack([torch.randperm(D, generator=g)[:9].sort().values for _ in range(HKV)])[None]

    def fn(q, kp, ring, vc):
        return ops.think_decode(q, kp, chan, ring, vc, BT, LENS, max_seq_len=20)

    _compiled_equals_eager(fn, _r(g, B, HKV * G, D), _r(g, NB, BS, HKV, 9), _r(g, B, HKV, 4, D),
                           _r(g, NB, BS, HKV, D))


def test_vq_lut_fullgraph():
    g = _gen(2)
    _compiled_equals_eager(lambda q, cb: ops.vq_lut(q, cb, scale=0.3), _r(g, B, HKV * G, D), _r(g, HKV, C, D))


@pytest.mark.parametrize("topk", ["int", "tensor"])
def test_vq_topk_fullgraph(topk):
    """Both forms of ``topk``; a tensor one with a host bound ``topk_max`` (the eager-only value check)."""
    g = _gen(3)
    codes = torch.randint(0, C, (NB, BS, HKV), generator=g, dtype=torch.int16)
    kw = {"topk": 3} if topk == "int" else {"topk": torch.tensor([2, 3], dtype=torch.int32), "topk_max": 4}

    def fn(lut, codes):
        return ops.vq_topk(lut, codes, BT, LENS, sink=1, local=2, **kw)

    _compiled_equals_eager(fn, _r(g, B, HKV * G, C), codes)


def test_vq_encode_paged_fullgraph():
    g = _gen(4)
    cb, wh = _r(g, HKV, C, D), torch.eye(D).expand(HKV, D, D).clone()
    codes = torch.full((NB, BS, HKV), -1, dtype=torch.int16)

    def fn(k_new, codes):
        ops.vq_encode_paged(k_new, cb, wh, codes, BT, LENS, QSL)
        return codes.float().sum()

    _compiled_equals_eager(fn, _r(g, B, HKV, D), codes, state=(codes,))


@pytest.mark.parametrize("impl", ["native", "reference", "triton"])
def test_sparse_attention_host_fullgraph(impl, monkeypatch):
    if impl == "native" and not has_native("sparse_attention"):
        pytest.skip("kvcomp._C is not built")
    monkeypatch.setenv("KVCOMP_OPS", impl)
    g = _gen(5)
    idx = torch.randint(0, 13, (B, HKV, 5), generator=g, dtype=torch.int32)
    count = torch.tensor([[5, 3], [2, 4]], dtype=torch.int32)

    def fn(q, kc, vc):
        return ops.sparse_attention_host(q, kc, vc, idx, count, block_table=BT)

    _compiled_equals_eager(fn, _r(g, B, HKV * G, D), _r(g, NB, BS, HKV, D), _r(g, NB, BS, HKV, D))


def test_paged_write_fullgraph():
    g = _gen(6)
    slots = torch.tensor([12, -1, 19])  # -1: vLLM's padding, skipped

    def fn(k, v, kc, vc):
        ops.triton_write_paged_kv(k, v, kc, vc, slots)
        return kc.sum()

    kc, vc = _r(g, NB, BS, HKV, D), _r(g, NB, BS, HKV, D)
    _compiled_equals_eager(fn, _r(g, 3, HKV, D), _r(g, 3, HKV, D), kc, vc, state=(kc, vc))


def test_value_checks_stay_in_eager(monkeypatch):
    """The value checks skipped while tracing still raise in eager mode."""
    monkeypatch.setenv("KVCOMP_OPS", "reference")
    g = _gen(7)
    codes = torch.randint(0, C, (NB, BS, HKV), generator=g, dtype=torch.int16)
    with pytest.raises(ValueError, match="topk_max"):
        ops.vq_topk(_r(g, B, HKV * G, C), codes, BT, LENS, topk=torch.tensor([2, 9], dtype=torch.int32), sink=1,
                    local=2, topk_max=4)
    q, kc = _r(g, B, HKV * G, D), _r(g, NB, BS, HKV, D)
    idx = torch.zeros(B, HKV, 3, dtype=torch.int32)
    with pytest.raises(ValueError, match="count"):
        ops.sparse_attention_host(q, kc, kc, idx, torch.zeros(B, HKV, dtype=torch.int32), block_table=BT)
    with pytest.raises(ValueError, match="out-of-range token index"):
        ops.sparse_attention_host(q, kc, kc, idx + 24, torch.ones(B, HKV, dtype=torch.int32), block_table=BT)


@pytest.mark.parametrize("route", ["cpu", "triton"])
@pytest.mark.parametrize("method", METHODS)
def test_method_decode_step_fullgraph(method, route, monkeypatch, request):
    """One decode step of the method object (its page writes, codes, ring and decode ops) as the vLLM
    backend runs it, over a cache filled by an eager prompt, compiled whole: same output and caches.
    ``route``: the CPU product route (native kernels, references where an op has none) or the Triton
    kernels (interpreted)."""
    if route == "cpu" and not has_native("duo_decode"):
        pytest.skip("kvcomp._C is not built")
    if method == "think" and route == "triton":
        request.node.add_marker(pytest.mark.xfail(strict=True, reason=(
            "ThinK's narrow key pages are written through ops.scatter_tokens, whose non-native route "
            "(ref.scatter_tokens: boolean mask, int(max), unique) reads data on the host")))
    monkeypatch.setenv("TRITON_INTERPRET", "1" if route == "triton" else "0")
    eager, traced = build(method, "cpu"), build(method, "cpu")
    q, k, v = decode_inputs("cpu", seed=11)
    want = eager.decode(q, k, v)
    torch._dynamo.reset()
    got = torch.compile(traced.decode, backend="aot_eager", fullgraph=True)(q, k, v)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(traced.tensors(), eager.tensors()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
