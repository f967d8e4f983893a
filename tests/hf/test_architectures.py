"""Hybrid and sliding-window architectures in the transformers path (issue 12 point 4): tiny random
Gemma 3 (local + global layers, two RoPE bases), Mistral (every layer sliding), Qwen2 (sliding from
``max_window_layers``) and Qwen3. Sliding layers pass through uncompressed with the model's window;
the methods run on the global layers; RoPE per layer is read from the model and equals the config's."""

import pytest
import torch
from transformers import (Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from kvcomp.arch import layer_rope, layer_windows, model_layer_ropes
from kvcomp.config import CompressionConfig, ConfigError, DuoAttention, ThinK, VQRetrieval
from kvcomp.hf import compress, restore
from kvcomp.hf.cache import tensor_bytes

W = 8  # sliding window of the tiny models: far below the prompts, so the window shapes the tokens
COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=512)


def _gemma3():
    return Gemma3ForCausalLM(Gemma3TextConfig(**COMMON, num_hidden_layers=4, head_dim=16, sliding_window=W,
                                              layer_types=["sliding_attention", "full_attention"] * 2,
                                              query_pre_attn_scalar=16))


def _mistral():
    return MistralForCausalLM(MistralConfig(**COMMON, num_hidden_layers=2, head_dim=16, sliding_window=W))


def _qwen2():
    return Qwen2ForCausalLM(Qwen2Config(**COMMON, num_hidden_layers=4, use_sliding_window=True, sliding_window=W,
                                        max_window_layers=2))


