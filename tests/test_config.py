import pytest
import torch

from kvcomp.config import CompressionConfig, ConfigError, DuoAttention, ThinK, VQRetrieval
from kvcomp.patterns import read_pattern_tsv, threshold_pattern, write_pattern_tsv

L, H, D = 3, 4, 16


def _vq(**kw):
    g = torch.Generator().manual_seed(0)
    return VQRetrieval(codebook=torch.randn(L, H, 8, D, generator=g), whiten=torch.eye(D).expand(L, H, D, D).clone(), **kw)


def test_duo_attention_tsv_format_loads(tmp_path):
    # duo-attention's published files: one row per layer, tab-separated gates, tiny negatives
    p = tmp_path / "full_attention_heads.tsv"
    p.write_text("1.0\t-1.2e-07\t0.5\t0.25\n0.9\t0.1\t0.0\t0.7\n0.3\t0.8\t0.6\t0.05\n")
    a = read_pattern_tsv(p)
    assert a.shape == (L, H) and a.min() == 0.0
    duo = DuoAttention.from_tsv(p, sparsity=0.5)
    assert int(duo.pattern.sum()) == 6
    # the lowest gates stream
    assert duo.pattern[0, 1] and duo.pattern[1, 2] and not duo.pattern[0, 0] and not duo.pattern[1, 0]
    cfg = CompressionConfig(L, H, D, duo=duo)
    assert sum(r.count("streaming") for r in cfg.kinds) == 6


def test_pattern_roundtrip_and_threshold(tmp_path):
    a = torch.rand(5, 7)
    write_pattern_tsv(tmp_path / "x.tsv", a)
    assert torch.allclose(read_pattern_tsv(tmp_path / "x.tsv"), a)
    for s in (0.0, 0.25, 0.5, 1.0):
        assert int(threshold_pattern(a, s).sum()) == round(s * 35)
    tied = torch.ones(4, 4)
    assert int(threshold_pattern(tied, 0.5).sum()) == 8


def test_policy_grid_composes_per_head():
    pat = torch.zeros(L, H, dtype=torch.bool)
    pat[:, 0] = True
    vq_heads = torch.zeros(L, H, dtype=torch.bool)
    vq_heads[:, 1] = True
    think_heads = torch.zeros(L, H, dtype=torch.bool)
    think_heads[:, 1:3] = True
    cfg = CompressionConfig(L, H, D, duo=DuoAttention(pattern=pat), think=ThinK(heads=think_heads, window=8),
                            vq=_vq(heads=vq_heads))
    assert cfg.policy(0, 0).kind == "streaming"
    assert cfg.policy(0, 1).kind == "vq" and cfg.policy(0, 1).prune_keys
    assert cfg.policy(0, 2).kind == "full" and cfg.policy(0, 2).prune_keys
    assert cfg.policy(0, 3).kind == "full" and not cfg.policy(0, 3).prune_keys
    assert cfg.layer_groups(1) == {"full": [3], "think": [2], "streaming": [0], "vq": [], "vq_think": [1],
                                   "window": []}


@pytest.mark.parametrize("make,field", [
    (lambda: CompressionConfig(L, H, D, duo=DuoAttention(pattern=torch.zeros(L, H + 1, dtype=torch.bool))), "duo.pattern"),
    (lambda: CompressionConfig(L, H, D, duo=DuoAttention(pattern=torch.zeros(L, H))), "duo.pattern"),
    (lambda: CompressionConfig(L, H, D, think=ThinK(prune_ratio=1.0)), "think.prune_ratio"),
    (lambda: CompressionConfig(L, H, D, think=ThinK(prune_ratio=-0.1)), "think.prune_ratio"),
    (lambda: CompressionConfig(L, H, 15), "head_dim"),
    (lambda: CompressionConfig(L, H, 512), "head_dim"),
    (lambda: CompressionConfig(L, H, D, num_q_heads=6), "num_q_heads"),
    (lambda: CompressionConfig(L, H, D, vq=VQRetrieval(codebook=torch.zeros(L, H, 8, D + 2), whiten=torch.zeros(L, H, D, D))), "vq.codebook"),
    (lambda: CompressionConfig(L, H, D, vq=_vq(topk=1.5)), "vq.topk"),
    (lambda: CompressionConfig(L, H, D, think=ThinK(channels=torch.zeros(L, H, 3, dtype=torch.long))), "think.channels"),
    (lambda: CompressionConfig(L, H, D, duo=DuoAttention(pattern=torch.ones(L, H, dtype=torch.bool)),
                               think=ThinK(heads=torch.ones(L, H, dtype=torch.bool))), "think.heads"),
    (lambda: CompressionConfig(L, H, D, think=ThinK(window=64), vq=_vq(local=16)), "vq.local"),
])
def test_bad_configs_name_the_field(make, field):
    with pytest.raises(ConfigError) as e:
        make()
    assert e.value.field == field
    assert str(e.value).startswith(field)


