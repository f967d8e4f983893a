"""DuoAttention as calibrated (global threshold): a different number of streaming heads per layer.

A tiny random Llama with 3 layers of 2 KV heads streams 2, 1 and 0 heads (sink 16 + recent 48):
layer 0's cache is its ring (every head streams: a ``CircularBufferSpec`` of its own), layer 1
keeps one retrieval head in its pages and one streaming head in a companion ring, layer 2 keeps
both heads in its pages. Each layer's page is set on the layer (``num_head_slots`` 1 or 2), and
the block-outermost layout lets vLLM pack the pages of different sizes into one block. One
in-process engine, prefix caching off, prompts of 5 to 150 tokens prefilled in 64-token chunks;
reference: kvcomp's transformers path with the same config (which takes any pattern).
"""

from __future__ import annotations

import json

import pytest
import torch
from _vllm_common import (MAX_TOKENS, build_tiny_llama, collect_engines, kvcomp_hf_greedy, make_prompts,
                          start_engine, vllm_python)

PATTERN = [[True, True], [True, False], [False, False]]
SINK, RECENT, BLOCK = 16, 48, 128


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    py, why = vllm_python()
    if py is None:
        pytest.skip(why)
    from kvcomp.config import CompressionConfig, DuoAttention

    work = tmp_path_factory.mktemp("vllm_duo_global")
    model = build_tiny_llama(work / "model", num_layers=3)
    prompts = make_prompts()
    (work / "prompts.json").write_text(json.dumps(prompts))
    cfg = CompressionConfig.for_model(model, duo=DuoAttention(pattern=torch.tensor(PATTERN), sink=SINK, recent=RECENT))
    cfg.save(work / "config")
    proc = start_engine(py, work, "global", work / "model", work / "prompts.json", MAX_TOKENS, "kvcomp",
                        config=str(work / "config"), trace=str(work / "trace.jsonl"), inproc=True,
                        prefix_caching=False)
    ref = kvcomp_hf_greedy(model, prompts, MAX_TOKENS, cfg)
    res = collect_engines({"global": proc})["global"]
    res["trace"] = {t["layer"]: t for t in map(json.loads, (work / "trace.jsonl").read_text().splitlines())}
    res["hf"] = ref
    return res


def test_tokens_equal_the_hf_path_with_the_same_pattern(run):
    assert run["tokens"] == run["hf"], f"vLLM {run['tokens']}\nkvcomp HF path {run['hf']}"


def test_each_layer_has_its_own_page_and_ring(run):
    """Layer 0: its cache is a ring of both heads (sink + recent + 1 slots: one block size per
    streaming count); layer 1: a 1-head page and a 1-head ring of sink + recent slots; layer 2: a
    2-head page, no ring. vLLM's log line reports the capacity of these bytes."""
    shapes = {int(name.split(".")[2]): t for name, t in run["trace"].items()}
    assert shapes[0]["kv_cache_shape"][1:] == [2, SINK + RECENT + 1, 128] and shapes[0]["ring"] is None
    assert shapes[1]["kv_cache_shape"][1:] == [1, BLOCK, 128]
    assert shapes[1]["ring_view"][0][1:] == [1, SINK + RECENT, 128]
    assert shapes[2]["kv_cache_shape"][1:] == [2, BLOCK, 128] and shapes[2]["ring"] is None
    # 3 retrieval heads of 3 layers x 2 = half the stock bytes per token (plus one ring block per request)
    assert run["log_kv_tokens"] is not None and run["log_kv_tokens"] > run["kv_tokens"] // 2
    assert "Using BLNHC KV cache layout" in run["log"] or "Using BLHNC KV cache layout" in run["log"]
