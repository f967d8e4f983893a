"""KVCompLayer against a simulation over the full (uncompressed) KV history.

The simulation keeps every token and expresses each method by masking/zeroing; the layer under
test really drops/narrows/offloads storage. Equal outputs show the storage bookkeeping is exact;
the byte checks show the savings are real. The simulation scores and selects through the same
``kvcomp.ref`` functions as the layer, so it does not check the methods' definitions themselves
(a wrong GQA union or ThinK channel grouping in the references would pass here):
``test_cache_independent.py`` does, with everything written out.
"""

import pytest
import torch

from kvcomp import ref
from kvcomp.config import CompressionConfig, DuoAttention, ThinK, VQRetrieval
from kvcomp.hf.cache import KVCompLayer, RopeInfo
from kvcomp.ops.prefill import dense_prefill
from kvcomp.testing import assert_close

D = 16
SINK, RECENT, W = 3, 6, 4


def _setup(hkv, g, kinds, prune, topk=3):
    gen = torch.Generator().manual_seed(0)
    pattern = torch.tensor([[k == "streaming" for k in kinds]])
    vq_heads = torch.tensor([[k == "vq" for k in kinds]])
    kw = {}
    if pattern.any():
        kw["duo"] = DuoAttention(pattern=pattern, sink=SINK, recent=RECENT)
    if any(prune):
        # 16 - floor(0.6 * 16) = 7 kept channels, rounded up to 8 (a multiple of 4) with the next-best one
        kw["think"] = ThinK(prune_ratio=0.6, window=W, heads=torch.tensor([prune]), channel_multiple=4)
    if vq_heads.any():
        kw["vq"] = VQRetrieval(codebook=torch.randn(1, hkv, 12, D, generator=gen),
                               whiten=torch.eye(D).expand(1, hkv, D, D).clone(), topk=topk, sink=2, local=W,
                               heads=vq_heads)
    cfg = CompressionConfig(1, hkv, D, num_q_heads=hkv * g, **kw)
    rope = RopeInfo(1.0 / (10000 ** (torch.arange(0, D, 2).float() / D)))
    return cfg, rope


def _simulate(cfg, rope, qs, ks, vs, scale):
    """Expected outputs of every chunk, from the full history, per KV head."""
    outs = []
    b, hq = qs[0].shape[:2]
    hkv = ks[0].shape[1]
    g = hq // hkv
    kall = torch.cat(ks, 2)
    vall = torch.cat(vs, 2)
    t0 = ks[0].shape[2]
    chans = {}
    for h in range(hkv):
        if cfg.prune[0, h]:
            sc = ref.think_channel_scores(qs[0][:, h * g:(h + 1) * g, -W:], ks[0][:, h:h + 1])
            chans[h] = ref.think_keep_channels(sc, cfg.think.prune_ratio, cfg.think.channel_multiple)
    seen = 0
    for q in qs:
        tq = q.shape[2]
        k, v = kall[:, :, : seen + tq], vall[:, :, : seen + tq]
        if seen == 0:  # prompt: exact, except streaming heads (sink + recent in prefill too)
            o = dense_prefill(q, k, v, scale=scale).clone()
            for h in range(hkv):
                if cfg.policy(0, h).kind == "streaming":
                    o[:, h * g:(h + 1) * g] = ref.streaming_attention(q[:, h * g:(h + 1) * g], k[:, h:h + 1],
                                                                      v[:, h:h + 1], sink=SINK, window=RECENT,
                                                                      scale=scale)
            outs.append(o)
            seen += tq
            continue
        o = torch.empty_like(q)
        for h in range(hkv):
            qh = q[:, h * g:(h + 1) * g]
            kh, vh = k[:, h:h + 1], v[:, h:h + 1]
            pol = cfg.policy(0, h)
            if pol.prune_keys:  # keys older than the full-width window lose their pruned channels
                keep = torch.zeros(b, 1, 1, D, dtype=torch.bool).scatter_(3, chans[h][:, :, None, :], True)
                old = (torch.arange(seen + tq) < seen - W)[None, None, :, None]
                kh = torch.where(old & ~keep, torch.zeros_like(kh), kh)
            if pol.kind == "streaming":
                o[:, h * g:(h + 1) * g] = ref.streaming_attention(qh, kh, vh, sink=SINK, window=RECENT, scale=scale)
            elif pol.kind == "vq" and tq == 1:
                pos = torch.arange(seen + tq)
                cos, sin = rope.cos_sin(pos, "cpu")
                codes = ref.vq_encode(ref.unapply_rope(k[:, h:h + 1], cos, sin), cfg.vq.codebook[0, h:h + 1],
                                      cfg.vq.whiten[0, h:h + 1])
                qc, qsn = rope.cos_sin(pos[-1:], "cpu")
                qw = ref.windowed_rope_query(ref.unapply_rope(qh, qc, qsn)[:, :, 0], rope.inv_freq, cfg.vq.rel_pos)
                scores = ref.vq_scores(ref.vq_lut(qw, cfg.vq.codebook[0, h:h + 1], scale=scale), codes)
                mask = ref.vq_select(scores, topk=cfg.vq.topk_tokens(seen + tq), sink=cfg.vq.sink,
                                     local=cfg.vq.local, num_kv_heads=1)
                idx, cnt = ref.mask_to_indices(mask)
                o[:, h * g:(h + 1) * g] = ref.sparse_attention(qh, kh, vh, idx, cnt, scale=scale)
            else:
                o[:, h * g:(h + 1) * g] = ref.attention(qh, kh, vh, scale=scale)
        outs.append(o)
        seen += tq
    return outs