def test_save_load_roundtrip(tmp_path):
    g = torch.Generator().manual_seed(1)
    alphas = torch.rand(L, H, generator=g)
    kd = 12  # 16 - floor(0.4 * 16) = 10, rounded up to a multiple of 4
    ch = torch.stack([torch.randperm(D, generator=g)[:kd].sort().values for _ in range(L * H)]).view(L, H, kd)
    cfg = CompressionConfig(L, H, D, num_q_heads=8, duo=DuoAttention.from_alphas(alphas, 0.25, sink=4, recent=16),
                            think=ThinK(prune_ratio=0.4, window=8, channels=ch, channel_multiple=4),
                            vq=_vq(topk=5, local=8))
    cfg.save(tmp_path / "c")
    back = CompressionConfig.load(tmp_path / "c")
    assert torch.equal(back.duo.pattern, cfg.duo.pattern) and back.duo.sink == 4 and back.duo.recent == 16
    assert torch.allclose(back.duo.alphas, alphas)
    assert torch.equal(back.think.channels, ch) and back.think.window == 8 and back.think.channel_multiple == 4
    assert torch.equal(back.vq.codebook, cfg.vq.codebook) and torch.equal(back.vq.whiten, cfg.vq.whiten)
    assert back.vq.topk == 5 and back.kinds == cfg.kinds and torch.equal(back.prune, cfg.prune)
    with pytest.raises(ConfigError):
        CompressionConfig.load(tmp_path / "missing")


def test_config_saved_before_channel_rounding_loads_unrounded(tmp_path):
    """A config.json without ``channel_multiple`` (saved before ThinK rounded its kept count) loads with
    multiple 1, so its static channels keep their width (10 of 16 at λ = 0.4)."""
    import json

    ch = torch.arange(10).expand(L, H, 10).clone()
    CompressionConfig(L, H, D, think=ThinK(prune_ratio=0.4, channels=ch, channel_multiple=1)).save(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    del meta["think"]["channel_multiple"]
    (tmp_path / "config.json").write_text(json.dumps(meta))
    back = CompressionConfig.load(tmp_path)
    assert back.think.channel_multiple == 1 and torch.equal(back.think.channels, ch)
    assert ThinK(prune_ratio=0.4).kept_dim(D) == 16 and ThinK(prune_ratio=0.4).kept_dim(128) == 80


def test_threshold_pattern_per_layer():
    from kvcomp.patterns import threshold_pattern_per_layer

    a = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.2, 0.8], [0.0, 1.0, 1.0]])
    m = threshold_pattern_per_layer(a, 0.5)  # floor(1.5) = 1 streaming head per layer
    assert m.tolist() == [[False, True, False], [True, False, False], [True, False, False]]
    assert threshold_pattern_per_layer(a, 0.7).sum(dim=1).tolist() == [2, 2, 2]
    assert threshold_pattern_per_layer(a, 0.0).sum(dim=1).tolist() == [1, 1, 1]  # at least one
    assert threshold_pattern_per_layer(a, 1.0).sum(dim=1).tolist() == [2, 2, 2]  # never all
    with pytest.raises(ValueError):
        threshold_pattern_per_layer(a[:, :1], 0.5)


