"""The transformers path runs every method through ``kvcomp.ops`` (the ops the vLLM backend calls):
counted calls per method, the same tokens through the Triton kernels (interpreter on CPU, compiled
on CUDA) as through the CPU route."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from kvcomp import ops
from kvcomp.config import CompressionConfig, DuoAttention, ThinK, VQRetrieval
from kvcomp.hf import compress, restore

L, HKV, D = 2, 2, 16
DECODE_OPS = ("triton_duo_decode_attention", "think_decode", "vq_lut", "vq_topk", "vq_encode_paged",
              "sparse_attention_host", "scatter_tokens")


def _model(device="cpu"):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=128, hidden_size=96, intermediate_size=192, num_hidden_layers=L,
                      num_attention_heads=6, num_key_value_heads=HKV, head_dim=D, max_position_embeddings=1024)
    return LlamaForCausalLM(cfg).eval().to(device)


def _config(model, method):
    g = torch.Generator().manual_seed(3)
    kw = {}
    if "duo" in method:
        kw["duo"] = DuoAttention(pattern=torch.tensor([[True, False]] * L), sink=2, recent=8)
    if "think" in method:
        kw["think"] = ThinK(prune_ratio=0.5, window=4, channel_multiple=8)  # 8 of 16 channels
    if "vq" in method:
        kw["vq"] = VQRetrieval(codebook=torch.randn(L, HKV, 8, D, generator=g),
                               whiten=torch.eye(D).expand(L, HKV, D, D).clone(), topk=4, sink=2, local=4)
    return CompressionConfig.for_model(model, **kw)


def _generate(model, cfg, n=4):
    ids = torch.randint(0, 128, (2, 30), generator=torch.Generator().manual_seed(1)).to(model.device)
    cache = compress(model, cfg)
    try:
        with torch.inference_mode():
            return model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache, max_new_tokens=n,
                                  do_sample=False, pad_token_id=0)
    finally:
        restore(model)


#: the decode ops each method's heads must reach (exact heads: kvcomp::duo_decode with no streaming heads)
EXPECTED = {
    "off": {"triton_duo_decode_attention"},
    "duo": {"triton_duo_decode_attention"},  # exact heads, and the streaming heads over their rings in place
    "think": {"think_decode", "scatter_tokens"},  # ThinK's narrow key pages (CPU): ops.scatter_tokens
    "vq": {"vq_lut", "vq_topk", "vq_encode_paged", "sparse_attention_host"},
    "duo+think+vq": {"sparse_attention_host", "vq_lut", "vq_topk", "vq_encode_paged", "scatter_tokens"},
}


@pytest.mark.parametrize("method", list(EXPECTED))
def test_hf_decode_calls_kvcomp_ops(method, monkeypatch):
    calls = {name: 0 for name in DECODE_OPS}
    for name in DECODE_OPS:
        fn = getattr(ops, name)

        def counted(*a, _fn=fn, _name=name, **k):
            calls[_name] += 1
            return _fn(*a, **k)

        monkeypatch.setattr(ops, name, counted)
    model = _model()
    _generate(model, _config(model, method if method != "off" else ""), n=4)
    used = {k for k, v in calls.items() if v}
    assert EXPECTED[method] <= used, (method, calls)
    # one decode call per layer and step at least (3 decode steps after the prompt)
    assert all(calls[k] >= 3 * L for k in EXPECTED[method] if k != "vq_encode_paged"), calls
    if method == "duo":  # one call for the exact heads and one for the streaming heads' rings
        assert calls["triton_duo_decode_attention"] >= 2 * 3 * L, calls


@pytest.mark.triton_route
@pytest.mark.parametrize("method", ["off", "duo", "think", "vq"])
def test_hf_tokens_equal_through_triton_kernels(method, monkeypatch):
    """The Triton kernels (interpreter on CPU) give the CPU route's greedy tokens."""
    model = _model()
    cfg = _config(model, method if method != "off" else "")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    want = _generate(model, cfg, n=3)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert torch.equal(_generate(model, cfg, n=3), want)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["off", "duo", "think", "vq"])
def test_hf_runs_triton_on_cuda(method, monkeypatch):
    """On CUDA the HF path's decode ops run the compiled Triton kernels (the dispatch says so, and the
    tokens equal the CPU route's)."""
    from kvcomp.ops._dispatch import impl_for

    assert impl_for(torch.empty(1, device="cuda"), "duo_decode") == "triton"
    cpu = _model()
    want = _generate(cpu, _config(cpu, method if method != "off" else ""), n=3)
    gpu = _model("cuda")
    got = _generate(gpu, _config(gpu, method if method != "off" else ""), n=3)
    assert torch.equal(got.cpu(), want)
