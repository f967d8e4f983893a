"""Run one vLLM engine (CPU) in its own process and write greedy tokens + KV capacity as JSON.

Used by the plugin tests (tests/vllm_plugin) and the CPU benchmark (bench/vllm_cpu.py)::

    python -m kvcomp.vllm_plugin.run_engine --model DIR --prompts prompts.json --max-tokens 8 \
        --mode kvcomp|stock --out result.json [--config KVCOMP_CONFIG_DIR] [--trace trace.jsonl]

``--mode kvcomp`` sets ``KVCOMP_VLLM_OVERRIDE_CPU=1`` so vLLM's CPU platform (which always picks
CPU_ATTN) resolves kvcomp's backend instead; ``stock`` leaves vLLM alone. The environment is set
before vLLM is imported: the engine core is a spawned process and inherits it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--prompts", required=True, help="JSON file: list of token-id lists")
    ap.add_argument("--max-tokens", type=int, required=True)
    ap.add_argument("--mode", choices=("kvcomp", "stock"), required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", default="", help="KVCOMP_CONFIG directory (kvcomp mode)")
    ap.add_argument("--trace", default="", help="KVCOMP_VLLM_TRACE file (kvcomp mode)")
    ap.add_argument("--max-model-len", type=int, default=512)
    ap.add_argument("--max-num-batched-tokens", type=int, default=64)
    ap.add_argument("--max-num-seqs", type=int, default=8)
    ap.add_argument("--no-override", action="store_true",
                    help="kvcomp mode without KVCOMP_VLLM_OVERRIDE_CPU (vLLM's CPU platform then picks CPU_ATTN)")
    ap.add_argument("--num-blocks", type=int, default=0, help="num_gpu_blocks_override (0: from the budget)")
    ap.add_argument("--tp", type=int, default=1, help="tensor parallel size (CPU: one rank per core group)")
    ap.add_argument("--kv-space-gib", default="1")
    ap.add_argument("--kv-cache-bytes", type=int, default=0,
                    help="device KV budget in bytes (overrides --kv-space-gib; A2ATS runs size the host mirror by it)")
    ap.add_argument("--kv-cache-dtype", default="auto", help="vLLM's --kv-cache-dtype (fp8: e4m3 pages)")
    ap.add_argument("--no-prefix-caching", action="store_true", help="(DuoAttention rings need it)")
    ap.add_argument("--inproc", action="store_true",
                    help="engine core and worker in this process (one vLLM import instead of three)")
    a = ap.parse_args()

    if a.kv_cache_bytes:  # vLLM's CPU platform lets the legacy GiB variable override the byte budget
        os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    else:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = a.kv_space_gib
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    if a.inproc:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if a.tp > 1 and not os.environ.get("VLLM_CPU_OMP_THREADS_BIND"):
        # vLLM's CPU workers bind to NUMA nodes by default and refuse more ranks than nodes
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < a.tp:
            raise SystemExit(f"--tp {a.tp} needs at least {a.tp} CPUs, have {len(cpus)}")
        per = len(cpus) // a.tp
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(
            ",".join(map(str, cpus[r * per:(r + 1) * per])) for r in range(a.tp))
    os.environ.pop("KVCOMP_CONFIG", None)
    os.environ.pop("KVCOMP_VLLM_TRACE", None)
    if a.mode == "kvcomp":
        os.environ["KVCOMP_VLLM_OVERRIDE_CPU"] = "0" if a.no_override else "1"
        if a.config:
            os.environ["KVCOMP_CONFIG"] = a.config
        if a.trace:
            os.environ["KVCOMP_VLLM_TRACE"] = a.trace
    else:
        os.environ["KVCOMP_VLLM_OVERRIDE_CPU"] = "0"

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(a.prompts) as f:
        prompts = json.load(f)
    t0 = time.time()
    llm = LLM(model=a.model, dtype="float32", enforce_eager=True, skip_tokenizer_init=True,
              max_model_len=a.max_model_len, max_num_batched_tokens=a.max_num_batched_tokens,
              max_num_seqs=a.max_num_seqs, seed=0, tensor_parallel_size=a.tp, enable_prefix_caching=not a.no_prefix_caching,
              kv_cache_dtype=a.kv_cache_dtype,
              **({"distributed_executor_backend": "uni"} if a.inproc else {}),
              **({"kv_cache_memory_bytes": a.kv_cache_bytes} if a.kv_cache_bytes else {}),
              **({"num_gpu_blocks_override": a.num_blocks} if a.num_blocks else {}))
    t_start = time.time() - t0
    sp = SamplingParams(temperature=0.0, max_tokens=a.max_tokens, ignore_eos=True, detokenize=False)
    t1 = time.time()
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], sp, use_tqdm=False)
    t_gen = time.time() - t1
    cc = llm.llm_engine.vllm_config.cache_config
    num_blocks = int(cc.num_gpu_blocks or 0)
    block_size = int(cc.block_size)
    max_model_len = int(llm.llm_engine.vllm_config.model_config.max_model_len)
    res = {
        "mode": a.mode,
        "tokens": [list(o.outputs[0].token_ids) for o in outs],
        "num_blocks": num_blocks,
        "block_size": block_size,
        "kv_tokens": num_blocks * block_size,
        "max_model_len": max_model_len,
        "max_concurrency": num_blocks * block_size / max_model_len,
        "engine_start_s": round(t_start, 2),
        "generate_s": round(t_gen, 2),
        "generated_tokens": sum(len(o.outputs[0].token_ids) for o in outs),
    }
    with open(a.out, "w") as f:
        json.dump(res, f)
    print("KVCOMP_RESULT " + json.dumps({k: v for k, v in res.items() if k != "tokens"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
