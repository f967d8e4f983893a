"""kvcomp's vLLM backend with compression off: greedy tokens identical to stock vLLM and to HF.

Two engines run concurrently as subprocesses (tests/vllm/_run_engine.py, ~30-60 s each on 2
cores): stock vLLM (CPU_ATTN, engine in-process) and vLLM with kvcomp's backend registered over
CPU_ATTN through the ``vllm.general_plugins`` entry point (default process topology: spawned
engine core + worker, so the plugin must load there). The HF reference runs meanwhile.
"""

from __future__ import annotations

import json
import os

import pytest

from _vllm_common import build_tiny_llama, finish_engine, hf_greedy, make_prompts, start_engine, vllm_python

PY, WHY = vllm_python()
pytestmark = pytest.mark.skipif(PY is None, reason=WHY)

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    work = tmp_path_factory.mktemp("vllm_off")
    model_dir = work / "model"
    model = build_tiny_llama(model_dir)
    prompts = make_prompts()
    prompts_file = work / "prompts.json"
    prompts_file.write_text(json.dumps(prompts))
    trace = work / "trace.jsonl"
    kv = start_engine(PY, work, "kvcomp", model_dir, prompts_file, MAX_TOKENS, "kvcomp", trace=str(trace))
    stock = start_engine(PY, work, "stock", model_dir, prompts_file, MAX_TOKENS, "stock", inproc=True)
    hf = hf_greedy(model, prompts, MAX_TOKENS)
    res_stock = finish_engine(*stock)
    res_kv = finish_engine(*kv)
    lines = trace.read_text().splitlines() if trace.exists() else []
    return {"hf": hf, "stock": res_stock, "kvcomp": res_kv, "trace": [json.loads(x) for x in lines],
            "kv_pid_log": res_kv["log"]}


def test_kvcomp_backend_really_ran(runs):
    trace = runs["trace"]
    layers = sorted({r["layer"] for r in trace})
    assert layers == ["model.layers.0.self_attn.attn", "model.layers.1.self_attn.attn"], trace
    assert all(r["method"] == "off" and r["vllm"].startswith("0.") for r in trace)
    # pages are the logical [blocks, Hkv=2, block_size, 2*D=128] view, as for CPU_ATTN
    assert all(r["kv_cache_shape"][1:] == [2, runs["kvcomp"]["block_size"], 128] for r in trace), trace
    # the worker is a spawned process: the plugin was loaded there, not only in the front-end
    assert all(r["pid"] != os.getpid() for r in trace)
    assert "kvcomp attention backend active" in runs["kvcomp"]["log"]
    assert "kvcomp attention backend active" not in runs["stock"]["log"]


def test_greedy_tokens_identical(runs):
    hf, stock, kv = runs["hf"], runs["stock"]["tokens"], runs["kvcomp"]["tokens"]
    assert all(len(t) == MAX_TOKENS for t in hf)
    assert stock == hf, f"stock vLLM differs from HF:\n{stock}\n{hf}"
    assert kv == hf, f"kvcomp backend differs from HF:\n{kv}\n{hf}"


def test_kv_capacity_reported(runs):
    for name in ("stock", "kvcomp"):
        r = runs[name]
        print(f"{name}: {r['num_blocks']} blocks x {r['block_size']} tokens = {r['kv_tokens']:,} KV tokens; "
              f"max concurrency {r['max_concurrency']:.1f} at {r['max_model_len']} tokens/request; "
              f"vLLM log: {r['log_kv_tokens']} tokens; engine start {r['engine_start_s']} s")
        assert r["num_blocks"] > 0 and r["kv_tokens"] == r["log_kv_tokens"]
    # compression off: same page bytes, so the same capacity as stock vLLM
    assert runs["kvcomp"]["kv_tokens"] == runs["stock"]["kv_tokens"]
