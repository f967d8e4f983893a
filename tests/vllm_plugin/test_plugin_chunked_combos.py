"""ThinK + A²ATS (and all three methods) with a chunked prefill: vLLM = kvcomp's HF path fed the same chunks.

With ThinK, a later prefill chunk attends to the earlier chunks' keys narrow (all but the last
``window``), as decoding does; a prompt prefilled in one step attends to all of them at full width.
So a chunked vLLM run differs from the HF path's one-shot prefill by design (the CPU benchmark's
``think+vq`` 10/12 and ``all`` 11/12 same answers on 1K prompts chunked by a 1,024-token budget; the
same engine unchunked gave the one-shot tokens 12/12). This checks the chunked semantics are the
same in both paths: one 150-token prompt, ``max_num_batched_tokens=64`` (chunks 64 + 64 + 22),
against the HF path given those chunks.
"""

from __future__ import annotations

import json

import pytest
from _vllm_common import (DUO_PATTERN, MAX_TOKENS, RECENT, SINK, VQ_KV_BYTES, D, HKV, L, build_tiny_llama, cpu_ops,
                          finish_engine, make_prompts, start_engine, tiny_vq, vllm_python)

WINDOW_VQ = 8  # ThinK's window with A²ATS (A²ATS's local window, 8 tokens, covers it)
CHUNK = 64


def hf_chunked(model, prompt: list[int], chunk: int, max_tokens: int, config):
    """``(greedy tokens, logits after the prompt)`` of kvcomp's HF path, the prompt fed ``chunk`` tokens per step
    (``chunk`` >= the prompt: one step)."""
    import torch

    from kvcomp.hf import compress, restore

    try:
        with torch.no_grad(), cpu_ops():
            cache = compress(model, config)
            for s in range(0, len(prompt), chunk):
                logits = model(torch.tensor([prompt[s:s + chunk]]), past_key_values=cache, use_cache=True).logits[0, -1]
            first, ids = logits.clone(), []
            for _ in range(max_tokens):
                ids.append(int(logits.argmax()))
                logits = model(torch.tensor([[ids[-1]]]), past_key_values=cache, use_cache=True).logits[0, -1]
    finally:
        restore(model)
    return ids, first


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    py, why = vllm_python()
    if py is None:
        pytest.skip(why)
    import torch

    from kvcomp.config import CompressionConfig, DuoAttention, ThinK

    work = tmp_path_factory.mktemp("vllm_chunked_combos")
    model = build_tiny_llama(work / "model")
    prompt = make_prompts((150,), seed=11)[0]
    (work / "long.json").write_text(json.dumps([prompt]))
    geo = dict(num_layers=L, num_kv_heads=HKV, head_dim=D, num_q_heads=4)
    duo = DuoAttention(pattern=torch.tensor(DUO_PATTERN), sink=SINK, recent=RECENT)
    vq = tiny_vq(model)
    cfgs = {"think+vq": CompressionConfig(**geo, think=ThinK(prune_ratio=0.25, window=WINDOW_VQ), vq=vq),
            "duo+think+vq": CompressionConfig(**geo, duo=duo, think=ThinK(prune_ratio=0.25, window=WINDOW_VQ), vq=vq)}
    procs = {}
    for name, c in cfgs.items():
        c.save(work / f"{name}_config")
        procs[name] = start_engine(py, work, name, work / "model", work / "long.json", MAX_TOKENS, "kvcomp",
                                   config=str(work / f"{name}_config"), inproc=True, prefix_caching=False,
                                   extra=("--max-num-batched-tokens", str(CHUNK), "--kv-cache-bytes", str(VQ_KV_BYTES)))
    ref = {name: {"chunked": hf_chunked(model, prompt, CHUNK, MAX_TOKENS, c),
                  "whole": hf_chunked(model, prompt, len(prompt), MAX_TOKENS, c)} for name, c in cfgs.items()}
    errors, res = [], {}
    for name, p in procs.items():  # wait for all before failing, so no engine outlives the module
        try:
            res[name] = finish_engine(*p)
        except (AssertionError, OSError) as e:
            errors.append(f"[{name}] {e}")
    if errors:
        raise AssertionError("\n".join(errors))
    return res, ref


@pytest.mark.parametrize("name", ["think+vq", "duo+think+vq"])
def test_chunked_prefill_matches_hf_path_fed_the_same_chunks(runs, name):
    res, ref = runs
    chunked, whole = ref[name]["chunked"], ref[name]["whole"]
    # the chunked reference is not the one-shot one: later chunks see narrow keys (the check could fail)
    assert (chunked[1] - whole[1]).abs().max() > 1e-4, "chunked and one-shot prefill give the same logits"
    assert chunked[0] != whole[0], "chunked and one-shot prefill give the same tokens: the check cannot fail"
    got = res[name]["tokens"][0]
    assert got == chunked[0], f"vLLM {name} (chunks of {CHUNK}) {got}\nHF path, same chunks {chunked[0]}\n" \
                              f"HF path, one step {whole[0]}"
