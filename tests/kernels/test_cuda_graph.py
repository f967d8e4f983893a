"""One decode step of every method captured in a CUDA graph and replayed with new inputs (GPU only).

The step is the method object's (``write`` then ``attend``, as the vLLM backend runs it; see
``_decode_steps``) over fp32 pages on the GPU: any host sync on the path (``.item()``, ``.tolist()``,
``.cpu()``, a boolean mask) fails the capture. The decode step at fixed metadata only overwrites its own
slots (pages, ring, codes), so after a replay with new ``q, k, v`` the output and every cache tensor equal
an eager step with those inputs on a twin layer. A²ATS's K/V pages are on the GPU here: its offloaded
host pages move the query to the CPU and back by design, which a graph cannot hold (the vLLM backend
declares no CUDA-graph support).
"""

import pytest
import torch

from _decode_steps import METHODS, build, decode_inputs



@pytest.mark.gpu
@pytest.mark.parametrize("method", METHODS)
def test_method_decode_step_cuda_graph_replay(method):
    mirror = "cuda" if "vq" in method else None
    layer = build(method, "cuda", mirror_device=mirror)
    twin = build(method, "cuda", mirror_device=mirror)
    q, k, v = decode_inputs("cuda", seed=1)  # the graph's static inputs
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        first = layer.decode(q, k, v)  # warm-up outside the capture: Triton compiles, the allocator settles
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = layer.decode(q, k, v)
    for static, new in zip((q, k, v), decode_inputs("cuda", seed=2)):
        static.copy_(new)
    graph.replay()
    torch.cuda.synchronize()
    want = twin.decode(*decode_inputs("cuda", seed=2))
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert not torch.equal(out, first)  # the replay read the new inputs
    for a, b in zip(layer.tensors(), twin.tensors()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
