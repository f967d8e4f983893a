import pytest
import torch
from ref_brute import brute_attention, to_pages

import kvcomp.calibrate.codebook as CB
import kvcomp.ref as R
import kvcomp.ref.vq as VQ
from kvcomp.testing import assert_close, assert_equal


def _clusters(n_per, centers, spread, seed):
    g = torch.Generator().manual_seed(seed)
    pts = [c + spread * torch.randn(n_per, c.shape[0], generator=g) for c in centers]
    x = torch.cat(pts)
    return x[torch.randperm(x.shape[0], generator=g)]


def _match(found, truth):
    """Max distance from each true centre to its nearest found centroid."""
    return float(torch.cdist(truth.double(), found.double()).min(dim=1).values.max())


# ------------------------------------------------------------------------------------- calibration


def test_query_hessian_and_whitening():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(300, 16, generator=g) * torch.linspace(0.2, 4, 16)
    h = CB.query_hessian(q)
    ref = q.double().T @ q.double()
    ref = ref / ref.pow(2).mean().sqrt()
    assert_close("hessian", ref, h, 1e-6)
    assert abs(float(h.double().pow(2).mean().sqrt()) - 1) < 1e-5
    lw = CB.whitening(h, eps=1e-6)
    assert torch.equal(lw, lw.tril())
    assert_close("LL^T", h.double() + 1e-6 * torch.eye(16, dtype=torch.float64), lw.double() @ lw.double().T, 1e-6)
    k, c = torch.randn(5, 16, generator=g), torch.randn(5, 16, generator=g)
    quad = torch.einsum("nd,de,ne->n", (k - c).double(), h.double(), (k - c).double())
    assert_close("whitened metric", quad, ((k - c) @ lw).double().pow(2).sum(-1), 1e-4)
    with pytest.raises(ValueError, match="h"):
        CB.whitening(torch.randn(4, 5))
    with pytest.raises(ValueError, match="positive definite"):
        CB.whitening(-torch.eye(4))
    with pytest.raises(ValueError, match="q_wrope"):
        CB.query_hessian(torch.zeros(3, 4))


def test_kmeans_recovers_clusters_and_is_deterministic():
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(6, 8, generator=g) * 10 + 50.0  # large common offset
    x = _clusters(60, centers, 0.3, seed=2)
    c = CB.kmeans(x, 6, seed=0)
    assert c.shape == (6, 8) and c.dtype == torch.float32
    assert _match(c, centers) < 0.3
    assert torch.equal(c, CB.kmeans(x, 6, seed=0))
    # the returned centroids are a fixed point of Lloyd's step
    assign = torch.cdist(x.double(), c.double()).argmin(1)
    means = torch.stack([x[assign == i].double().mean(0) for i in range(6)])
    assert_close("fixed point", means, c, 1e-5)


def test_kmeans_chunking_matches_unchunked(monkeypatch):
    x = torch.randn(500, 6, generator=torch.Generator().manual_seed(3))
    full = CB.kmeans(x, 20, iters=15, seed=4)
    monkeypatch.setattr(VQ, "_DIST_ELEMS", 600)  # 30 rows per chunk
    assert_close("chunked kmeans", full, CB.kmeans(x, 20, iters=15, seed=4), 1e-6)


def test_kmeans_edge_cases():
    x = torch.randn(10, 4, generator=torch.Generator().manual_seed(5))
    with pytest.raises(ValueError, match="fewer than n_codes"):
        CB.kmeans(x, 11)
    # as many codes as points: every point is its own centroid
    c = CB.kmeans(x, 10)
    assert _match(c, x) < 1e-5
    # duplicates (3 distinct points, 5 codes): finite, and the distinct points are recovered
    d = torch.cat([x[:3]] * 4)
    c = CB.kmeans(d, 5, iters=5)
    assert torch.isfinite(c).all() and _match(c, x[:3]) < 1e-5
    assert CB.kmeans(x, 4, iters=0).shape == (4, 4)
    with pytest.raises(ValueError, match="n_codes"):
        CB.kmeans(x, 0)


