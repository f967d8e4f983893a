"""The references give the same answers on CUDA as on CPU (skipped without CUDA)."""

import pytest
import torch

import kvcomp.calibrate.codebook as CB
from ref_brute import to_pages

import kvcomp.ref as R
from kvcomp.testing import assert_close, assert_equal

pytestmark = pytest.mark.gpu


def _cuda(*ts):
    return [t.cuda() for t in ts]


def test_dense_paths_on_cuda():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(3, 8, 7, 16, generator=g), torch.randn(3, 2, 33, 16, generator=g), torch.randn(3, 2, 33, 24, generator=g)
    qc, kc, vc = _cuda(q, k, v)
    assert_close("attention", R.attention(q, k, v), R.attention(qc, kc, vc), 1e-5)
    assert_close("streaming", R.streaming_attention(q, k, v, sink=3, window=5),
                 R.streaming_attention(qc, kc, vc, sink=3, window=5), 1e-5)
    idx = R.think_keep_channels(R.think_channel_scores(q, k), 0.4)
    idx_c = R.think_keep_channels(R.think_channel_scores(qc, kc), 0.4)
    assert_equal("think idx", idx, idx_c)
    kp = R.pack_pruned_keys(k[:, :, :20], idx)
    out = R.pruned_key_attention(q, kp, idx, k[:, :, 20:], v)
    out_c = R.pruned_key_attention(qc, kp.cuda(), idx_c, kc[:, :, 20:], vc)
    assert_close("pruned", out, out_c, 1e-5)
    inv = 1.0 / 10000 ** (torch.arange(0, 16, 2).float() / 16)
    cos, sin = R.rope_cos_sin(torch.arange(7), inv)
    cc, sc = R.rope_cos_sin(torch.arange(7).cuda(), inv.cuda())
    assert_close("rope", R.apply_rope(q, cos, sin), R.apply_rope(qc, cc, sc), 1e-6)


def test_paged_paths_on_cuda():
    g = torch.Generator().manual_seed(1)
    lens, qlens, hkv, d = [7, 33, 20], [1, 9, 20], 2, 16
    ks = [torch.randn(hkv, n, d, generator=g) for n in lens]
    vs = [torch.randn(hkv, n, d, generator=g) for n in lens]
    kc, table = to_pages(ks, 5, hkv, d, seed=2)
    vc, _ = to_pages(vs, 5, hkv, d, seed=2)
    qsl = torch.tensor([0, 1, 10, 30], dtype=torch.int32)
    sl = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(30, 6, d, generator=g)
    args = (q, kc, vc, table, sl, qsl)
    cargs = _cuda(*args)
    assert_close("paged", R.paged_attention(*args), R.paged_attention(*cargs), 1e-5)
    assert_close("paged streaming", R.paged_streaming_attention(*args, sink=2, window=4),
                 R.paged_streaming_attention(*cargs, sink=2, window=4), 1e-5)
    m = torch.rand(3, hkv, 33, generator=g) < 0.5
    m &= torch.arange(33) < sl[:, None, None]
    idx, cnt = R.mask_to_indices(m)
    idx_c, cnt_c = R.mask_to_indices(m.cuda())
    assert_equal("idx", idx, idx_c)
    qd = torch.randn(3, 6, d, generator=g)
    assert_close("paged sparse", R.paged_sparse_attention(qd, kc, vc, table, idx, cnt),
                 R.paged_sparse_attention(*_cuda(qd, kc, vc, table, idx, cnt)), 1e-5)


def test_vq_on_cuda():
    g = torch.Generator().manual_seed(3)
    k = torch.randn(400, 8, generator=g)
    q = torch.randn(100, 8, generator=g)
    cb, lw = CB.fit_codebook(k, q, 16, iters=20)
    cb_c, lw_c = CB.fit_codebook(k.cuda(), q.cuda(), 16, iters=20)
    assert_close("L", lw, lw_c, 1e-5)
    assert_close("codebook", cb, cb_c, 1e-3)  # same seeds; Lloyd may settle on tiny fp differences
    kk = torch.randn(2, 1, 50, 8, generator=g)
    codes = R.vq_encode(kk, cb[None], lw[None])
    assert_equal("codes", codes, R.vq_encode(kk.cuda(), cb[None].cuda(), lw[None].cuda()))
    qq = torch.randn(2, 3, 8, generator=g)
    s = R.vq_scores(R.vq_lut(qq, cb[None]), codes)
    s_c = R.vq_scores(R.vq_lut(qq.cuda(), cb[None].cuda()), codes.cuda())
    assert_close("scores", s, s_c, 1e-5)
    sl = torch.tensor([50, 20])
    m = R.vq_select(s, topk=4, sink=2, local=3, num_kv_heads=1, seq_lens=sl)
    assert_equal("select", m, R.vq_select(s_c, topk=4, sink=2, local=3, num_kv_heads=1, seq_lens=sl.cuda()))