CASES = {
    "duo-gqa4": (2, 4, ["streaming", "full"], [False, False]),
    "think-gqa3": (2, 3, ["full", "full"], [True, False]),
    "vq-gqa1": (2, 1, ["vq", "full"], [False, False]),
    "vq-think": (1, 4, ["vq"], [True]),
    "all-mixed": (4, 3, ["streaming", "vq", "full", "full"], [False, True, True, False]),
}


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("prefill", [2, 37])
def test_layer_matches_full_history_simulation(case, batch, prefill):
    hkv, g, kinds, prune = CASES[case]
    cfg, rope = _setup(hkv, g, kinds, prune)
    gen = torch.Generator().manual_seed(1)
    chunks = [prefill, 1, 1, 3, 1, 1, 1, 1, 1, 1, 1, 1]
    qs = [torch.randn(batch, hkv * g, t, D, generator=gen) for t in chunks]
    ks = [torch.randn(batch, hkv, t, D, generator=gen) for t in chunks]
    vs = [torch.randn(batch, hkv, t, D, generator=gen) for t in chunks]
    scale = D ** -0.5
    layer = KVCompLayer(cfg, 0, rope)
    expected = _simulate(cfg, rope, qs, ks, vs, scale)
    for i, (q, k, v) in enumerate(zip(qs, ks, vs)):
        layer.update(k, v)
        out = layer.attend(q, scale)
        assert_close(f"{case} chunk {i}", expected[i], out, 1e-5)
    assert layer.get_seq_length() == sum(chunks)
    _check_bytes(layer, cfg, batch, sum(chunks))


def _check_bytes(layer, cfg, b, t):
    """Allocated bytes equal what each group must hold, computed from the policy alone (the pages of
    kvcomp's method objects: one block of exactly ``t`` tokens per sequence, no slack)."""
    groups = cfg.layer_groups(0)
    f = 4  # fp32
    kd = cfg.think.kept_dim(D) if cfg.think else D
    expect_dev = len(groups["full"]) * 2 * t * D * f
    ns = len(groups["streaming"])
    if ns:
        kept = min(t, SINK + RECENT)  # the ring: sink + the recent window (counting the next query's slot)
        expect_dev += ns * 2 * kept * D * f
    nt = len(groups["think"])
    expect_dev += nt * (t * kd + W * D + t * D) * f + nt * kd * 8  # narrow pages + window ring + int64 channels
    nv = len(groups["vq"]) + len(groups["vq_think"])
    expect_dev += nv * t * 2  # int16 codes
    got = {"device": 0, "host": 0}
    from kvcomp.hf.cache import tensor_bytes

    got = tensor_bytes(layer.tensors())
    assert got["device"] == b * expect_dev
    nvt = len(groups["vq_think"])
    host = b * (len(groups["vq"]) * 2 * t * D + nvt * (t * kd + W * D + t * D)) * f + b * nvt * kd * 8
    assert got["host"] == host