@pytest.mark.parametrize("make,field", [
    (lambda: DuoAttention(pattern=torch.zeros(L, H, dtype=torch.bool), sink=2.5), "duo.sink"),
    (lambda: DuoAttention(pattern=torch.zeros(L, H, dtype=torch.bool), recent=16.7), "duo.recent"),
    (lambda: DuoAttention(pattern=torch.zeros(L, H, dtype=torch.bool), sink=True), "duo.sink"),
    (lambda: DuoAttention(pattern=torch.zeros(L, H, dtype=torch.bool), sink=-1), "duo.sink"),
    (lambda: DuoAttention(pattern=torch.zeros(L, H, dtype=torch.bool), recent=0), "duo.recent"),
    (lambda: DuoAttention(pattern=torch.zeros(L, H, dtype=torch.bool), recent="256"), "duo.recent"),
    (lambda: DuoAttention.from_alphas(torch.rand(L, H), sparsity="0.5"), "duo.sparsity"),
    (lambda: DuoAttention.from_alphas(torch.rand(L, H), sparsity=1.5), "duo.sparsity"),
    (lambda: ThinK(window=3.5), "think.window"),
    (lambda: ThinK(window=0), "think.window"),
    (lambda: ThinK(window=False), "think.window"),
    (lambda: ThinK(prune_ratio="0.4"), "think.prune_ratio"),
    (lambda: ThinK(prune_ratio=True), "think.prune_ratio"),
    (lambda: ThinK(prune_ratio=float("nan")), "think.prune_ratio"),
    (lambda: ThinK(channel_multiple=0), "think.channel_multiple"),
    (lambda: ThinK(channel_multiple=16.0), "think.channel_multiple"),
    (lambda: _vq(topk="0.1"), "vq.topk"),
    (lambda: _vq(topk=True), "vq.topk"),
    (lambda: _vq(topk=0), "vq.topk"),
    (lambda: _vq(topk=12.5), "vq.topk"),
    (lambda: _vq(sink=1.5), "vq.sink"),
    (lambda: _vq(sink=-1), "vq.sink"),
    (lambda: _vq(local=0), "vq.local"),
    (lambda: _vq(local=64.0), "vq.local"),
    (lambda: _vq(rel_pos=2048.5), "vq.rel_pos"),
    (lambda: _vq(rel_pos=-1), "vq.rel_pos"),
    (lambda: VQRetrieval(codebook=[[0.0]], whiten=torch.zeros(1)), "vq.codebook"),
    (lambda: CompressionConfig(L, H, float(D)), "head_dim"),
    (lambda: CompressionConfig(True, H, D), "num_layers"),
    (lambda: CompressionConfig(L, H, D, num_q_heads=8.0), "num_q_heads"),
    (lambda: CompressionConfig(L, H, D, num_q_heads=0), "num_q_heads"),
])
def test_bad_fields_raise_at_construction(make, field):
    # a float/str/bool where an int or a ratio belongs is refused when the object is built,
    # not ~30 frames deep in generate (slice indices must be integers)
    with pytest.raises(ConfigError) as e:
        make()
    assert e.value.field == field


def test_fields_changed_after_construction_are_checked_by_the_config():
    duo = DuoAttention(pattern=torch.zeros(L, H, dtype=torch.bool))
    duo.recent = 16.7
    with pytest.raises(ConfigError, match="duo.recent"):
        CompressionConfig(L, H, D, duo=duo)


def test_integral_fields_accept_numpy_ints():
    np = pytest.importorskip("numpy")
    cfg = CompressionConfig(L, H, D, duo=DuoAttention(pattern=torch.zeros(L, H, dtype=torch.bool),
                                                      sink=np.int64(4), recent=np.int32(16)),
                            think=ThinK(prune_ratio=np.float32(0.25), window=np.int64(8)))
    assert type(cfg.duo.sink) is int and cfg.duo.sink == 4 and type(cfg.think.window) is int and cfg.think.window == 8
