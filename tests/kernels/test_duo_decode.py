"""DuoAttention head-split split-K paged decode (Triton) vs kvcomp.ref.duo and vs dense history."""

import pytest
import torch

from kvcomp.ref import attention, streaming_attention, streaming_slot
from kvcomp.ref.duo import duo_decode_attention as ref_decode
from kvcomp.ref.duo import duo_head_map, ring_positions
from kvcomp.testing import assert_close, ring_pool

RATIO = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


def dev():
    return "cuda" if torch.cuda.is_available() else "cpu"


def build(streaming, g, d, bs, sink, window, lens, dtype, seed=0, spare_blocks=2):
    """Random head-split cache: permuted block table, NaN in every slot no valid token occupies."""
    gen = torch.Generator().manual_seed(seed)
    streaming = torch.tensor(streaming)
    n_str = int(streaming.sum())
    n_ret = len(streaming) - n_str
    b = len(lens)
    max_blocks = max(-(-x // bs) for x in lens) + 1
    nb = b * max_blocks + spare_blocks
    kc = torch.full((nb, bs, n_ret, d), float("nan"))
    vc = torch.full((nb, bs, n_ret, d), float("nan"))
    bt = torch.randperm(nb, generator=gen)[: b * max_blocks].view(b, max_blocks).to(torch.int32)
    for i, length in enumerate(lens):
        for t in range(length):
            kc[bt[i, t // bs], t % bs] = torch.randn(n_ret, d, generator=gen)
            vc[bt[i, t // bs], t % bs] = torch.randn(n_ret, d, generator=gen)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    valid = ring_positions(seq_lens, sink, window) < (1 << 30)  # [B, S]
    ks = torch.full((b, n_str, sink + window, d), float("nan"))
    vs = torch.full((b, n_str, sink + window, d), float("nan"))
    shape = (int(valid.sum()), n_str, d)
    ks.permute(0, 2, 1, 3)[valid] = torch.randn(shape, generator=gen)
    vs.permute(0, 2, 1, 3)[valid] = torch.randn(shape, generator=gen)
    q = torch.randn(b, len(streaming) * g, d, generator=gen)
    t = lambda x: x.to(device=dev(), dtype=dtype)  # noqa: E731
    return (t(q), t(kc), t(vc), bt.to(dev()), seq_lens.to(dev()), t(ks), t(vs),
            duo_head_map(streaming).to(dev()))


# (id, streaming pattern per KV head, G, D, block_size, sink, window, seq_lens)
CASES = [
    ("b1-g1-d64-kbs+1", [True, False], 1, 64, 16, 4, 8, [33]),
    ("b3-g3-edges", [False, True], 3, 32, 16, 4, 8, [16, 31, 2]),
    ("b3-g4-short-mixed", [True, False, True], 4, 16, 8, 4, 6, [1, 3, 17]),
    ("b2-g2-all-streaming", [True, True], 2, 16, 8, 2, 5, [4, 23]),
    ("b2-g3-all-retrieval", [False, False], 3, 16, 16, 2, 5, [15, 40]),
]


@pytest.mark.parametrize("splits", [1, 3], ids=["split1", "split3"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_duo_decode_fp32(case, splits, nan_empty):
    from kvcomp.ops.duo import triton_duo_decode_attention

    _, pattern, g, d, bs, sink, window, lens = case
    args = build(pattern, g, d, bs, sink, window, lens, torch.float32)
    ref = ref_decode(*args, sink=sink, window=window)
    out = triton_duo_decode_attention(*args, sink=sink, window=window, num_splits=splits)
    assert_close("duo_decode", ref, out, RATIO[torch.float32])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("case", [CASES[1], CASES[2]], ids=[CASES[1][0], CASES[2][0]])
def test_duo_decode_half(case, dtype, nan_empty):
    from kvcomp.kernels.duo_decode import duo_decode_attention

    _, pattern, g, d, bs, sink, window, lens = case
    args = build(pattern, g, d, bs, sink, window, lens, dtype, seed=1)
    out = duo_decode_attention(*args, sink=sink, window=window, scale=0.3)
    ref = ref_decode(*args, sink=sink, window=window, scale=0.3)
    assert out.dtype == dtype
    assert_close("duo_decode", ref.float(), out.float(), RATIO[dtype])


def in_pool(args, *, capacity, spare_rings, seed=0):
    """``args`` with their rings in a pool (:func:`kvcomp.testing.ring_pool`); returns ``(args, ring_block)``."""
    ks, vs, rb = ring_pool(args[5], args[6], capacity=capacity, spare_rings=spare_rings, seed=seed)
    return (*args[:5], ks, vs, args[7]), rb


# (id, streaming pattern, G, D, block_size, sink, window, seq_lens, capacity, spare rings)
POOL_CASES = [
    ("b1-g1-wide", [True, False], 1, 16, 8, 2, 5, [9], 11, 2),
    ("b3-g4-partial", [True, False, True], 4, 16, 8, 4, 6, [1, 3, 5], 5, 1),  # ring not filled: 5 < 10 slots
    ("b2-g8-exact", [True, True], 8, 32, 16, 3, 4, [4, 23], 7, 0),
    ("b4-g2-all-streaming", [True, True, True], 2, 16, 8, 0, 3, [1, 2, 7, 3], 4, 3),
]


@pytest.mark.parametrize("int64", [False, True], ids=["rb32", "rb64"])
@pytest.mark.parametrize("case", POOL_CASES, ids=[c[0] for c in POOL_CASES])
def test_duo_decode_ring_in_place(case, int64, nan_empty):
    """Rings read in place through ``ring_block`` (permuted ids, spare rings, wider or partly filled
    rings, K/V views of one tensor, a transposed block table) = the reference over one ring per request."""
    from kvcomp.ops.duo import triton_duo_decode_attention

    _, pattern, g, d, bs, sink, window, lens, cap, spare = case
    args = build(pattern, g, d, bs, sink, window, lens, torch.float32, seed=4)
    want = ref_decode(*args, sink=sink, window=window)
    pooled, rb = in_pool(args, capacity=cap, spare_rings=spare, seed=5)
    rb = rb.long() if int64 else rb
    pooled = list(pooled)
    pooled[3] = pooled[3].t().contiguous().t()  # non-contiguous block table
    assert_close("duo_decode ref in place", want, ref_decode(*pooled, sink=sink, window=window, ring_block=rb), 1e-6)
    out = triton_duo_decode_attention(*pooled, sink=sink, window=window, num_splits=2, ring_block=rb)
    assert_close("duo_decode in place", want, out, RATIO[torch.float32])


def test_duo_decode_matches_dense_history(nan_empty):
    """Write a whole history (a prefill chunk, then decode steps: retrieval pages with the Triton cache
    write, the streaming ring as StreamingHeads keeps it), decode with the Triton kernel, and compare
    against attention / streaming_attention on the dense history."""
    from kvcomp.ops.cache_write import triton_write_paged_kv
    from kvcomp.ops.duo import triton_duo_decode_attention

    torch.manual_seed(3)
    sink, window, bs, d, g = 3, 5, 8, 16, 2
    streaming = torch.tensor([False, True, True])
    hm = duo_head_map(streaming).to(dev())
    lens = [13, 4]
    b, hkv = len(lens), 3
    k_full = [torch.randn(hkv, n, d, device=dev()) for n in lens]
    v_full = [torch.randn(hkv, n, d, device=dev()) for n in lens]
    nb = 8
    bt = torch.tensor([[5, 2, 7], [0, 6, 1]], dtype=torch.int32, device=dev())
    kc = torch.full((nb, bs, 1, d), float("nan"), device=dev())
    vc = kc.clone()
    ks = torch.full((b, 2, sink + window, d), float("nan"), device=dev())
    vs = ks.clone()
    done = [0, 0]
    for step in ([10, 2], [1, 1], [1, 0], [1, 1]):  # prefill chunk, then ragged decode steps
        new = [(done[i], done[i] + step[i]) for i in range(b)]
        key = torch.cat([k_full[i][:, a:e].transpose(0, 1) for i, (a, e) in enumerate(new)])
        val = torch.cat([v_full[i][:, a:e].transpose(0, 1) for i, (a, e) in enumerate(new)])
        slots = torch.cat([bt[i, torch.arange(a, e) // bs].long() * bs + torch.arange(a, e, device=dev()) % bs
                           for i, (a, e) in enumerate(new)])
        done = [e for _, e in new]
        seq_lens = torch.tensor(done, dtype=torch.int32, device=dev())
        triton_write_paged_kv(key[:, :1], val[:, :1], kc, vc, slots)
        for i, (a, e) in enumerate(new):  # the ring keeps the sinks and the last `window` tokens
            for p in range(a, e):
                if p < sink or p >= e - window:
                    ks[i, :, streaming_slot(p, sink, window)] = k_full[i][1:, p]
                    vs[i, :, streaming_slot(p, sink, window)] = v_full[i][1:, p]
    assert done == lens
    q = torch.randn(b, hkv * g, d, device=dev())
    out = triton_duo_decode_attention(q, kc, vc, bt, seq_lens, ks, vs, hm, sink=sink, window=window, num_splits=2)
    for i, n in enumerate(lens):
        qi = q[i].view(hkv, g, d)
        ref_r = attention(qi[:1][None, :, None].reshape(1, g, 1, d), k_full[i][:1][None], v_full[i][:1][None])
        ref_s = streaming_attention(qi[1:].reshape(1, 2 * g, 1, d), k_full[i][1:][None], v_full[i][1:][None],
                                    sink=sink, window=window)
        assert_close(f"seq{i} retrieval", ref_r[0, :, 0], out[i, :g], 1e-5)
        assert_close(f"seq{i} streaming", ref_s[0, :, 0], out[i, g:], 1e-5)


def _args(d=16, dtype=torch.float32):
    return build([True, False], 2, d, 8, 2, 4, [5], dtype)


@pytest.mark.parametrize("mutate, match", [
    (lambda a: a.__setitem__(0, a[0].double()), "dtype"),
    (lambda a: a.__setitem__(1, a[1].half()), "dtype"),
    (lambda a: a.__setitem__(0, a[0].transpose(1, 2).contiguous().transpose(1, 2)), "contiguous"),
    (lambda a: a.__setitem__(7, a[7][:1]), "head_map"),
    (lambda a: a.__setitem__(7, torch.tensor([[1, 0], [1, 0]], dtype=torch.int32)), "permutation"),
    (lambda a: a.__setitem__(3, torch.full_like(a[3], 99)), "block ids"),
    (lambda a: a.__setitem__(4, torch.zeros_like(a[4])), "at least"),
    (lambda a: a.__setitem__(5, a[5][:, :, :-1]), "k_stream"),
    (lambda a: [a.__setitem__(i, a[i][:, :, :4]) for i in (5, 6)], "4 ring slots but request 0"),
    (lambda a: [a.__setitem__(i, torch.cat([a[i], a[i]])) for i in (5, 6)], "one ring per request"),
], ids=["q-f64", "cache-f16", "noncontig", "head_map-shape", "head_map-dup", "block-oob", "len0", "ring-size",
        "ring-short", "rings-no-ids"])
def test_duo_decode_rejects_bad_input(mutate, match):
    from kvcomp.kernels.duo_decode import duo_decode_attention

    a = list(_args())
    mutate(a)
    with pytest.raises(ValueError, match=match):
        duo_decode_attention(*a, sink=2, window=4)


@pytest.mark.parametrize("ring_block, match", [
    (torch.tensor([2], dtype=torch.int32), "outside k_stream's 2 rings"),
    (torch.tensor([-1]), "outside k_stream's 2 rings"),
    (torch.tensor([0, 1], dtype=torch.int32), "ring_block"),
    (torch.tensor([0.0]), "integer"),
], ids=["oob", "negative", "length", "float"])
def test_duo_decode_rejects_bad_ring_block(ring_block, match):
    """Bad ring ids fail before any read, in the reference and the Triton launcher alike."""
    from kvcomp.kernels.duo_decode import duo_decode_attention

    args, _ = in_pool(_args(), capacity=6, spare_rings=1)
    for fn in (ref_decode, duo_decode_attention):
        with pytest.raises(ValueError, match=match):
            fn(*args, sink=2, window=4, ring_block=ring_block.to(args[0].device))


@pytest.mark.parametrize("d", [48, 8, 512])
def test_duo_decode_rejects_head_dim(d):
    from kvcomp.kernels.duo_decode import duo_decode_attention

    a = build([True, False], 1, d, 8, 2, 4, [3], torch.float32)
    with pytest.raises(ValueError, match="head dim"):
        duo_decode_attention(*a, sink=2, window=4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_duo_decode_gpu_llama_shape(dtype):
    """Llama-3.1-8B attention shape (32 q / 8 kv heads, d=128), half streaming, long ragged contexts."""
    from kvcomp.kernels.duo_decode import duo_decode_attention

    args = build([True, False] * 4, 4, 128, 16, 64, 256, [4097, 1, 300, 8191], dtype)
    out = duo_decode_attention(*args, sink=64, window=256)
    ref = ref_decode(*args, sink=64, window=256)
    assert_close("duo_decode_gpu", ref.float(), out.float(), RATIO[dtype])
