"""ThinK through kvcomp's vLLM backend: narrower key pages, more KV capacity, exact pruned math.

One engine run (in-process engine, ~30 s) with ``KVCOMP_CONFIG`` naming a saved
``CompressionConfig`` with static ThinK channels (25% of the 64 key channels pruned on every
layer / KV head). Checks: vLLM's cache view has ``48 + 64`` content elements per token, vLLM's own
block count grows by 128/112 (read from the engine and its log), and greedy tokens equal HF
transformers running attention with the same channels zeroed in q and k (and differ from the
unpruned model, so the comparison can fail).
"""

from __future__ import annotations

import json

import pytest

from _vllm_common import (build_tiny_llama, finish_engine, hf_greedy, make_prompts, start_engine, think_channels,
                          use_pruned_key_attention, vllm_python)

PY, WHY = vllm_python()
pytestmark = pytest.mark.skipif(PY is None, reason=WHY)

MAX_TOKENS = 8
L, HKV, D, KEEP = 2, 2, 64, 48
KV_SPACE = 1 << 30  # VLLM_CPU_KVCACHE_SPACE=1 (GiB), fp32 pages


def expected_kv_tokens(content_elems: int, block_size: int) -> int:
    """Tokens vLLM fits in 1 GiB: whole blocks of L layers x Hkv heads x block x content x 4 B."""
    page = L * HKV * block_size * content_elems * 4
    return (KV_SPACE // page) * block_size


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from kvcomp.config import CompressionConfig, ThinK

    work = tmp_path_factory.mktemp("vllm_think")
    model_dir = work / "model"
    model = build_tiny_llama(model_dir)
    prompts = make_prompts()
    prompts_file = work / "prompts.json"
    prompts_file.write_text(json.dumps(prompts))
    ch = think_channels(L, HKV, D, KEEP)
    cfg = CompressionConfig(num_layers=L, num_kv_heads=HKV, head_dim=D, num_q_heads=4,
                            think=ThinK(prune_ratio=0.25, channels=ch))
    cfg.save(work / "kvcomp_config")
    trace = work / "trace.jsonl"
    eng = start_engine(PY, work, "think", model_dir, prompts_file, MAX_TOKENS, "kvcomp",
                       config=str(work / "kvcomp_config"), trace=str(trace), inproc=True)
    full = hf_greedy(model, prompts, MAX_TOKENS)
    use_pruned_key_attention(model, ch)
    pruned = hf_greedy(model, prompts, MAX_TOKENS)
    res = finish_engine(*eng)
    return {"res": res, "hf_full": full, "hf_pruned": pruned,
            "trace": [json.loads(x) for x in trace.read_text().splitlines()]}


def test_pages_hold_pruned_keys(run):
    bs = run["res"]["block_size"]
    assert len(run["trace"]) == L
    for r in run["trace"]:
        assert r["method"] == "think"
        assert r["kv_cache_shape"][1:] == [HKV, bs, KEEP + D], r


def test_kv_capacity_grows(run):
    r = run["res"]
    bs = r["block_size"]
    off, think = expected_kv_tokens(2 * D, bs), expected_kv_tokens(KEEP + D, bs)
    print(f"ThinK 25% key channels: vLLM KV capacity {off:,} -> {r['kv_tokens']:,} tokens "
          f"(x{r['kv_tokens'] / off:.3f}); {r['num_blocks']} blocks x {bs}; max concurrency "
          f"{r['max_concurrency']:.1f} at {r['max_model_len']} tokens; vLLM log {r['log_kv_tokens']:,}")
    assert r["kv_tokens"] == r["log_kv_tokens"] == think
    assert think > off


def test_greedy_tokens_match_pruned_reference(run):
    got = run["res"]["tokens"]
    assert run["hf_pruned"] != run["hf_full"], "pruning changes nothing: the test could not fail"
    assert got == run["hf_pruned"], f"vLLM+ThinK {got}\nHF pruned-key reference {run['hf_pruned']}"
