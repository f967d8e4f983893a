"""Streaming-head (sink + window) prefill / chunked prefill (Triton) and the dense retrieval path."""

import pytest
import torch

from kvcomp.ref import attention, streaming_attention, streaming_slot
from kvcomp.ref.duo import ring_positions
from kvcomp.testing import assert_close

RATIO = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


def dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def qkv(b, hq, hkv, tq, tk, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    t = lambda *s: torch.randn(*s, generator=gen).to(device=dev(), dtype=dtype)  # noqa: E731
    return t(b, hq, tq, d), t(b, hkv, tk, d), t(b, hkv, tk, d)


# (id, B, Hq, Hkv, Tq, Tk, D, sink, window)
CASES = [
    ("prefill-odd-g3", 1, 3, 1, 37, 37, 32, 4, 8),
    ("chunk-b3-g4", 3, 4, 1, 20, 50, 16, 4, 5),
    ("nosink-w1", 1, 2, 2, 33, 33, 16, 0, 1),
    ("bigsink-dense", 2, 2, 1, 17, 17, 64, 40, 100),
    ("sink-gt-block", 1, 1, 1, 16, 48, 16, 19, 6),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_streaming_prefill_fp32(case, nan_empty):
    from kvcomp.ops.prefill import triton_streaming_attention

    _, b, hq, hkv, tq, tk, d, sink, window = case
    q, k, v = qkv(b, hq, hkv, tq, tk, d, torch.float32)
    ref = streaming_attention(q, k, v, sink=sink, window=window)
    out = triton_streaming_attention(q, k, v, sink=sink, window=window)
    assert_close("streaming_prefill", ref, out, RATIO[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_streaming_prefill_half(dtype, nan_empty):
    from kvcomp.kernels.streaming_prefill import streaming_prefill

    q, k, v = qkv(2, 3, 1, 21, 40, 16, dtype, seed=1)
    ref = streaming_attention(q, k, v, sink=3, window=7, scale=0.2)
    out = streaming_prefill(q, k, v, sink=3, window=7, scale=0.2)
    assert out.dtype == dtype
    assert_close("streaming_prefill", ref.float(), out.float(), RATIO[dtype])


def test_streaming_prefill_explicit_positions(nan_empty):
    """Keys in shuffled order with explicit per-batch k_pos, and non-contiguous (strided) q."""
    from kvcomp.kernels.streaming_prefill import streaming_prefill

    b, tk, d = 2, 45, 16
    q, k, v = qkv(b, 4, 2, 11, tk, d, torch.float32, seed=2)
    q = torch.cat([q, q], dim=-1)[..., :d]  # last dim contiguous, other strides not
    k_pos = torch.stack([torch.randperm(tk), torch.randperm(tk)]).to(dev())
    q_pos = torch.tensor([3, 44, 20, 21, 22, 40, 41, 42, 43, 0, 1], device=dev())
    ref = streaming_attention(q, k, v, sink=2, window=6, q_pos=q_pos, k_pos=k_pos)
    out = streaming_prefill(q, k, v, sink=2, window=6, q_pos=q_pos, k_pos=k_pos)
    assert_close("streaming_prefill_pos", ref, out, 1e-5)


@pytest.mark.parametrize("prev", [[3, 30], [9, 0]], ids=["ring-partial-wrapped", "ring-full-empty"])
def test_streaming_chunked_prefill_over_ring(prev, nan_empty):
    """Chunked prefill of a streaming head: keys = cat(ring after `prev` tokens, new chunk) with
    ring_positions; must equal streaming attention over the dense history."""
    from kvcomp.kernels.streaming_prefill import streaming_prefill

    sink, window, d, hkv, g, chunk = 2, 7, 16, 1, 2, 12
    b = len(prev)
    gen = torch.Generator().manual_seed(4)
    total = [p + chunk for p in prev]
    hist_k = [torch.randn(hkv, n, d, generator=gen).to(dev()) for n in total]
    hist_v = [torch.randn(hkv, n, d, generator=gen).to(dev()) for n in total]
    kb = torch.full((b, hkv, sink + window, d), float("nan"), device=dev())
    vb = kb.clone()
    for i, p in enumerate(prev):  # the ring as StreamingHeads keeps it: the sinks and the last `window` tokens
        for t in range(p):
            if t < sink or t >= p - window:
                kb[i, :, streaming_slot(t, sink, window)] = hist_k[i][:, t]
                vb[i, :, streaming_slot(t, sink, window)] = hist_v[i][:, t]
    ring_pos = ring_positions(torch.tensor(prev, device=dev()), sink, window)
    q = torch.randn(b, hkv * g, chunk, d, generator=gen).to(dev())
    k = torch.cat([kb.nan_to_num(0.0), torch.stack([h[:, p:] for h, p in zip(hist_k, prev)])], dim=2)
    v = torch.cat([vb.nan_to_num(0.0), torch.stack([h[:, p:] for h, p in zip(hist_v, prev)])], dim=2)
    k_pos = torch.cat([ring_pos, torch.stack([torch.arange(p, p + chunk, device=dev()) for p in prev])], dim=1)
    q_pos = torch.stack([torch.arange(p, p + chunk, device=dev()) for p in prev])
    out = streaming_prefill(q, k, v, sink=sink, window=window, q_pos=q_pos, k_pos=k_pos)
    for i in range(b):
        ref = streaming_attention(q[i:i + 1], hist_k[i][None], hist_v[i][None], sink=sink, window=window)
        assert_close(f"seq{i}", ref[0], out[i], 1e-5)


@pytest.mark.parametrize("kw, match", [
    (dict(sink=2, window=0), "window"),
    (dict(sink=-1, window=3), "sink"),
    (dict(sink=2, window=3, k_pos=torch.arange(5)), "k_pos"),
])
def test_streaming_prefill_rejects(kw, match):
    from kvcomp.kernels.streaming_prefill import streaming_prefill

    q, k, v = qkv(1, 2, 1, 4, 8, 16, torch.float32)
    with pytest.raises(ValueError, match=match):
        streaming_prefill(q, k, v, **kw)


def test_streaming_prefill_rejects_shapes():
    from kvcomp.kernels.streaming_prefill import streaming_prefill

    q, k, v = qkv(1, 3, 2, 4, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        streaming_prefill(q, k, v, sink=1, window=2)
    q, k, v = qkv(1, 2, 1, 9, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="Tq"):
        streaming_prefill(q, k, v, sink=1, window=2)
    q, k, v = qkv(1, 2, 1, 4, 8, 24, torch.float32)
    with pytest.raises(ValueError, match="head dim"):
        streaming_prefill(q, k, v, sink=1, window=2)


@pytest.mark.parametrize("tq, tk", [(13, 13), (5, 19)])
def test_dense_prefill_matches_reference(tq, tk):
    from kvcomp.ops.prefill import dense_prefill

    q, k, v = qkv(2, 6, 2, tq, tk, 16, torch.float32, seed=5)
    assert_close("dense_prefill", attention(q, k, v), dense_prefill(q, k, v), 1e-5)


def test_ops_streaming_prefill_with_positions():
    """ops.prefill.streaming_prefill (SDPA + mask on CPU, Triton on CUDA) with a ring's kept
    positions followed by a chunk, as kvcomp's vLLM backend calls it."""
    from kvcomp.ops.prefill import streaming_prefill as op

    sink, window = 3, 5
    kept = [0, 1, 2, 17, 18, 19, 20]  # sink + the last 4 tokens before the chunk
    chunk = list(range(21, 27))
    k_pos = torch.tensor(kept + chunk, device=dev())
    q_pos = k_pos[len(kept):]
    q, k, v = qkv(1, 4, 2, len(chunk), len(k_pos), 16, torch.float32, seed=8)
    ref = streaming_attention(q, k, v, sink=sink, window=window, q_pos=q_pos, k_pos=k_pos)
    assert_close("ops streaming_prefill positions", ref, op(q, k, v, sink=sink, window=window, q_pos=q_pos,
                                                            k_pos=k_pos), 1e-5)
    with pytest.raises(ValueError, match="go together"):
        op(q, k, v, sink=sink, window=window, q_pos=q_pos)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_streaming_prefill_gpu_llama_shape(dtype):
    from kvcomp.kernels.streaming_prefill import streaming_prefill

    q, k, v = qkv(2, 32, 8, 1000, 3000, 128, dtype, seed=7)
    ref = streaming_attention(q, k, v, sink=64, window=256)
    out = streaming_prefill(q, k, v, sink=64, window=256)
    assert_close("streaming_prefill_gpu", ref.float(), out.float(), RATIO[dtype])
