import pytest
import torch
from ref_brute import brute_attention, to_pages

import kvcomp.ref as R
from kvcomp.testing import assert_close, assert_equal


def _visible(qp, kp, sink, window):
    return kp <= qp and (kp < sink or qp - kp < window)


@pytest.mark.parametrize("sink, window", [(0, 1), (4, 1), (2, 3), (8, 8), (0, 100), (50, 2)],
                         ids=lambda x: str(x))
def test_streaming_mask_matches_rule(sink, window):
    qp = torch.tensor([[0, 3, 9, 20], [1, 2, 15, 40]])
    kp = torch.tensor([[0, 1, 2, 3, 7, 8, 9, 19, 20], [40, 39, 0, 1, 2, 13, 14, 15, 30]])
    m = R.streaming_mask(qp, kp, sink, window)
    assert m.shape == (2, 4, 9) and m.dtype == torch.bool
    ref = torch.tensor([[[_visible(int(qp[b, i]), int(kp[b, j]), sink, window) for j in range(9)] for i in range(4)]
                        for b in range(2)])
    assert_equal("streaming_mask", ref, m)
    # 1-D positions broadcast
    m1 = R.streaming_mask(torch.arange(5), torch.arange(5), sink, window)
    assert m1.shape == (5, 5) and bool(m1.diagonal().all())


# (B, Hq, Hkv, Tq, Tk, D, Dv, sink, window)
DENSE = [
    (1, 1, 1, 1, 1, 8, 8, 0, 1),
    (3, 6, 2, 7, 33, 16, 16, 4, 8),
    (1, 8, 1, 129, 129, 8, 12, 2, 16),
    (3, 4, 4, 33, 33, 8, 8, 40, 3),
    (2, 8, 2, 1, 129, 16, 16, 0, 1),
]


@pytest.mark.parametrize("case", DENSE, ids=["B{}-Hq{}-Hkv{}-Tq{}-Tk{}-D{}-Dv{}-s{}-w{}".format(*c) for c in DENSE])
def test_streaming_attention_matches_brute(case):
    b, hq, hkv, tq, tk, d, dv, sink, window = case
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, hq, tq, d, generator=g)
    k = torch.randn(b, hkv, tk, d, generator=g)
    v = torch.randn(b, hkv, tk, dv, generator=g)
    out = R.streaming_attention(q, k, v, sink=sink, window=window)
    ref = brute_attention(q, k, v, lambda bb, h, i: [j for j in range(tk) if _visible(tk - tq + i, j, sink, window)])
    assert_close("streaming", ref, out, 1e-5)


def test_streaming_with_full_window_is_causal_attention():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 6, 9, 8, generator=g), torch.randn(2, 3, 9, 8, generator=g), torch.randn(2, 3, 9, 8, generator=g)
    assert_close("full-window", R.attention(q, k, v), R.streaming_attention(q, k, v, sink=0, window=9), 1e-6)
    assert_close("all-sink", R.attention(q, k, v), R.streaming_attention(q, k, v, sink=9, window=1), 1e-6)


def test_streaming_compact_storage_equals_full():
    # Decode over a compact cache (sinks + a ring buffer in rotated order) equals streaming over the full KV.
    b, hq, hkv, d, t, sink, window = 2, 4, 2, 16, 50, 4, 10
    g = torch.Generator().manual_seed(2)
    k, v = torch.randn(b, hkv, t, d, generator=g), torch.randn(b, hkv, t, d, generator=g)
    q = torch.randn(b, hq, 3, d, generator=g)  # 3 new tokens at positions 47..49
    full = R.streaming_attention(q, k, v, sink=sink, window=window)
    ring = list(range(t - window - 2, t))  # recent keys the last query needs plus 2 more for earlier queries
    ring = ring[5:] + ring[:5]
    kp = torch.tensor(list(range(sink)) + ring)
    out = R.streaming_attention(q, k[:, :, kp], v[:, :, kp], sink=sink, window=window, q_pos=torch.tensor([47, 48, 49]),
                                k_pos=kp)
    assert_close("compact", full, out, 1e-6)


@pytest.mark.parametrize("bs", [16, 5], ids=["bs16", "bs5"])
@pytest.mark.parametrize("qlens", [[1, 1, 1], [7, 33, 20], [3, 9, 1]], ids=["decode", "prefill", "chunked"])
def test_paged_streaming_matches_brute(bs, qlens):
    lens, hq, hkv, d, sink, window = [7, 33, 20], 6, 2, 8, 3, 5
    g = torch.Generator().manual_seed(3)
    ks = [torch.randn(hkv, n, d, generator=g) for n in lens]
    vs = [torch.randn(hkv, n, d, generator=g) for n in lens]
    kc, table = to_pages(ks, bs, hkv, d, seed=7)
    vc, _ = to_pages(vs, bs, hkv, d, seed=7)
    qsl = torch.tensor([0] + list(torch.tensor(qlens).cumsum(0)), dtype=torch.int32)
    q = torch.randn(int(qsl[-1]), hq, d, generator=g)
    out = R.paged_streaming_attention(q, kc, vc, table, torch.tensor(lens, dtype=torch.int32), qsl, sink=sink, window=window)
    for b, (n, ql) in enumerate(zip(lens, qlens)):
        s, e = int(qsl[b]), int(qsl[b + 1])
        ref = brute_attention(q[s:e].permute(1, 0, 2)[None], ks[b][None], vs[b][None],
                              lambda bb, h, i: [j for j in range(n) if _visible(n - ql + i, j, sink, window)])
        assert_close(f"paged streaming {b}", ref[0].permute(1, 0, 2), out[s:e], 1e-5)


def test_streaming_validation():
    q = torch.randn(1, 2, 3, 8)
    k = torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match="window"):
        R.streaming_attention(q, k, k, sink=4, window=0)
    with pytest.raises(ValueError, match="sink"):
        R.streaming_attention(q, k, k, sink=-1, window=2)
    with pytest.raises(ValueError, match="window"):
        R.streaming_mask(torch.arange(3), torch.arange(3), 1, 0)
    with pytest.raises(ValueError, match="q_pos"):
        R.streaming_mask(torch.arange(3.0), torch.arange(3), 1, 2)
    with pytest.raises(ValueError, match="k_pos"):
        R.streaming_attention(q, k, k, sink=1, window=2, k_pos=torch.arange(4))
