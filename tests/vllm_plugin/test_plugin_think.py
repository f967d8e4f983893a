"""ThinK through kvcomp's vLLM backend: narrower key pages, more KV capacity, exact pruned math.

The ``think`` engine of the session fixture (conftest.py) runs with ``KVCOMP_CONFIG`` naming a
saved ``CompressionConfig`` with static ThinK channels (25% of the 64 key channels pruned on every
layer / KV head), in an in-process engine. Checks: the
cache view has ``48 + 64`` content elements per token, vLLM's own block count grows by 128/112
(read from the engine and its log), and greedy tokens equal HF transformers running attention
with the same channels zeroed in q and k (and differ from the unpruned model, so the comparison
can fail).
"""

from __future__ import annotations

import os

from _vllm_common import D, HKV, KEEP, L

KV_SPACE = 1 << 30  # VLLM_CPU_KVCACHE_SPACE=1 (GiB), fp32 pages


def expected_kv_tokens(content_elems: int, block_size: int) -> int:
    """Tokens vLLM fits in 1 GiB: whole blocks of L layers x Hkv heads x block x content x 4 B."""
    page = L * HKV * block_size * content_elems * 4
    return (KV_SPACE // page) * block_size


def test_pages_hold_pruned_keys(engines):
    r = engines["think"]
    assert len(r["trace"]) == L
    for t in r["trace"]:
        assert t["method"] == "think"
        assert t["kv_cache_shape"][1:] == [HKV, r["block_size"], KEEP + D], t
        assert t["pid"] != os.getpid()  # the engine subprocess


def test_kv_capacity_grows(engines):
    r, off = engines["think"], engines["off"]
    bs = r["block_size"]
    print(f"ThinK 25% key channels: vLLM KV capacity {off['kv_tokens']:,} -> {r['kv_tokens']:,} tokens "
          f"(x{r['kv_tokens'] / off['kv_tokens']:.3f}); {off['num_blocks']} -> {r['num_blocks']} blocks x {bs}; "
          f"max concurrency {off['max_concurrency']:.1f} -> {r['max_concurrency']:.1f} at "
          f"{r['max_model_len']} tokens; vLLM log {r['log_kv_tokens']:,}; engine start {r['engine_start_s']} s")
    assert off["kv_tokens"] == expected_kv_tokens(2 * D, bs)
    assert r["kv_tokens"] == r["log_kv_tokens"] == expected_kv_tokens(KEEP + D, bs)
    assert r["kv_tokens"] > off["kv_tokens"]


def test_greedy_tokens_match_pruned_reference(engines):
    got = engines["think"]["tokens"]
    assert engines["hf_pruned"] != engines["hf_full"], "pruning changes nothing: the test could not fail"
    assert got == engines["hf_pruned"], f"vLLM+ThinK {got}\nHF pruned-key reference {engines['hf_pruned']}"