def _qwen3():
    return Qwen3ForCausalLM(Qwen3Config(**COMMON, num_hidden_layers=3, head_dim=32, rope_parameters={
        "rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}))


ARCHS = {"gemma3": _gemma3, "mistral": _mistral, "qwen2": _qwen2, "qwen3": _qwen3}
HYBRID = ["gemma3", "qwen2"]


@pytest.fixture(scope="module")
def models():
    out = {}
    for i, (name, make) in enumerate(ARCHS.items()):
        torch.manual_seed(i)
        m = make().eval()
        m.set_attn_implementation("sdpa")
        out[name] = m
    return out


def _ids(seed=1, b=2, t=29):
    return torch.randint(0, 128, (b, t), generator=torch.Generator().manual_seed(seed))


def _gen(model, ids, cache=None, n=6):
    with torch.inference_mode():
        return model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=n,
                              do_sample=False, pad_token_id=0)


def _run(model, cfg, ids):
    cache = compress(model, cfg)
    try:
        return _gen(model, ids, cache), cache
    finally:
        restore(model)


def _layer_bytes(cache) -> list[dict[str, int]]:
    return [tensor_bytes(layer.tensors()) for layer in cache.layers]


@pytest.mark.parametrize("arch", list(ARCHS))
def test_rope_from_config_equals_the_model_module(models, arch):
    m = models[arch]
    mod = model_layer_ropes(m)
    d = getattr(m.config, "head_dim", None) or m.config.hidden_size // m.config.num_attention_heads
    for l, (inv, scaling) in enumerate(mod):
        ci, cs = layer_rope(m.config, l, d)
        torch.testing.assert_close(ci, inv, rtol=1e-6, atol=0)
        assert cs == pytest.approx(scaling)
    if arch == "gemma3":  # local base 10K, global base 1M
        assert not torch.equal(mod[0][0], mod[1][0]) and torch.equal(mod[0][0], mod[2][0])


def test_layer_windows_per_arch(models):
    assert layer_windows(models["gemma3"].config) == [W, None, W, None]
    assert layer_windows(models["mistral"].config) == [W, W]
    assert layer_windows(models["qwen2"].config) == [None, None, W, W]
    assert layer_windows(models["qwen3"].config) == [None] * 3


@pytest.mark.parametrize("arch", list(ARCHS))
def test_compression_off_equals_stock_generate(models, arch):
    m, ids = models[arch], _ids()
    got, _ = _run(m, CompressionConfig.for_model(m), ids)
    assert torch.equal(_gen(m, ids), got)


def _method_config(model, method: str) -> CompressionConfig:
    c = model.config
    L, H = c.num_hidden_layers, c.num_key_value_heads
    D = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    g = torch.Generator().manual_seed(3)
    kw = {}
    if "duo" in method:
        pat = torch.zeros(L, H, dtype=torch.bool)
        pat[:, 0] = True
        kw["duo"] = DuoAttention(pattern=pat, sink=2, recent=6)
    if "think" in method:
        kw["think"] = ThinK(prune_ratio=0.5, window=4, channel_multiple=8)  # 8 of 16 channels
    if "vq" in method:
        kw["vq"] = VQRetrieval(codebook=torch.randn(L, H, 8, D, generator=g),
                               whiten=torch.eye(D).expand(L, H, D, D).clone(), topk=6, sink=2, local=4)
    return CompressionConfig.for_model(model, **kw)


@pytest.mark.parametrize("method", ["duo", "think", "vq", "duo+vq", "duo+think+vq"])
@pytest.mark.parametrize("arch", HYBRID)
def test_methods_run_on_global_layers_only(models, arch, method):
    m, ids = models[arch], _ids(seed=4, t=33)
    windows = layer_windows(m.config)
    off_tokens, off = _run(m, CompressionConfig.for_model(m), ids)
    cfg = _method_config(m, method)
    assert all(k == "window" for l, w in enumerate(windows) if w for k in cfg.kinds[l])
    tokens, cache = _run(m, cfg, ids)
    assert tokens.shape == off_tokens.shape
    want, got = _layer_bytes(off), _layer_bytes(cache)
    c = m.config
    d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    window_bytes = ids.shape[0] * 2 * c.num_key_value_heads * d * next(m.parameters()).element_size()
    for l, w in enumerate(windows):
        if w is not None:
            assert got[l] == want[l], (l, got, want)  # sliding layer: untouched
            assert got[l]["device"] == w * window_bytes, (l, got)  # its last W tokens only, not the 33+
        else:
            assert got[l]["device"] < want[l]["device"], (l, got, want)  # global layer: the method's real saving
    if "vq" in method:
        assert cache.kv_bytes()["host"] > 0


def test_sliding_layers_shape_the_tokens(models):
    """The window is honoured: a model whose window is wider than the text gives other tokens."""
    m, ids = models["gemma3"], _ids(seed=5, t=40)
    base, _ = _run(m, CompressionConfig.for_model(m), ids)
    m.config.sliding_window = 4096
    for layer in m.model.layers:
        if layer.self_attn.sliding_window is not None:
            layer.self_attn.sliding_window = 4096
    try:
        wide_stock = _gen(m, ids)
        wide, _ = _run(m, CompressionConfig.for_model(m), ids)
    finally:
        m.config.sliding_window = W
        for layer in m.model.layers:
            if layer.self_attn.sliding_window is not None:
                layer.self_attn.sliding_window = W
    assert torch.equal(wide, wide_stock)
    assert not torch.equal(wide, base)


def test_unservable_models_are_clear_errors(models):
    m = models["mistral"]  # every layer slides: nothing to compress
    with pytest.raises(ConfigError, match="every layer of the model uses a sliding window"):
        _method_config(m, "duo")
    g = models["gemma3"]  # a config that does not know the model's windows
    with pytest.raises(ValueError, match="sliding windows"):
        compress(g, CompressionConfig(4, 2, 16, num_q_heads=4))
    torch.manual_seed(0)  # learned absolute positions: no RoPE
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_head=4, n_layer=2, n_positions=64)).eval()
    with pytest.raises(ValueError, match="no rotary embedding module.*kvcomp needs a RoPE model"):
        compress(gpt2, CompressionConfig.for_model(gpt2))
    restore(gpt2)


def test_config_windows_round_trip(models, tmp_path):
    cfg = _method_config(models["gemma3"], "duo")
    cfg.save(tmp_path)
    back = CompressionConfig.load(tmp_path)
    assert back.windows == [W, None, W, None] and back.kinds == cfg.kinds
    assert back.layer_groups(0)["window"] == [0, 1] and back.layer_groups(1)["streaming"] == [0]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("group,window", [(1, 1), (3, 5), (8, 16)])
