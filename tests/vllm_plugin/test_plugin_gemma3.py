"""A hybrid sliding-window model through kvcomp's vLLM backend (issue 12 point 4): a tiny random
Gemma 3 (4 layers: local sliding-window layers 0 and 2, window 16, RoPE base 10K; global layers 1
and 3, base 1M). vLLM gives the local layers their own KV-cache group (``SlidingWindowSpec``);
kvcomp keeps them exact, attended over the window, and runs the method on the global layers.

Engines (in-process, started together by the module fixture): stock vLLM, kvcomp off, DuoAttention
(one streaming KV head per global layer, sink 4 + recent 12; 64-token chunked prefill), A²ATS
(random 32-code codebooks), query-driven ThinK (channels per request) and all three combined
(prompts prefilled whole; prefix caching off with per-request rings). References: HF transformers (stock) and
kvcomp's HF path (``kvcomp.hf.compress``) with the same saved configs. The 37- and 150-token
prompts outgrow both the window and the DuoAttention ring.
"""

from __future__ import annotations

import json

import pytest

from _vllm_common import (HKV, MAX_TOKENS, TINY_ARCHS, TINY_WINDOW, D, build_tiny_model, cpu_ops, finish_engine,
                          hf_greedy, kvcomp_hf_greedy, make_prompts, start_engine, vllm_python)

WINDOW = TINY_WINDOW
LAYERS = TINY_ARCHS["gemma3"][2]["layer_types"]
VQ_BYTES = 8 << 20


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    py, why = vllm_python()
    if py is None:
        pytest.skip(why)
    import torch

    from kvcomp.config import CompressionConfig, DuoAttention, ThinK, VQRetrieval

    work = tmp_path_factory.mktemp("vllm_gemma3")
    model = build_tiny_model(work / "model", "gemma3")
    prompts = make_prompts()
    (work / "prompts.json").write_text(json.dumps(prompts))
    g = torch.Generator().manual_seed(7)
    duo = DuoAttention(pattern=torch.tensor([[False, True], [True, False]] * 2), sink=4, recent=12)
    vq = VQRetrieval(codebook=torch.randn(4, HKV, 32, D, generator=g), whiten=torch.eye(D).expand(4, HKV, D, D).clone(),
                     topk=0.1, sink=4, local=8, rel_pos=128)
    cfgs = {"duo": CompressionConfig.for_model(model, duo=duo), "vq": CompressionConfig.for_model(model, vq=vq),
            "think": CompressionConfig.for_model(model, think=ThinK(prune_ratio=0.25, window=8)),
            "all": CompressionConfig.for_model(model, duo=duo, think=ThinK(prune_ratio=0.25, window=8), vq=vq)}
    for name, c in cfgs.items():
        c.save(work / f"{name}_config")
    whole, budget = ("--max-num-batched-tokens", "256"), ("--kv-cache-bytes", str(VQ_BYTES))
    specs = {"stock": dict(mode="stock"), "off": dict(mode="kvcomp"),
             "duo": dict(mode="kvcomp", config=str(work / "duo_config"), prefix_caching=False),
             "vq": dict(mode="kvcomp", config=str(work / "vq_config"), extra=whole + budget),
             "think": dict(mode="kvcomp", config=str(work / "think_config"), prefix_caching=False, extra=whole),
             "all": dict(mode="kvcomp", config=str(work / "all_config"), prefix_caching=False, extra=whole + budget)}
    procs = {}
    for name, s in specs.items():
        s = dict(s)
        procs[name] = start_engine(py, work, name, work / "model", work / "prompts.json", MAX_TOKENS,
                                   s.pop("mode"), trace=str(work / f"{name}.trace.jsonl"), inproc=True, **s)
    ref = {"hf_full": hf_greedy(model, prompts, MAX_TOKENS)}
    with cpu_ops():
        ref["hf_off"] = kvcomp_hf_greedy(model, prompts, MAX_TOKENS, CompressionConfig.for_model(model))
        for name, c in cfgs.items():
            ref[f"hf_{name}"] = kvcomp_hf_greedy(model, prompts, MAX_TOKENS, c)
    out = {"ref": ref}
    for name, p in procs.items():
        out[name] = finish_engine(*p, timeout=900)
        trace = work / f"{name}.trace.jsonl"
        out[name]["trace"] = ([json.loads(x) for x in trace.read_text().splitlines()] if trace.exists() else [])
    return out


def _by_layer(run) -> dict[int, dict]:
    return {int(t["layer"].split(".")[2]): t for t in run["trace"]}


def test_off_equals_stock_vllm_and_hf(runs):
    ref = runs["ref"]
    assert ref["hf_off"] == ref["hf_full"]
    assert runs["stock"]["tokens"] == ref["hf_full"]
    assert runs["off"]["tokens"] == ref["hf_full"]
    layers = _by_layer(runs["off"])
    assert {l: t["sliding_window"] for l, t in layers.items()} == {0: WINDOW, 1: None, 2: WINDOW, 3: None}
    assert runs["off"]["log_kv_tokens"] == runs["stock"]["log_kv_tokens"]


def test_duo_on_global_layers_equals_hf_path(runs):
    r, ref = runs["duo"], runs["ref"]
    assert ref["hf_duo"] != ref["hf_full"], "streaming changes nothing: the test could not fail"
    assert r["tokens"] == ref["hf_duo"], f"vLLM {r['tokens']}\nkvcomp HF path {ref['hf_duo']}"
    for l, t in _by_layer(r).items():
        if LAYERS[l] == "sliding_attention":  # stock pages of both KV heads, no ring
            assert (t["method"], t["ring"], t["kv_cache_shape"][1]) == ("off", None, HKV), t
        else:  # retrieval head in the pages, the streaming head in its ring
            assert (t["method"], t["kv_cache_shape"][1]) == ("duo", 1) and t["ring"], t
    print(f"Gemma 3 DuoAttention on the global layers: vLLM KV cache size {runs['off']['log_kv_tokens']:,} -> "
          f"{r['log_kv_tokens']:,} tokens")
    assert r["log_kv_tokens"] > runs["off"]["log_kv_tokens"]


@pytest.mark.parametrize("method", ["vq", "think", "all"])
def test_method_on_global_layers_equals_hf_path(runs, method):
    r, ref = runs[method], runs["ref"]
    assert r["tokens"] == ref[f"hf_{method}"], f"vLLM {r['tokens']}\nkvcomp HF path {ref[f'hf_{method}']}"
    want = {"vq": "vq", "think": "think", "all": "duo+think+vq"}[method]
    for l, t in _by_layer(r).items():
        assert t["method"] == ("off" if LAYERS[l] == "sliding_attention" else want), t
    if "vq" in want:
        assert max(t["host_mirror_bytes"] for t in r["trace"]) > 0