@pytest.mark.parametrize("d, kept", [(64, 48), (128, 80), (256, 160)])
def test_think_layer_bytes_per_token_at_its_stored_width(d, kept):
    """λ = 0.4 keeps D - floor(0.4 D) channels rounded up to 16: a ThinK layer's allocated tensors grow by
    ``kept`` key + ``d`` value elements per KV head and token (two lengths: the ring and channel ids cancel)."""
    from kvcomp.hf.cache import tensor_bytes

    hkv, g = 2, 2
    cfg = CompressionConfig(1, hkv, d, num_q_heads=hkv * g, think=ThinK(prune_ratio=0.4, window=W))
    assert cfg.think.kept_dim(d) == kept
    rope = RopeInfo(1.0 / (10000 ** (torch.arange(0, d, 2).float() / d)))
    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, h, 40, d, generator=gen) for h in (hkv * g, hkv, hkv))

    def held(t):
        layer = KVCompLayer(cfg, 0, rope)
        layer.update(k[:, :, :t], v[:, :, :t])
        layer.attend(q[:, :, :t], d ** -0.5)
        assert layer.split.methods()[0].channels(layer.split.stores[0]).shape[-1] == kept
        return tensor_bytes(layer.tensors())["device"]

    assert held(40) - held(24) == 16 * hkv * (kept + d) * 4


def test_vq_topk_covering_everything_is_exact_attention():
    cfg, rope = _setup(2, 3, ["vq", "vq"], [False, False], topk=10_000)
    gen = torch.Generator().manual_seed(2)
    layer = KVCompLayer(cfg, 0, rope)
    k = torch.randn(1, 2, 50, D, generator=gen)
    v = torch.randn(1, 2, 50, D, generator=gen)
    layer.update(k[:, :, :49], v[:, :, :49])
    layer.attend(torch.randn(1, 6, 49, D, generator=gen), D ** -0.5)
    q = torch.randn(1, 6, 1, D, generator=gen)
    layer.update(k[:, :, 49:], v[:, :, 49:])
    assert_close("vq all", ref.attention(q, k, v), layer.attend(q, D ** -0.5), 1e-5)
    assert float(layer.split.methods()[0].last_selected) == 1.0


def test_vq_oracle_select_ranks_exact_logits():
    """``select="oracle"`` attends to the tokens the exact logits rank first (same sink / local /
    GQA-union rules); the codes' selection of the same budget differs on these random keys."""
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(1, 2, 50, D, generator=gen)
    v = torch.randn(1, 2, 50, D, generator=gen)
    qp = torch.randn(1, 6, 49, D, generator=gen)
    q = torch.randn(1, 6, 1, D, generator=gen)
    outs = {}
    for select in ("codes", "oracle"):
        cfg, rope = _setup(2, 3, ["vq", "vq"], [False, False], topk=3)
        cfg.vq.select = select
        layer = KVCompLayer(cfg, 0, rope)
        layer.update(k[:, :, :49], v[:, :, :49])
        layer.attend(qp, D ** -0.5)
        layer.update(k[:, :, 49:], v[:, :, 49:])
        outs[select] = layer.attend(q, D ** -0.5)
    logits = torch.matmul(q[:, :, 0].view(1, 2, 3, D), k.transpose(2, 3)).view(1, 6, 50) * D ** -0.5
    idx, cnt = ref.mask_to_indices(ref.vq_select(logits, topk=3, sink=2, local=W, num_kv_heads=2))
    assert_close("oracle", ref.sparse_attention(q, k, v, idx, cnt), outs["oracle"], 1e-5)
    assert (outs["oracle"] - outs["codes"]).abs().max() > 1e-3


def test_vq_oracle_select_is_refused_where_it_is_not_a_baseline():
    cfg, _ = _setup(2, 3, ["vq", "vq"], [False, False])
    with pytest.raises(ValueError, match="select"):
        VQRetrieval(codebook=cfg.vq.codebook, whiten=cfg.vq.whiten, select="exact")
    with pytest.raises(ValueError, match="select"):
        _setup_pruned_oracle()


def _setup_pruned_oracle():
    vq = VQRetrieval(codebook=torch.randn(1, 2, 12, D), whiten=torch.eye(D).expand(1, 2, D, D).clone(), topk=3,
                     local=W, select="oracle")
    return CompressionConfig(1, 2, D, num_q_heads=6, think=ThinK(prune_ratio=0.5, window=W), vq=vq)


def test_update_without_attend_is_an_error():
    cfg, rope = _setup(1, 1, ["full"], [False])
    layer = KVCompLayer(cfg, 0, rope)
    k = torch.randn(1, 1, 4, D)
    layer.update(k, k)
    with pytest.raises(RuntimeError, match="attn_implementation='kvcomp'"):
        layer.update(k, k)
