import math

import pytest
import torch
from ref_brute import brute_attention

import kvcomp.ref as R
from kvcomp.testing import assert_close, assert_equal


@pytest.mark.parametrize("b, hq, hkv, tobs, t, d", [(1, 1, 1, 1, 1, 4), (3, 6, 2, 7, 33, 16), (2, 8, 1, 32, 129, 8),
                                                    (1, 12, 4, 5, 7, 64)],
                         ids=["tiny", "g3", "g8", "g3-d64"])
def test_channel_scores_frobenius_identity(b, hq, hkv, tobs, t, d):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(b, hq, tobs, d, generator=g)
    k = torch.randn(b, hkv, t, d, generator=g) * torch.linspace(0.1, 3, d)
    s = R.think_channel_scores(q, k)
    assert s.shape == (b, hkv, d) and s.dtype == torch.float32
    grp = hq // hkv
    ref = torch.zeros(b, hkv, d, dtype=torch.float64)
    for bb in range(b):
        for h in range(hkv):
            for c in range(d):
                kc = k[bb, h, :, c:c + 1].double()  # [T, 1]
                for hh in range(h * grp, (h + 1) * grp):
                    qc = q[bb, hh, :, c:c + 1].double()  # [Tobs, 1]
                    ref[bb, h, c] += torch.linalg.matrix_norm(qc @ kc.T) ** 2 / (tobs * t)
    assert_close("think scores", ref, s, 1e-5)


@pytest.mark.parametrize("multiple", [1, 16], ids=lambda m: f"m{m}")
@pytest.mark.parametrize("ratio", [0.0, 0.4, 0.5, 0.29, 0.99], ids=lambda r: f"r{r}")
@pytest.mark.parametrize("d", [7, 64, 128], ids=lambda d: f"D{d}")
def test_keep_channels_count_order_and_ties(ratio, d, multiple):
    g = torch.Generator().manual_seed(1)
    s = torch.randint(0, 4, (2, 3, d), generator=g).float()  # many ties
    idx = R.think_keep_channels(s, ratio, multiple)
    keep = min(d, math.ceil((d - math.floor(ratio * d)) / multiple) * multiple)
    assert idx.shape == (2, 3, keep) and idx.dtype == torch.int64
    for b in range(2):
        for h in range(3):
            vals = s[b, h].tolist()
            want = sorted(sorted(range(d), key=lambda c: (-vals[c], c))[:keep])
            assert idx[b, h].tolist() == want


def test_kept_dim_rounds_up_to_whole_16_channel_vectors():
    assert [R.think_kept_dim(d, 0.4) for d in (64, 128, 256)] == [48, 80, 160]  # pruned 25%, 37.5%, 37.5%
    assert [R.think_kept_dim(d, 0.4, 1) for d in (64, 128, 256)] == [39, 77, 154]
    assert R.think_kept_dim(128, 0.0) == 128 and R.think_kept_dim(128, 0.99) == 16
    assert R.think_kept_dim(24, 0.25) == 24 and R.think_kept_dim(7, 0.4) == 7  # capped at D
    assert R.think_kept_dim(128, 0.4, 32) == 96
    for bad in (0, True, 1.5):
        with pytest.raises(ValueError, match="multiple"):
            R.think_kept_dim(128, 0.4, bad)


def test_rounded_up_channels_are_the_next_best_by_score():
    """The slots added by rounding 77 up to 80 hold the channels ranked 78-80: real channels, no padding."""
    s = torch.rand(2, 3, 128, generator=torch.Generator().manual_seed(4))
    exact, wide = R.think_keep_channels(s, 0.4, 1), R.think_keep_channels(s, 0.4)
    assert exact.shape[-1] == 77 and wide.shape[-1] == 80
    for b in range(2):
        for h in range(3):
            order = s[b, h].argsort(descending=True).tolist()
            assert set(wide[b, h].tolist()) == set(order[:80])
            assert set(wide[b, h].tolist()) - set(exact[b, h].tolist()) == set(order[77:80])


