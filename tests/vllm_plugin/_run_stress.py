"""Stress one kvcomp engine (in-process, CPU): many requests of mixed lengths, chunked prefill,
a KV pool small enough to force preemption, two aborts; report what vLLM and the backend hold after.

    python tests/vllm_plugin/_run_stress.py --model DIR --prompts prompts.json --out result.json \
        [--config KVCOMP_CONFIG_DIR] [--blocks 24]

Every prompt in ``prompts.json`` runs to ``--max-tokens`` (ignore_eos); two extra requests are
aborted, one during its prefill and one after decoding a few tokens. The result JSON holds the
tokens of the finished requests, the preemption count (counted on the scheduler), vLLM's free
blocks before and after, and the host-mirror bytes (A²ATS) before the first and after the last step.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", default="")
    ap.add_argument("--blocks", type=int, default=12, help="KV blocks of 16 tokens in vLLM's pool")
    ap.add_argument("--max-tokens", type=int, default=16)
    a = ap.parse_args()

    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["KVCOMP_VLLM_OVERRIDE_CPU"] = "1"
    os.environ.pop("KVCOMP_CONFIG", None)
    if a.config:
        os.environ["KVCOMP_CONFIG"] = a.config

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from kvcomp.vllm_plugin.mirror import mirror_bytes

    with open(a.prompts) as f:
        prompts = json.load(f)
    llm = LLM(model=a.model, dtype="float32", enforce_eager=True, skip_tokenizer_init=True, max_model_len=176,
              max_num_batched_tokens=32, max_num_seqs=6, seed=0, enable_prefix_caching=False, block_size=16,
              num_gpu_blocks_override=a.blocks, distributed_executor_backend="uni",
              kv_cache_memory_bytes=64 << 20)  # explicit budget: no check against free host memory
    engine = llm.llm_engine
    sched = engine.engine_core.engine_core.scheduler
    pool = sched.kv_cache_manager.block_pool
    preempted = []
    orig = sched._preempt_request

    def counting(request, *args, **kwargs):
        preempted.append(request.request_id)
        return orig(request, *args, **kwargs)

    sched._preempt_request = counting
    free_before = pool.get_num_free_blocks()
    sp = SamplingParams(temperature=0.0, max_tokens=a.max_tokens, ignore_eos=True, detokenize=False)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", TokensPrompt(prompt_token_ids=p), sp)
    engine.add_request("abort-prefill", TokensPrompt(prompt_token_ids=(prompts[-1] * 2)[:160]), sp)
    engine.add_request("abort-decode", TokensPrompt(prompt_token_ids=prompts[0]), sp)
    done, steps, aborted, mirror_first = {}, 0, [], None
    progress = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            progress[out.request_id] = len(out.outputs[0].token_ids)
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
        steps += 1
        if mirror_first is None:
            mirror_first = mirror_bytes()
        if steps == 2 and "abort-prefill" not in aborted:
            engine.abort_request(["abort-prefill"])
            aborted.append("abort-prefill")
        if progress.get("abort-decode", 0) >= 3 and "abort-decode" not in aborted:
            engine.abort_request(["abort-decode"])
            aborted.append("abort-decode")
        if steps > 2000:
            raise RuntimeError("stress run did not finish in 2000 steps")
    res = {
        "tokens": {k: v for k, v in done.items() if k.startswith("r")},
        "aborted": aborted,
        "finished_aborted": sorted(k for k in done if k.startswith("abort")),
        "preemptions": len(preempted),
        "steps": steps,
        "num_blocks": int(pool.num_gpu_blocks),
        "free_blocks_before": int(free_before),
        "free_blocks_after": int(pool.get_num_free_blocks()),
        "running_after": len(sched.running),
        "waiting_after": len(sched.waiting),
        "mirror_bytes_first_step": mirror_first,
        "mirror_bytes_after": mirror_bytes(),
    }
    with open(a.out, "w") as f:
        json.dump(res, f)
    print("KVCOMP_STRESS " + json.dumps({k: v for k, v in res.items() if k != "tokens"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