def test_fit_codebook_recovers_clusters_and_matches_encode():
    g = torch.Generator().manual_seed(6)
    d = 16
    centers = torch.randn(8, d, generator=g) * 3
    k = _clusters(50, centers, 0.05, seed=7)
    q = torch.randn(200, d, generator=g) * torch.linspace(0.5, 2, d)
    cb, lw = CB.fit_codebook(k, q, 8, iters=50, seed=0)
    assert cb.shape == (8, d) and lw.shape == (d, d)
    assert _match(cb, centers) < 0.1
    # the codebook lives in key space: cb @ L is k-means on k @ L
    cw = CB.kmeans(k @ lw, 8, iters=50, seed=0)
    assert_close("C' = C L", cw, cb @ lw, 1e-5)
    codes = R.vq_encode(k[None, None], cb[None], lw[None])[0, 0]
    nearest_true = torch.cdist(k, centers).argmin(1)
    nearest_code = torch.cdist(centers, cb).argmin(1)
    assert_equal("encode = cluster", nearest_code[nearest_true].to(torch.int16), codes)
    with pytest.raises(ValueError, match="n_codes"):
        CB.fit_codebook(k, q, 40000)


# ------------------------------------------------------------------------------------- encode / LUT


@pytest.mark.parametrize("b, hkv, t, d, c", [(1, 1, 1, 4, 1), (3, 2, 33, 8, 17), (2, 3, 129, 16, 64)],
                         ids=["tiny", "B3-T33-C17", "B2-T129-C64"])
def test_vq_encode_is_whitened_argmin(b, hkv, t, d, c, monkeypatch):
    g = torch.Generator().manual_seed(8)
    k = torch.randn(b, hkv, t, d, generator=g)
    cb = torch.randn(hkv, c, d, generator=g)
    lw = torch.stack([CB.whitening(CB.query_hessian(torch.randn(50, d, generator=g) * torch.rand(d, generator=g)))
                      for _ in range(hkv)])
    codes = R.vq_encode(k, cb, lw)
    assert codes.dtype == torch.int16 and codes.shape == (b, hkv, t)
    for bb in range(b):
        for h in range(hkv):
            diff = k[bb, h].double()[:, None, :] - cb[h].double()[None, :, :]  # [T, C, D]
            dist = (diff @ lw[h].double()).pow(2).sum(-1)
            assert_equal(f"encode b{bb} h{h}", dist.argmin(-1).to(torch.int16), codes[bb, h])
    monkeypatch.setattr(VQ, "_DIST_ELEMS", 50)
    assert_equal("chunked encode", codes, R.vq_encode(k, cb, lw))


