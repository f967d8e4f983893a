"""torch.library registration of the DuoAttention kernels: opcheck on CPU (interpreter), fake tensors."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import kvcomp.ops.cache_write  # noqa: F401  (registers kvcomp::write_paged_kv)
import kvcomp.ops.duo  # noqa: F401  (registers kvcomp::duo_decode)
import kvcomp.ops.prefill  # noqa: F401  (registers kvcomp::streaming_prefill)
from kvcomp.ref.duo import duo_head_map

D = 16


def dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def duo_args():
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g).to(dev())  # noqa: E731
    hm = duo_head_map(torch.tensor([True, False])).to(dev())
    bt = torch.tensor([[1, 0]], dtype=torch.int32, device=dev())
    return (r(1, 2, D), r(2, 8, 1, D), r(2, 8, 1, D), bt, torch.tensor([9], dtype=torch.int32, device=dev()),
            r(1, 1, 6, D), r(1, 1, 6, D), hm, 2, 4, 0.25, 1)


# the real kernel runs under the interpreter; keep the number of opcheck utilities small on CPU
UTILS = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")


def test_opcheck_duo_decode():
    torch.library.opcheck(torch.ops.kvcomp.duo_decode.default, duo_args(), test_utils=UTILS)


def test_opcheck_streaming_prefill():
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 5, D, generator=g).to(dev())
    k = torch.randn(1, 1, 9, D, generator=g).to(dev())
    args = (q, k, k.clone(), 2, 4, 0.25, None, torch.arange(9, device=dev()))
    torch.library.opcheck(torch.ops.kvcomp.streaming_prefill.default, args, test_utils=UTILS)


def test_opcheck_cache_write():
    g = torch.Generator().manual_seed(2)
    r = lambda *s: torch.randn(*s, generator=g).to(dev())  # noqa: E731
    slots = torch.tensor([3, -1, 17], device=dev())
    torch.library.opcheck(torch.ops.kvcomp.write_paged_kv.default,
                          (r(3, 1, D), r(3, 1, D), r(3, 8, 1, D), r(3, 8, 1, D), slots), test_utils=UTILS)


def test_fake_mode_shapes_without_running_kernels():
    from kvcomp.ops.duo import triton_duo_decode_attention
    from kvcomp.ops.prefill import triton_streaming_attention

    with FakeTensorMode():
        hm = torch.zeros(8, 2, dtype=torch.int32)
        out = triton_duo_decode_attention(torch.empty(4, 32, 128, dtype=torch.bfloat16),
                                          torch.empty(100, 16, 4, 128, dtype=torch.bfloat16),
                                          torch.empty(100, 16, 4, 128, dtype=torch.bfloat16),
                                          torch.empty(4, 25, dtype=torch.int32), torch.empty(4, dtype=torch.int32),
                                          torch.empty(4, 4, 320, 128, dtype=torch.bfloat16),
                                          torch.empty(4, 4, 320, 128, dtype=torch.bfloat16), hm,
                                          sink=64, window=256)
        assert out.shape == (4, 32, 128) and out.dtype == torch.bfloat16
        o = triton_streaming_attention(torch.empty(2, 32, 100, 128), torch.empty(2, 8, 300, 128),
                                       torch.empty(2, 8, 300, 128), sink=64, window=256)
        assert o.shape == (2, 32, 100, 128)


def test_public_wrappers_reject_before_launch():
    from kvcomp.ops.duo import triton_duo_decode_attention

    a = list(duo_args())
    with pytest.raises(ValueError, match="num_splits"):
        triton_duo_decode_attention(*a[:8], sink=2, window=4, num_splits=0)
    with pytest.raises(ValueError, match="k_stream"):
        triton_duo_decode_attention(*a[:8], sink=3, window=4)


def test_import_kvcomp_ops_does_not_import_triton():
    import subprocess
    import sys

    code = ("import sys, kvcomp.ops.duo, kvcomp.ops.prefill, kvcomp.ops.cache_write; "
            "assert 'triton' not in sys.modules, 'triton imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_decode_step_traces_fullgraph():
    """A decode step (paged write + ring write + duo decode) compiles with fullgraph=True (aot_eager:
    dynamo + functionalization of the mutating op through its fake impl) and matches eager."""
    from kvcomp.ops.cache_write import triton_write_paged_kv
    from kvcomp.ops.duo import triton_duo_decode_attention

    q, kc, vc, bt, lens, ks, vs, hm = duo_args()[:8]

    def step(q, knew, vnew, kc, vc, ks, vs, slots, ring_slot, lens):
        triton_write_paged_kv(knew[:, :1], vnew[:, :1], kc, vc, slots)
        ks[:, :, ring_slot] = knew[:, 1:]  # as StreamingHeads.ring_write
        vs[:, :, ring_slot] = vnew[:, 1:]
        return triton_duo_decode_attention(q, kc, vc, bt, lens, ks, vs, hm, sink=2, window=4, num_splits=1)

    g = torch.Generator().manual_seed(3)
    knew = torch.randn(1, 2, D, generator=g).to(dev())
    vnew = torch.randn(1, 2, D, generator=g).to(dev())
    slots = torch.tensor([8], device=dev())  # token 8 -> block 1, offset 0
    ring_slot = torch.tensor([2 + (8 - 2) % 4], device=dev())  # token 8 (sink 2, window 4)
    caches = [kc, vc, ks, vs]
    eager_caches = [c.clone() for c in caches]
    want = step(q, knew, vnew, *eager_caches, slots, ring_slot, lens)
    got = torch.compile(step, backend="aot_eager", fullgraph=True)(q, knew, vnew, *caches, slots, ring_slot, lens)
    torch.testing.assert_close(got, want)
    for a, b in zip(caches, eager_caches):
        torch.testing.assert_close(a, b)


@pytest.mark.gpu
def test_duo_decode_cuda_graph_replay():
    """The decode op launches without host syncs, so it can be captured and replayed in a CUDA graph."""
    from kvcomp.ops.duo import triton_duo_decode_attention

    q, kc, vc, bt, lens, ks, vs, hm = duo_args()[:8]
    run = lambda: triton_duo_decode_attention(q, kc, vc, bt, lens, ks, vs, hm, sink=2, window=4)  # noqa: E731
    want = run()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        run()  # warm-up compiles outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run()
    q.copy_(torch.randn_like(q))
    graph.replay()
    torch.testing.assert_close(out, run())
    assert not torch.equal(out, want)
