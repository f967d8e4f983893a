"""ThinK through kvcomp's vLLM backend: narrower key pages, more KV capacity, exact pruned math.

The ``think`` engine of the session fixture (conftest.py) runs with ``KVCOMP_CONFIG`` naming a
saved ``CompressionConfig`` with static ThinK channels (25% of the 64 key channels pruned on every
layer / KV head, the last 32 tokens' keys kept full width in a per-request ring), in an in-process
engine. Checks: the cache view has ``48 + 64`` content elements per token, a ring is registered per
layer, vLLM's own KV capacity grows, and greedy tokens equal kvcomp's HF ThinK path with the same
config (and differ from the unpruned model, so the comparison can fail).
"""

from __future__ import annotations

import os

from _vllm_common import D, HKV, KEEP, L

KV_SPACE = 1 << 30  # VLLM_CPU_KVCACHE_SPACE=1 (GiB), fp32 pages
WINDOW = 32  # ThinK's default full-width window (the test config keeps it)


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
        assert t["ring"] == t["layer"] + "_kvcomp_ring", t
        assert t["pid"] != os.getpid()  # the engine subprocess


def test_kv_capacity_grows(engines):
    r, off = engines["think"], engines["off"]
    bs = r["block_size"]
    print(f"ThinK 25% key channels + 32-token window ring: {off['num_blocks']} -> {r['num_blocks']} blocks x {bs}; "
          f"vLLM KV cache size {off['log_kv_tokens']:,} -> {r['log_kv_tokens']:,} tokens at {r['max_model_len']} "
          f"tokens/request (max concurrency {r['log_max_concurrency']}); engine start {r['engine_start_s']} s")
    assert off["kv_tokens"] == off["log_kv_tokens"] == expected_kv_tokens(2 * D, bs)
    assert r["kv_tokens"] == expected_kv_tokens(KEEP + D, bs)  # pool of narrow pages: x128/112
    # each request also holds one ring block (its 32 full-width keys per layer, padded by vLLM to
    # a page), so vLLM's group-aware concurrency is blocks / (pages per request + 1): the gain
    # grows with the context (here 4096 tokens = 32 pages; x1.143 in the limit)
    per_req = -(-r["max_model_len"] // bs) + 1
    assert abs(r["log_max_concurrency"] - round(r["num_blocks"] / per_req, 2)) < 0.01
    assert r["log_max_concurrency"] * r["max_model_len"] > off["log_kv_tokens"]


def test_greedy_tokens_match_kvcomp_hf_path(engines):
    got, want = engines["think"]["tokens"], engines["hf_kvcomp"]["think"]
    assert want != engines["hf_full"], "pruning changes nothing: the test could not fail"
    assert got == want, f"vLLM+ThinK {got}\nkvcomp HF ThinK path {want}"