@pytest.mark.parametrize("hq, hkv", [(1, 1), (6, 2), (8, 1), (12, 4)], ids=["g1", "g3", "g8", "g3-h4"])
def test_vq_lut_and_scores_match_brute(hq, hkv):
    b, t, d, c = 3, 33, 8, 16
    g = torch.Generator().manual_seed(9)
    q = torch.randn(b, hq, d, generator=g)
    cb = torch.randn(hkv, c, d, generator=g)
    codes = torch.randint(0, c, (b, hkv, t), generator=g, dtype=torch.int16)
    lut = R.vq_lut(q, cb)
    sc = R.vq_scores(lut, codes)
    assert lut.dtype == torch.float32 and lut.shape == (b, hq, c) and sc.shape == (b, hq, t)
    grp = hq // hkv
    ref = torch.zeros(b, hq, t, dtype=torch.float64)
    for bb in range(b):
        for h in range(hq):
            for j in range(t):
                ref[bb, h, j] = q[bb, h].double() @ cb[h // grp, int(codes[bb, h // grp, j])].double() / d ** 0.5
    assert_close("vq scores", ref, sc, 1e-6)
    with pytest.raises(ValueError, match="codes"):
        R.vq_scores(lut, codes + c)


def test_vq_scores_are_exact_wrope_logits_with_lossless_codebook():
    # With one code per key, LUT scores equal the windowed-RoPE logits of the keys themselves.
    d, t = 16, 20
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    g = torch.Generator().manual_seed(10)
    k_pre = torch.randn(1, 1, t, d, generator=g)
    q_pre = torch.randn(1, 2, d, generator=g)
    qt = R.windowed_rope_query(q_pre, inv, rel_pos=100)
    codes = torch.arange(t, dtype=torch.int16)[None, None]
    sc = R.vq_scores(R.vq_lut(qt, k_pre[0]), codes)
    p = 500
    cq, sq = R.rope_cos_sin(torch.tensor(p), inv)
    ck, sk = R.rope_cos_sin(torch.tensor(p - 100), inv)
    exact = (R.apply_rope(q_pre, cq, sq) @ R.apply_rope(k_pre[0, 0], ck, sk).T) / d ** 0.5
    assert_close("lossless", exact, sc, 1e-4)


# ------------------------------------------------------------------------------------- selection


def _brute_select(scores, topk, sink, local, hkv, lens):
    b, hq, t = scores.shape
    grp = hq // hkv
    out = torch.zeros(b, hkv, t, dtype=torch.bool)
    for bb in range(b):
        n = lens[bb]
        kk = topk[bb] if isinstance(topk, list) else topk
        for h in range(hkv):
            keep = set(range(min(sink, n))) | set(range(max(0, n - local), n))
            for hh in range(h * grp, (h + 1) * grp):
                vals = scores[bb, hh, :n].tolist()
                keep |= set(sorted(range(n), key=lambda j: (-vals[j], j))[:kk])
            for j in keep:
                out[bb, h, j] = True
    return out


SELECT = [
    # (B, Hq, Hkv, T, topk, sink, local, lens)
    (1, 1, 1, 1, 1, 0, 0, None),
    (3, 6, 2, 33, 3, 2, 4, [33, 7, 20]),
    (2, 8, 1, 129, 200, 0, 0, [129, 50]),  # topk > T keeps every valid token
    (3, 12, 4, 40, 2, 10, 35, [40, 12, 1]),  # sink and local overlap
    (2, 4, 4, 17, 0, 3, 3, None),
    (2, 6, 3, 25, [5, 1], 1, 2, [25, 9]),  # per-sequence topk
]


@pytest.mark.parametrize("case", SELECT, ids=["tiny", "g3-lens", "topk-gt-T", "overlap", "topk0", "per-seq-topk"])
def test_vq_select_matches_brute(case):
    b, hq, hkv, t, topk, sink, local, lens = case
    g = torch.Generator().manual_seed(11)
    scores = torch.randint(0, 5, (b, hq, t), generator=g).float()  # ties
    lens_t = None if lens is None else torch.tensor(lens, dtype=torch.int32)
    tk = torch.tensor(topk) if isinstance(topk, list) else topk
    m = R.vq_select(scores, topk=tk, sink=sink, local=local, num_kv_heads=hkv, seq_lens=lens_t)
    assert m.dtype == torch.bool and m.shape == (b, hkv, t)
    assert_equal("select", _brute_select(scores, topk, sink, local, hkv, lens or [t] * b), m)
    n = torch.tensor(lens or [t] * b)
    pos = torch.arange(t)
    assert not (m & (pos >= n[:, None])[:, None]).any()  # never past seq_lens
    must = (pos < torch.minimum(torch.tensor(sink), n)[:, None]) | ((pos >= n[:, None] - local) & (pos < n[:, None]))
    assert (m | ~must[:, None]).all()  # sinks and local always in


def test_vq_select_validation():
    s = torch.rand(2, 6, 10)
    with pytest.raises(ValueError, match="scores"):
        R.vq_select(s, topk=2, sink=1, local=1, num_kv_heads=4)
    with pytest.raises(ValueError, match="seq_lens"):
        R.vq_select(s, topk=2, sink=1, local=1, num_kv_heads=2, seq_lens=torch.tensor([3, 11]))
    with pytest.raises(ValueError, match="topk"):
        R.vq_select(s, topk=-1, sink=1, local=1, num_kv_heads=2)
    with pytest.raises(ValueError, match="local"):
        R.vq_select(s, topk=1, sink=1, local=-2, num_kv_heads=2)


def test_mask_to_indices():
    m = torch.zeros(2, 3, 9, dtype=torch.bool)
    m[0, 0, [1, 4, 8]] = True
    m[0, 2, [0]] = True
    m[1, 1] = True
    idx, cnt = R.mask_to_indices(m)
    assert idx.dtype == torch.int32 and cnt.dtype == torch.int32 and idx.shape == (2, 3, 9)
    assert cnt.tolist() == [[3, 0, 1], [0, 9, 0]]
    assert idx[0, 0].tolist() == [1, 4, 8] + [8] * 6
    assert idx[0, 2].tolist() == [0] * 9
    assert idx[1, 1].tolist() == list(range(9))
    assert idx[0, 1].tolist() == [0] * 9  # empty row
    idx0, cnt0 = R.mask_to_indices(torch.zeros(1, 2, 5, dtype=torch.bool))
    assert idx0.shape == (1, 2, 0) and cnt0.tolist() == [[0, 0]]


# ------------------------------------------------------------------------------------- sparse attention


@pytest.mark.parametrize("b, hq, hkv, tq, t, d, dv", [(1, 1, 1, 1, 1, 8, 8), (3, 6, 2, 1, 33, 16, 16),
                                                      (2, 8, 1, 3, 129, 8, 12), (3, 12, 4, 1, 40, 8, 8)],
                         ids=["tiny", "g3", "g8-tq3-dv", "g3-h4"])
def test_sparse_attention_matches_brute(b, hq, hkv, tq, t, d, dv):
    g = torch.Generator().manual_seed(12)
    q = torch.randn(b, hq, tq, d, generator=g)
    k, v = torch.randn(b, hkv, t, d, generator=g), torch.randn(b, hkv, t, dv, generator=g)
    m = torch.rand(b, hkv, t, generator=g) < 0.3
    m[..., -1] = True
    if b > 1:
        m[1, 0] = False  # a head with nothing selected
    idx, cnt = R.mask_to_indices(m)
    out = R.sparse_attention(q, k, v, idx, cnt)
    grp = hq // hkv
    ref = brute_attention(q, k, v, lambda bb, h, i: m[bb, h // grp].nonzero().flatten().tolist())
    assert out.shape == (b, hq, tq, dv)
    assert_close("sparse", ref, out, 1e-5)
    # everything selected, one decode query: plain causal attention
    idx, cnt = R.mask_to_indices(torch.ones(b, hkv, t, dtype=torch.bool))
    assert_close("dense", R.attention(q[:, :, -1:], k, v), R.sparse_attention(q[:, :, -1:], k, v, idx, cnt), 1e-6)
    with pytest.raises(ValueError, match="idx"):
        R.sparse_attention(q, k, v, idx + t, cnt)
    with pytest.raises(ValueError, match="count"):
        R.sparse_attention(q, k, v, idx, cnt + 1)


@pytest.mark.parametrize("bs", [16, 5], ids=["bs16", "bs5"])
def test_paged_sparse_attention_matches_dense(bs):
    hq, hkv, d, dv = 6, 2, 8, 12
    lens = [7, 33, 129]
    g = torch.Generator().manual_seed(13)
    ks = [torch.randn(hkv, n, d, generator=g) for n in lens]
    vs = [torch.randn(hkv, n, dv, generator=g) for n in lens]
    kc, table = to_pages(ks, bs, hkv, d, seed=3)
    vc, _ = to_pages(vs, bs, hkv, dv, seed=3)
    q = torch.randn(3, hq, d, generator=g)
    m = torch.zeros(3, hkv, max(lens), dtype=torch.bool)
    for b, n in enumerate(lens):
        m[b, :, :n] = torch.rand(hkv, n, generator=g) < 0.4
        m[b, :, n - 1] = True
    idx, cnt = R.mask_to_indices(m)
    out = R.paged_sparse_attention(q, kc, vc, table, idx, cnt)
    assert out.shape == (3, hq, dv)
    for b, n in enumerate(lens):
        ref = brute_attention(q[b:b + 1, :, None], ks[b][None], vs[b][None],
                              lambda bb, h, i: m[b, h // (hq // hkv)].nonzero().flatten().tolist())
        assert_close(f"paged sparse {b}", ref[0, :, 0], out[b], 1e-5)
    with pytest.raises(ValueError, match="idx"):
        R.paged_sparse_attention(q, kc, vc, table, idx + 10 ** 4, cnt)


@pytest.mark.parametrize("bs", [16, 5], ids=["bs16", "bs5"])
def test_paged_exact_topk_is_vq_select_over_exact_logits(bs):
    """The oracle baseline: A²ATS's selection rule over ``scale * q . k`` of each request's own keys
    (the paged cache's unused slots hold large garbage that must never be ranked)."""
    hq, hkv, d = 6, 2, 8
    lens = [7, 33, 129]
    g = torch.Generator().manual_seed(17)
    ks = [torch.randn(hkv, n, d, generator=g) for n in lens]
    kc, table = to_pages(ks, bs, hkv, d, seed=5)
    q = torch.randn(3, hq, d, generator=g)
    topk = torch.tensor([2, 5, 9])
    idx, cnt = R.paged_exact_topk(q, kc, table, torch.tensor(lens), topk=topk, sink=1, local=3, scale=0.5)
    for b, n in enumerate(lens):
        logits = torch.stack([0.5 * ks[b][h // 3] @ q[b, h] for h in range(hq)])[None]  # [1, Hq, n]
        mask = R.vq_select(logits, topk=int(topk[b]), sink=1, local=3, num_kv_heads=hkv)
        want_idx, want_cnt = R.mask_to_indices(mask)
        assert_equal(f"count {b}", want_cnt[0], cnt[b])
        for h in range(hkv):
            assert_equal(f"idx {b} {h}", want_idx[0, h, : want_cnt[0, h]], idx[b, h, : cnt[b, h]])
    # the top-2 of a query head are its two largest logits outside the always-kept tokens here
    top = torch.topk(ks[0][0] @ q[0, 0], 2).indices
    assert set(top.tolist()) <= set(idx[0, 0, : cnt[0, 0]].tolist())
    with pytest.raises(ValueError, match="head dim"):
        R.paged_exact_topk(q[..., :4], kc, table, torch.tensor(lens), topk=2, sink=0, local=1)


def test_distance_blocks_stay_bounded(monkeypatch):
    # kmeans and vq_encode never materialise more than _DIST_ELEMS distances at once.
    monkeypatch.setattr(VQ, "_DIST_ELEMS", 1000)
    seen = []
    addmm, matmul = torch.addmm, torch.matmul

    def rec_addmm(*a, **k):
        out = addmm(*a, **k)
        seen.append(out.numel())
        return out

    def rec_matmul(a, b):
        out = matmul(a, b)
        if out.dim() == 4 and out.shape[-1] == 50:  # the [B, Hkv, t, C] distance block
            seen.append(out.numel())
        return out

    monkeypatch.setattr(torch, "addmm", rec_addmm)
    monkeypatch.setattr(torch, "matmul", rec_matmul)
    x = torch.randn(3000, 4, generator=torch.Generator().manual_seed(14))
    c = CB.kmeans(x, 50, iters=2)
    R.vq_encode(x.reshape(2, 1, 1500, 4), c[None], torch.eye(4)[None])
    assert seen and max(seen) <= 1000


@pytest.mark.slow
def test_kmeans_64k_by_4096_memory():
    # N=64K, D=64, C=4096 in a fresh process: peak RSS stays far below the 1 GiB a full distance matrix needs.
    import subprocess
    import sys

    code = (
        "import resource, torch\n"
        "from kvcomp.calibrate.codebook import kmeans\n"
        "x = torch.randn(65536, 64)\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "c = kmeans(x, 4096, iters=1)\n"
        "assert c.shape == (4096, 64) and torch.isfinite(c).all()\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(res.stdout.strip().splitlines()[-1]) < 400  # MiB over the input


def test_paged_sparse_attention_ignores_nan_in_unselected_slots():
    import kvcomp.ref as R

    g = torch.Generator().manual_seed(5)
    k_cache = torch.full((4, 4, 2, 8), float("nan"))
    v_cache = torch.full((4, 4, 2, 8), float("nan"))
    k_cache[2, :3] = torch.randn(3, 2, 8, generator=g)
    v_cache[2, :3] = torch.randn(3, 2, 8, generator=g)
    bt = torch.tensor([[2, 0]], dtype=torch.int32)
    idx = torch.tensor([[[0, 2, 2], [1, 1, 1]]], dtype=torch.int32)
    count = torch.tensor([[2, 1]], dtype=torch.int32)
    q = torch.randn(1, 4, 8, generator=g)
    out = R.paged_sparse_attention(q, k_cache, v_cache, bt, idx, count)
    assert not torch.isnan(out).any()
    dense_k = k_cache[2, :3].permute(1, 0, 2)[None]
    dense_v = v_cache[2, :3].permute(1, 0, 2)[None]
    want = R.sparse_attention(q[:, :, None], dense_k, dense_v, idx, count)[:, :, 0]
    torch.testing.assert_close(out, want)
