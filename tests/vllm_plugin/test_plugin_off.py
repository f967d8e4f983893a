"""kvcomp's vLLM backend with compression off: greedy tokens identical to stock vLLM and to HF.

Engines come from the session fixture in conftest.py: stock vLLM (CPU_ATTN) and vLLM with
kvcomp's backend registered over CPU_ATTN through the ``vllm.general_plugins`` entry point, both
on a random tiny Llama (2 layers, 4 q / 2 KV heads, head_dim 64, fp32), 4 prompts of 1-150 tokens
(two 128-token pages, chunked prefill at 64 tokens), 8 greedy tokens each.
"""

from __future__ import annotations

import os

from _vllm_common import MAX_TOKENS


def test_kvcomp_backend_really_ran(engines):
    trace = engines["off"]["trace"]
    assert sorted(r["layer"] for r in trace) == ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"], trace
    assert all(r["method"] == "off" and r["vllm"].startswith("0.") for r in trace)
    # pages are the logical [blocks, Hkv=2, block_size, 2*D=128] view, as for CPU_ATTN
    bs = engines["off"]["block_size"]
    assert all(r["kv_cache_shape"][1:] == [2, bs, 128] for r in trace), trace
    assert all(r["pid"] != os.getpid() for r in trace)
    assert "kvcomp attention backend active" in engines["off"]["log"]
    assert "kvcomp attention backend active" not in engines["stock"]["log"]


def test_greedy_tokens_identical(engines):
    hf, stock, kv = engines["hf_full"], engines["stock"]["tokens"], engines["off"]["tokens"]
    assert len(hf) == 4 and all(len(t) == MAX_TOKENS for t in hf)
    assert stock == hf, f"stock vLLM differs from HF:\n{stock}\n{hf}"
    assert kv == hf, f"kvcomp backend differs from HF:\n{kv}\n{hf}"


def test_kv_capacity_reported(engines):
    for name in ("stock", "off"):
        r = engines[name]
        print(f"{name}: {r['num_blocks']} blocks x {r['block_size']} tokens = {r['kv_tokens']:,} KV tokens; "
              f"max concurrency {r['max_concurrency']:.1f} at {r['max_model_len']} tokens/request; "
              f"vLLM log: {r['log_kv_tokens']} tokens; engine start {r['engine_start_s']} s")
        assert r["num_blocks"] > 0 and r["kv_tokens"] == r["log_kv_tokens"]
    # compression off: same page bytes, so the same capacity as stock vLLM
    assert engines["off"]["kv_tokens"] == engines["stock"]["kv_tokens"]


def test_smollm2_off_equals_stock_and_hf(engines):
    """The bundled SmolLM2 (prose prompts of 7, 61 and 300 tokens, two pages, chunked at 64)."""
    off, stock = engines["smol-off"], engines["smol-stock"]
    assert "kvcomp attention backend active" in off["log"] and "kvcomp attention backend active" not in stock["log"]
    assert off["tokens"] == stock["tokens"] == engines["hf_smol"]
    assert off["log_kv_tokens"] == stock["log_kv_tokens"]


def test_config_without_kvcomp_backend_is_an_error(engines):
    """KVCOMP_CONFIG set, but vLLM's CPU platform picks CPU_ATTN (no KVCOMP_VLLM_OVERRIDE_CPU):
    the engine must stop with kvcomp's message instead of serving uncompressed pages."""
    r = engines["unselected"]
    assert r["rc"] != 0
    assert "KVCOMP_CONFIG asks for compressed KV pages but vLLM selected CPU_ATTN" in r["log"], r["log"][-3000:]
    assert "KVCOMP_VLLM_OVERRIDE_CPU=1" in r["log"]
