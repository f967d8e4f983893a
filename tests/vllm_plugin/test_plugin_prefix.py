"""Prefix caching through kvcomp's vLLM backend (issue 12 point 6).

A²ATS and DuoAttention + A²ATS keep every token of a request in vLLM's blocks: codes in the device
pages, full K/V (with DuoAttention: the streaming heads' too, no ring) in the host mirror, which is
indexed by vLLM's block ids. A prefix-cache hit hands a request blocks whose codes and mirror rows
an earlier request wrote; the request writes only its own new blocks (vLLM's ``slot_mapping`` and
the code writes start at its first uncached token).

Each engine (``_run_prefix.py``, prefix caching on, prompts prefilled whole) runs three waves over
prompts sharing a 1024-token prefix: ``[A]``, then ``[B, C]`` together (both hit A's cached blocks
and decode side by side), then ``[A]`` again (hits the same blocks after B and C ran). Checks:
vLLM reports the hits (``num_cached_tokens`` >= 1024 on the later waves, 0 on the first), every
request's greedy tokens equal kvcomp's HF path on the whole prompt, and A's tokens are the same in
both waves (so B and C overwrote none of the shared codes or mirror rows).

Methods with a per-request ring (DuoAttention on exact pages, ThinK) hold tokens that the cached
pages do not (the streaming heads' sink and recent K/V, ThinK's full-width window); a hit would start
a request with an empty ring, so they refuse prefix caching at start-up, naming the flag.
"""

from __future__ import annotations

import json

import pytest

from _vllm_common import (DUO_PATTERN, HERE, HKV, KEEP, MAX_TOKENS, RECENT, SINK, D, L, _spawn, build_tiny_llama,
                          collect_engines, hf_greedy, kvcomp_hf_greedy, make_prompts, think_channels, tiny_vq,
                          vllm_python)

PREFIX = 1024
SUFFIXES = (37, 53, 20)
SERVED = ("vq", "duo+vq")
REFUSED = ("duo", "think")


@pytest.fixture(scope="module")
def prefix_runs(tmp_path_factory):
    py, why = vllm_python()
    if py is None:
        pytest.skip(why)
    import torch

    from kvcomp.config import CompressionConfig, DuoAttention, ThinK

    work = tmp_path_factory.mktemp("vllm_prefix")
    model = build_tiny_llama(work / "model")
    prefix = make_prompts((PREFIX,), seed=11)[0]
    a, b, c = [prefix + s for s in make_prompts(SUFFIXES, seed=12)]
    waves = [[a], [b, c], [a]]
    waves_file = work / "waves.json"
    waves_file.write_text(json.dumps(waves))
    geo = dict(num_layers=L, num_kv_heads=HKV, head_dim=D, num_q_heads=4)
    duo = DuoAttention(pattern=torch.tensor(DUO_PATTERN), sink=SINK, recent=RECENT)
    vq = tiny_vq(model)
    cfgs = {"vq": CompressionConfig(**geo, vq=vq), "duo+vq": CompressionConfig(**geo, duo=duo, vq=vq),
            "duo": CompressionConfig(**geo, duo=duo),
            "think": CompressionConfig(**geo, think=ThinK(prune_ratio=0.25, channels=think_channels(L, HKV, D, KEEP)))}
    procs = {}
    for name, cfg in cfgs.items():
        cfg.save(work / f"{name}_config")
        out, log, trace = work / f"{name}.json", work / f"{name}.log", work / f"{name}.trace.jsonl"
        cmd = [py, str(HERE / "_run_prefix.py"), "--model", str(work / "model"), "--waves", str(waves_file),
               "--out", str(out), "--config", str(work / f"{name}_config"), "--trace", str(trace),
               "--max-tokens", str(MAX_TOKENS)]
        procs[name] = (_spawn(cmd, log), out, log)
    prompts = [a, b, c]
    ref = {name: kvcomp_hf_greedy(model, prompts, MAX_TOKENS, cfgs[name]) for name in SERVED}
    ref["full"] = hf_greedy(model, prompts, MAX_TOKENS)
    res = {"ref": ref, **collect_engines(procs, REFUSED)}
    for name in SERVED:
        trace = work / f"{name}.trace.jsonl"
        res[name]["trace"] = [json.loads(x) for x in trace.read_text().splitlines()] if trace.exists() else []
    return res


@pytest.mark.parametrize("name", SERVED)
def test_prefix_hits_are_reported(prefix_runs, name):
    r = prefix_runs[name]
    assert r["prefix_caching"]
    cached = r["num_cached_tokens"]
    print(f"{name}: num_cached_tokens per wave {cached} (block size {r['block_size']}, {r['num_blocks']} blocks)")
    assert cached[0] == [0]
    assert all(n >= PREFIX for wave in cached[1:] for n in wave), cached


@pytest.mark.parametrize("name", SERVED)
def test_shared_prefix_tokens_match_kvcomp_hf_path(prefix_runs, name):
    r, ref = prefix_runs[name], prefix_runs["ref"]
    a1, (b, c), a3 = r["tokens"][0][0], r["tokens"][1], r["tokens"][2][0]
    assert ref[name] != ref["full"], "compression changes nothing: the test could not fail"
    assert [a1, b, c] == ref[name], f"vLLM+{name} with prefix hits {[a1, b, c]}\nkvcomp HF path {ref[name]}"
    assert a3 == a1, "the cached prefix blocks changed after other requests shared them"


def test_duo_vq_streaming_heads_live_in_the_mirror(prefix_runs):
    trace = prefix_runs["duo+vq"]["trace"]
    assert trace and all(t["method"] == "duo+vq" and t["ring"] is None and t["host_mirror_bytes"] > 0
                         for t in trace), trace


@pytest.mark.parametrize("name", REFUSED)
def test_ring_methods_refuse_prefix_caching_at_start(prefix_runs, name):
    r = prefix_runs[name]
    assert r["rc"] != 0, "a per-request ring served with prefix caching on"
    assert f"kvcomp {name}: " in r["log"] and "--no-enable-prefix-caching" in r["log"], r["log"][-3000:]
    assert "KVCOMP_PREFIX" not in r["log"]
