"""Continuous batching, chunked prefill, preemption and abort with every method.

Each ``stress-<method>`` engine of the session fixture (conftest.py, ``_run_stress.py``) serves 10
requests of 1-150 prompt tokens (16 greedy tokens each) plus two that are aborted (one during its
prefill, one after 3 decoded tokens), with 32-token chunked prefill and a pool of 12-13 blocks of 16
tokens, so vLLM must preempt and recompute. Checks: every request completes with all its tokens,
the aborted ones produce nothing, vLLM's block pool (pages, DuoAttention/ThinK rings) is entirely
free afterwards, the A²ATS host mirror neither grows nor shrinks while requests come and go (it
shadows the pages; no per-request host state), and the methods whose semantics do not depend on
chunking (exact, DuoAttention) still produce the reference tokens after preemption.
"""

from __future__ import annotations

import pytest

from _vllm_common import STRESS_LENGTHS, STRESS_TOKENS

METHODS = ("off", "think", "duo", "vq", "duo+vq")


@pytest.mark.parametrize("method", METHODS)
def test_every_request_completes_and_everything_is_freed(engines, method):
    r = engines[f"stress-{method}"]
    print(f"{method}: {r['preemptions']} preemptions in {r['steps']} steps; blocks free "
          f"{r['free_blocks_before']} -> {r['free_blocks_after']} of {r['num_blocks']}; "
          f"host mirror {r['mirror_bytes_first_step']} -> {r['mirror_bytes_after']} bytes")
    assert r["preemptions"] >= 1, "the pool was large enough that nothing was preempted: the test is vacuous"
    assert sorted(r["tokens"]) == sorted(f"r{i}" for i in range(len(STRESS_LENGTHS)))
    assert all(len(t) == STRESS_TOKENS for t in r["tokens"].values())
    assert r["aborted"] == ["abort-prefill", "abort-decode"] and r["finished_aborted"] == []
    assert r["running_after"] == r["waiting_after"] == 0
    assert r["free_blocks_after"] == r["free_blocks_before"]
    assert r["mirror_bytes_after"] == r["mirror_bytes_first_step"]
    assert (r["mirror_bytes_after"] > 0) == ("vq" in method)


@pytest.mark.parametrize("method", ("off", "duo"))
def test_tokens_survive_preemption_and_chunking(engines, method):
    r = engines[f"stress-{method}"]
    got = [r["tokens"][f"r{i}"] for i in range(len(STRESS_LENGTHS))]
    assert got == engines["stress_ref"][method]