def test_sliding_window_method_over_permuted_pages(dtype, tol, group, window):
    """The method object against the reference (sink 0, the window counting the query): a batch
    mixing decode rows and chunked-prefill rows, odd lengths, GQA, permuted non-contiguous blocks."""
    from kvcomp.methods.step import Step, Store
    from kvcomp.methods.window import SlidingWindow
    from kvcomp.ops._dispatch import impl_on
    from kvcomp.ref import gather_paged, streaming_attention

    g = torch.Generator().manual_seed(group * 100 + window)
    hkv, d, bs = 2, 16, 4
    lens, qlens = [1, 19, 7, 9, 33, 12], [1, 1, 7, 1, 5, 1]  # prefill rows 2 and 4: not one range
    nblk = sum(-(-n // bs) for n in lens) + 3
    k_cache = torch.randn(nblk, bs, hkv, d, generator=g).to(dtype)
    v_cache = torch.randn(nblk, bs, hkv, d, generator=g).to(dtype)
    perm = torch.randperm(nblk, generator=g)
    mb = max(-(-n // bs) for n in lens)
    table = torch.full((len(lens), 2 * mb), -7, dtype=torch.int32)  # strided view below, padding never read
    used = 0
    for b, n in enumerate(lens):
        k = -(-n // bs)
        table[b, :2 * k:2] = perm[used:used + k].to(torch.int32)
        used += k
    table = table[:, ::2]
    qsl = [0]
    for t in qlens:
        qsl.append(qsl[-1] + t)
    q = torch.randn(qsl[-1], hkv * group, d, generator=g).to(dtype)
    md = Step(len(lens), qsl[-1], max(qlens), max(lens), torch.tensor(qsl, dtype=torch.int32),
              torch.tensor(lens, dtype=torch.int32), table, torch.zeros(qsl[-1], dtype=torch.long), qsl)
    out = torch.zeros_like(q)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        SlidingWindow(window, 0.3).attend(Store(k=k_cache, v=v_cache), q, None, None, md, out)
    if impl_on("cpu", "streaming_prefill") == "native":  # both prefill rows in one varlen call
        assert {e.key: e.count for e in prof.key_averages()}.get("kvcomp_C::streaming_prefill") == 1
    for b, n in enumerate(lens):
        kd, vd = (gather_paged(c, table, n, b)[None].float() for c in (k_cache, v_cache))
        qb = q[qsl[b]:qsl[b + 1]].transpose(0, 1)[None].float()
        want = streaming_attention(qb, kd, vd, sink=0, window=window, scale=0.3)[0].transpose(0, 1)
        torch.testing.assert_close(out[qsl[b]:qsl[b + 1]].float(), want, rtol=tol, atol=tol)
    with pytest.raises(ValueError, match="positive int"):
        SlidingWindow(0, 0.3)


def test_calibration_skips_sliding_layers(models):
    from kvcomp.calibrate.think import calibrate_think_channels
    from kvcomp.calibrate.vq import calibrate_codebooks

    m = models["gemma3"]
    samples = [torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(s)) for s in range(2)]
    fit = calibrate_codebooks(m, samples, n_codes=8, iters=2, rel_pos=16, progress=False)
    for l, w in enumerate(layer_windows(m.config)):
        sliding = w is not None
        assert bool((fit["codebook"][l] == 0).all()) == sliding  # sliding layers: placeholders, not fitted
        assert torch.equal(fit["whiten"][l], torch.eye(16).expand(2, 16, 16)) == sliding
    ch = calibrate_think_channels(m, samples, 0.5, window=4, multiple=8)
    assert ch.shape == (4, 2, 8) and torch.equal(ch[0], torch.arange(8).expand(2, 8))
    cfg = CompressionConfig.for_model(m, think=ThinK(prune_ratio=0.5, window=4, channels=ch, channel_multiple=8))
    assert cfg.prune[[1, 3]].all() and not cfg.prune[[0, 2]].any()
