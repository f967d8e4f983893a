"""Run waves of prompts through one engine (in-process, CPU; kvcomp's backend unless --stock).

    python tests/vllm_plugin/_run_prefix.py --model DIR --waves waves.json --out result.json \
        [--config KVCOMP_CONFIG_DIR] [--trace T] [--kv-cache-bytes N] [--no-prefix-caching] \
        [--kv-cache-dtype fp8] [--stock]

``waves.json`` is a list of waves, each a list of token-id prompts; a wave is one ``generate``
call, run after the previous wave finished, so later waves can hit the blocks earlier ones cached.
The result JSON holds, per wave and request, the greedy tokens and vLLM's ``num_cached_tokens``
(the prompt tokens served from the prefix cache), plus the block size and block count.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--waves", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", default="")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--kv-cache-bytes", type=int, default=1 << 20)
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--trace", default="", help="KVCOMP_VLLM_TRACE file")
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--stock", action="store_true", help="vLLM's own CPU backend (no kvcomp)")
    a = ap.parse_args()

    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["KVCOMP_VLLM_OVERRIDE_CPU"] = "0" if a.stock else "1"
    for var, val in (("KVCOMP_CONFIG", a.config), ("KVCOMP_VLLM_TRACE", a.trace)):
        os.environ.pop(var, None)
        if val:
            os.environ[var] = val

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(a.waves) as f:
        waves = json.load(f)
    # whole prompts in one step (exact prefill, like the HF path's), explicit device budget
    llm = LLM(model=a.model, dtype="float32", enforce_eager=True, skip_tokenizer_init=True,
              max_model_len=a.max_model_len, max_num_batched_tokens=a.max_model_len, max_num_seqs=4, seed=0,
              enable_prefix_caching=not a.no_prefix_caching, distributed_executor_backend="uni",
              kv_cache_memory_bytes=a.kv_cache_bytes, kv_cache_dtype=a.kv_cache_dtype)
    sp = SamplingParams(temperature=0.0, max_tokens=a.max_tokens, ignore_eos=True, detokenize=False)
    res = {"tokens": [], "num_cached_tokens": []}
    for wave in waves:
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in wave], sp, use_tqdm=False)
        res["tokens"].append([list(o.outputs[0].token_ids) for o in outs])
        res["num_cached_tokens"].append([int(o.num_cached_tokens or 0) for o in outs])
    cc = llm.llm_engine.vllm_config.cache_config
    res.update(block_size=int(cc.block_size), num_blocks=int(cc.num_gpu_blocks or 0),
               prefix_caching=bool(cc.enable_prefix_caching))
    with open(a.out, "w") as f:
        json.dump(res, f)
    print("KVCOMP_PREFIX " + json.dumps({k: v for k, v in res.items() if k != "tokens"}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