def test_keep_channels_validation():
    s = torch.rand(1, 2, 8)
    for bad in (1.0, -0.1, 2):
        with pytest.raises(ValueError, match="prune_ratio"):
            R.think_keep_channels(s, bad)
    with pytest.raises(ValueError, match="scores"):
        R.think_keep_channels(torch.full((1, 1, 4), float("nan")), 0.5)
    with pytest.raises(ValueError, match="q_obs"):
        R.think_channel_scores(torch.randn(1, 3, 2, 8), torch.randn(1, 2, 5, 8))


def test_pack_pruned_keys_gathers_channels():
    g = torch.Generator().manual_seed(2)
    k = torch.randn(2, 3, 9, 16, generator=g)
    idx = R.think_keep_channels(torch.rand(2, 3, 16, generator=g), 0.4, 1)  # 10 of 16
    kp = R.pack_pruned_keys(k, idx)
    assert kp.shape == (2, 3, 9, idx.shape[-1])
    for b in range(2):
        for h in range(3):
            assert_equal("pack", k[b, h][:, idx[b, h]], kp[b, h])
    with pytest.raises(ValueError, match="idx"):
        R.pack_pruned_keys(k, idx + 16)


# (B, Hq, Hkv, Tq, T_p, T_f, D, Dv, ratio)
PRUNED = [
    (1, 1, 1, 1, 1, 1, 8, 8, 0.5),
    (3, 6, 2, 1, 33, 7, 16, 16, 0.4),
    (2, 8, 1, 7, 20, 13, 16, 24, 0.25),
    (1, 12, 4, 33, 0, 33, 8, 8, 0.4),
    (2, 4, 4, 5, 40, 0, 8, 8, 0.4),
]


@pytest.mark.parametrize("case", PRUNED, ids=["B{}-Hq{}-Hkv{}-Tq{}-Tp{}-Tf{}-D{}-Dv{}-r{}".format(*c) for c in PRUNED])
def test_pruned_key_attention_matches_brute(case):
    b, hq, hkv, tq, tp, tf, d, dv, ratio = case
    g = torch.Generator().manual_seed(3)
    q = torch.randn(b, hq, tq, d, generator=g)
    k = torch.randn(b, hkv, tp + tf, d, generator=g)
    v = torch.randn(b, hkv, tp + tf, dv, generator=g)
    idx = R.think_keep_channels(torch.rand(b, hkv, d, generator=g), ratio, 1)  # D <= 24: unrounded
    kp = R.pack_pruned_keys(k[:, :, :tp], idx)
    out = R.pruned_key_attention(q, kp, idx, k[:, :, tp:], v)
    # brute: zero the pruned channels of the first T_p keys; the scale stays 1/sqrt(D)
    kz = k.clone()
    for bb in range(b):
        for h in range(hkv):
            drop = [c for c in range(d) if c not in idx[bb, h].tolist()]
            kz[bb, h, :tp, drop] = 0.0
    t = tp + tf
    ref = brute_attention(q, kz, v, lambda bb, h, i: [j for j in range(t) if j <= t - tq + i])
    assert out.shape == (b, hq, tq, dv)
    assert_close("pruned attention", ref, out, 1e-5)


def test_pruned_key_attention_without_pruning_is_attention():
    g = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(2, 6, 4, 8, generator=g), torch.randn(2, 3, 11, 8, generator=g), torch.randn(2, 3, 11, 8, generator=g)
    idx = torch.arange(8).expand(2, 3, 8)
    out = R.pruned_key_attention(q, k[:, :, :6], idx, k[:, :, 6:], v)
    assert_close("no pruning", R.attention(q, k, v), out, 1e-6)
    with pytest.raises(ValueError, match="chan_idx"):
        R.pruned_key_attention(q, k[:, :, :6, :4], idx[..., :4] + 7, k[:, :, 6:], v)
    with pytest.raises(ValueError, match="v"):
        R.pruned_key_attention(q, k[:, :, :6], idx, k[:, :, 6:], v[:, :, :5])
