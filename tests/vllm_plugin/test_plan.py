"""The vLLM plugin's serving plan and registration guards (no vLLM needed)."""

from __future__ import annotations

import pytest
import torch

from kvcomp.config import CompressionConfig, DuoAttention, ThinK
from kvcomp.vllm_plugin import ENV_CONFIG, ENV_OVERRIDE_CPU, register
from kvcomp.vllm_plugin.plan import Plan, kv_head_range, layer_index, load_plan, plan_from_config, plan_from_env


def _channels(L=2, H=2, D=64, keep=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    # deliberately unsorted: the plan sorts them
    return torch.stack([torch.stack([torch.randperm(D, generator=g)[:keep] for _ in range(H)]) for _ in range(L)])


def _cfg(**kw):
    return CompressionConfig(num_layers=2, num_kv_heads=2, head_dim=64, num_q_heads=4, **kw)


def test_no_config_is_off(monkeypatch):
    monkeypatch.delenv(ENV_CONFIG, raising=False)
    p = plan_from_env()
    assert p.method == "off" and p.key_dim is None and p.layer_channels(0, 0, 2) is None
    assert load_plan("") == Plan() and load_plan(None) == Plan()


def test_think_static_channels_roundtrip(tmp_path):
    ch = _channels()
    _cfg(think=ThinK(prune_ratio=0.25, channels=ch)).save(tmp_path / "c")
    for path in (tmp_path / "c", tmp_path / "c" / "config.json"):
        p = load_plan(path)
        assert p.method == "think" and p.key_dim == 48
        got = p.layer_channels(1, 1, 2)
        assert got.shape == (1, 48)
        assert torch.equal(got[0], ch[1, 1].sort().values)
        assert bool((p.think_channels.diff(dim=-1) > 0).all())


def test_think_query_driven_plan():
    p = plan_from_config(_cfg(think=ThinK(prune_ratio=0.25, window=16)))
    assert p.method == "think" and p.key_dim == 48 and p.per_request_channels
    assert p.think_prune_ratio == 0.25 and p.think_window == 16 and p.layer_channels(0, 0, 2) is None
    assert not plan_from_config(_cfg(think=ThinK(prune_ratio=0.25, channels=_channels()))).per_request_channels


def test_think_errors():
    heads = torch.tensor([[True, False], [True, True]])
    with pytest.raises(ValueError, match="prune every"):
        plan_from_config(_cfg(think=ThinK(prune_ratio=0.25, heads=heads, channels=_channels())))
    p = plan_from_config(_cfg(think=ThinK(prune_ratio=0.25, channels=_channels())))
    with pytest.raises(ValueError, match="layer"):
        p.layer_channels(2, 0, 1)
    with pytest.raises(ValueError, match="head range"):
        p.layer_channels(0, 1, 3)
    with pytest.raises(ValueError, match="head_dim 64 != model head_size 128"):
        p.check_model(128)
    with pytest.raises(ValueError, match="num_kv_heads 2 != model num_kv_heads 4"):
        p.check_model(64, 4)


def test_duo_plan_and_refusals(tmp_path):
    _cfg(duo=DuoAttention(pattern=torch.tensor([[False, True], [True, False]]), sink=4, recent=8)).save(tmp_path / "d")
    p = load_plan(tmp_path / "d")
    assert p.method == "duo" and p.num_streaming == 1 and (p.sink, p.recent) == (4, 8)
    assert p.layer_heads(0) == ([0], [1]) and p.layer_heads(1) == ([1], [0])
    with pytest.raises(ValueError, match="layer"):
        p.layer_heads(2)
    # the globally thresholded pattern: served alone, one page per layer; not with ThinK, not sharded
    uneven = DuoAttention(pattern=torch.tensor([[True, True], [False, False]]))
    g = plan_from_config(_cfg(duo=uneven))
    assert g.streaming_per_layer and not p.streaming_per_layer
    assert [g.layer_num_streaming(l, 2, 0, 1) for l in (0, 1)] == [2, 0] and p.layer_num_streaming(1, 2, 0, 1) == 1
    with pytest.raises(ValueError, match="tensor parallel size 1 only.*--duo-threshold layer"):
        g.layer_num_streaming(0, 1, 0, 2)
    with pytest.raises(ValueError, match="served alone.*--duo-threshold layer"):
        plan_from_config(_cfg(duo=uneven, think=ThinK(prune_ratio=0.25, channels=_channels())))
    all_streaming = DuoAttention(pattern=torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="2 streaming heads in every layer of 2: nothing to split"):
        plan_from_config(_cfg(duo=all_streaming))
    pat = torch.tensor([[False, True], [True, False]])
    both = plan_from_config(_cfg(duo=DuoAttention(pattern=pat), think=ThinK(prune_ratio=0.25, channels=_channels())))
    assert both.method == "duo+think" and both.key_dim == 48 and both.num_streaming == 1
    partial = _cfg(duo=DuoAttention(pattern=pat), think=ThinK(prune_ratio=0.25, heads=torch.tensor(
        [[True, False], [False, False]]), channels=_channels()))
    with pytest.raises(ValueError, match="prune every retrieval"):
        plan_from_config(partial)


def test_unserved_methods_refused(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        load_plan(tmp_path / "missing")
    assert Plan().layer_heads(0) == ([], []) and Plan(num_kv_heads=2).layer_heads(5) == ([0, 1], [])


def test_layer_index_and_tp_head_ranges():
    assert layer_index("model.layers.17.self_attn.attn") == 17
    with pytest.raises(ValueError, match="layer_name"):
        layer_index("lm_head")
    assert kv_head_range(8, 8, 0, 1) == (0, 8)
    assert kv_head_range(2, 8, 3, 4) == (6, 8)
    assert kv_head_range(1, 2, 3, 4) == (1, 2)  # 2 KV heads replicated over 4 ranks
    with pytest.raises(ValueError, match="rank"):
        kv_head_range(2, 8, 4, 4)
    with pytest.raises(ValueError, match="num_kv_heads_local"):
        kv_head_range(3, 8, 0, 4)


def test_register_rejects_bad_override(monkeypatch):
    monkeypatch.setenv(ENV_OVERRIDE_CPU, "yes")
    with pytest.raises(ValueError, match=ENV_OVERRIDE_CPU):
        register()


def _vq(**kw):
    from kvcomp.config import VQRetrieval

    g = torch.Generator().manual_seed(0)
    return VQRetrieval(codebook=torch.randn(2, 2, 16, 64, generator=g), whiten=torch.eye(64).expand(2, 2, 64, 64),
                       **kw)


def test_vq_plan(tmp_path):
    _cfg(vq=_vq(topk=0.1, sink=4, local=8)).save(tmp_path / "v")
    p = load_plan(tmp_path / "v")
    assert p.method == "vq" and p.vq.n_codes == 16 and p.vq.sink == 4 and p.key_dim is None
    partial = _cfg(vq=_vq(heads=torch.tensor([[False, False], [True, True]])))
    with pytest.raises(ValueError, match="vq_dense_layers=0"):
        plan_from_config(partial)
    _cfg(vq=_vq(select="oracle")).save(tmp_path / "o")  # the oracle baseline round-trips, and is not served
    with pytest.raises(ValueError, match="analysis baseline"):
        load_plan(tmp_path / "o")
    tv = plan_from_config(_cfg(think=ThinK(prune_ratio=0.25, window=8), vq=_vq(local=8)))
    assert tv.method == "think+vq" and tv.per_request_channels and tv.key_dim == 48
    three = plan_from_config(_cfg(duo=DuoAttention(pattern=torch.tensor([[False, True], [True, False]])),
                                  think=ThinK(prune_ratio=0.25, window=8, channels=_channels()), vq=_vq(local=8)))
    assert three.method == "duo+think+vq" and not three.per_request_channels


def test_duo_tensor_parallel_slices():
    pat = torch.tensor([[True, False, False, True], [False, True, True, False]])
    p = plan_from_config(CompressionConfig(num_layers=2, num_kv_heads=4, head_dim=64, num_q_heads=8,
                                           duo=DuoAttention(pattern=pat, sink=4, recent=8)))
    assert p.rank_num_streaming(4, 0, 1) == 2
    assert p.rank_num_streaming(2, 0, 2) == p.rank_num_streaming(2, 1, 2) == 1  # one per rank and layer
    assert p.rank_heads(0, 0, 2) == ([1], [0]) and p.rank_heads(0, 2, 4) == ([0], [1])
    assert p.rank_heads(1, 0, 2) == ([0], [1]) and p.rank_heads(1, 2, 4) == ([1], [0])
    with pytest.raises(ValueError, match="every layer of every rank"):
        p.rank_num_streaming(1, 0, 4)  # one head per rank: it would stream all or nothing
    skew = torch.tensor([[True, True, False, False], [True, True, False, False]])
    q = plan_from_config(CompressionConfig(num_layers=2, num_kv_heads=4, head_dim=64, num_q_heads=8,
                                           duo=DuoAttention(pattern=skew)))
    with pytest.raises(ValueError, match=r"got \[0, 2\]"):
        q.rank_num_streaming(2, 0, 2)
