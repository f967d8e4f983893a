"""One session fixture starts every vLLM engine the plugin tests need, all at once.

An engine start costs ~15-30 s of CPU per vLLM import (one in-process, three when the engine core
and worker are spawned), so the three runs overlap with each other and with the HF references:

* ``stock``: stock vLLM (CPU_ATTN), in-process engine;
* ``off``: kvcomp's backend without a config, in-process engine;
* ``think``: kvcomp's backend with a saved ThinK config, in-process engine;
* ``duo``: kvcomp's backend with a saved DuoAttention config (rings registered from the worker),
  default process topology (spawned engine core + worker), so the entry point and
  ``KVCOMP_CONFIG`` must reach the worker.
"""

from __future__ import annotations

import json

import pytest

from _vllm_common import (DUO_PATTERN, RECENT, SINK, D, HKV, KEEP, MAX_TOKENS, L, build_tiny_llama, finish_engine,
                          hf_greedy, make_prompts, start_engine, think_channels, use_duo_attention,
                          use_pruned_key_attention, vllm_python)


@pytest.fixture(scope="session")
def engines(tmp_path_factory):
    py, why = vllm_python()
    if py is None:
        pytest.skip(why)
    import torch

    from kvcomp.config import CompressionConfig, DuoAttention, ThinK

    work = tmp_path_factory.mktemp("vllm_engines")
    model_dir = work / "model"
    model = build_tiny_llama(model_dir)
    prompts = make_prompts()
    prompts_file = work / "prompts.json"
    prompts_file.write_text(json.dumps(prompts))
    ch = think_channels(L, HKV, D, KEEP)
    CompressionConfig(num_layers=L, num_kv_heads=HKV, head_dim=D, num_q_heads=4,
                      think=ThinK(prune_ratio=0.25, channels=ch)).save(work / "think_config")
    pattern = torch.tensor(DUO_PATTERN)
    CompressionConfig(num_layers=L, num_kv_heads=HKV, head_dim=D, num_q_heads=4,
                      duo=DuoAttention(pattern=pattern, sink=SINK, recent=RECENT)).save(work / "duo_config")
    traces = {name: work / f"{name}.trace.jsonl" for name in ("off", "think", "duo")}
    procs = {
        "duo": start_engine(py, work, "duo", model_dir, prompts_file, MAX_TOKENS, "kvcomp",
                            config=str(work / "duo_config"), trace=str(traces["duo"]), prefix_caching=False),
        "think": start_engine(py, work, "think", model_dir, prompts_file, MAX_TOKENS, "kvcomp",
                              config=str(work / "think_config"), trace=str(traces["think"]), inproc=True),
        "stock": start_engine(py, work, "stock", model_dir, prompts_file, MAX_TOKENS, "stock", inproc=True),
        "off": start_engine(py, work, "off", model_dir, prompts_file, MAX_TOKENS, "kvcomp",
                            trace=str(traces["off"]), inproc=True),
    }
    hf_full = hf_greedy(model, prompts, MAX_TOKENS)
    use_pruned_key_attention(model, ch)
    hf_pruned = hf_greedy(model, prompts, MAX_TOKENS)
    use_duo_attention(model, pattern, SINK, RECENT)
    hf_duo = hf_greedy(model, prompts, MAX_TOKENS)
    errors, res = [], {}
    for name, p in procs.items():  # wait for all before failing, so no engine outlives the session
        try:
            res[name] = finish_engine(*p)
        except AssertionError as e:
            errors.append(f"[{name}] {e}")
    if errors:
        raise AssertionError("\n".join(errors))
    for name, path in traces.items():
        res[name]["trace"] = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    res["hf_full"], res["hf_pruned"], res["hf_duo"] = hf_full, hf_pruned, hf_duo
    return res
