"""DuoAttention through kvcomp's vLLM backend: retrieval heads in pages, streaming heads in rings.

The ``duo`` engine of the session fixture (conftest.py) runs with ``KVCOMP_CONFIG`` naming a
saved DuoAttention config (one of the two KV heads of each layer streaming, sink 16 + recent 48),
in vLLM's default process topology (spawned engine core + worker: the rings are registered from
the worker's Impl). Checks: pages hold only the retrieval head, vLLM's own group-aware capacity
(its "KV cache size" / "Maximum concurrency" log line) grows, and greedy tokens equal kvcomp's HF
DuoAttention path (itself equal to HF transformers with per-head sink + window masks) and differ
from full attention: the 150-token prompt outgrows the 64-token ring, prefilled in 64-token chunks.
"""

from __future__ import annotations

import os

from _vllm_common import D, L


def test_pages_hold_retrieval_heads_only(engines):
    r = engines["duo"]
    assert sorted(t["layer"] for t in r["trace"]) == [f"model.layers.{i}.self_attn.attn" for i in range(L)]
    for t in r["trace"]:
        assert t["method"] == "duo"
        assert t["kv_cache_shape"][1:] == [1, r["block_size"], 2 * D], t
        assert t["pid"] != os.getpid()


def test_kv_capacity_grows(engines):
    r, off = engines["duo"], engines["off"]
    print(f"DuoAttention 1 of 2 KV heads streaming (ring 64 tokens): vLLM KV cache size "
          f"{off['log_kv_tokens']:,} -> {r['log_kv_tokens']:,} tokens (x{r['log_kv_tokens'] / off['log_kv_tokens']:.2f}), "
          f"max concurrency {off['log_max_concurrency']} -> {r['log_max_concurrency']} at {r['max_model_len']} "
          f"tokens/request; {r['num_blocks']} blocks x {r['block_size']}; engine start {r['engine_start_s']} s (spawned)")
    assert r["log_kv_tokens"] > off["log_kv_tokens"]
    assert r["log_max_concurrency"] > off["log_max_concurrency"]


def test_greedy_tokens_match_kvcomp_hf_path(engines):
    got, want = engines["duo"]["tokens"], engines["hf_kvcomp"]["duo"]
    assert want != engines["hf_full"], "streaming changes nothing: the test could not fail"
    assert want == engines["hf_duo_mask"], "kvcomp's HF DuoAttention path disagrees with the mask reference"
    assert got == want, f"vLLM+Duo {got}\nkvcomp HF DuoAttention path {want}"
