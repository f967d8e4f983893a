"""How sensitive are SmolLM2's fp8 answers to last-bit fp32 differences before e4m3 rounding?

    .venv/bin/python bench/fp8_sensitivity.py 1e-6 bench/results/fp8-sensitivity-smollm2.json

kvcomp's HF path on bench/vllm_cpu.py's 12 passkey prompts (1K, prose, 16 greedy tokens), compression
off: with K/V rounded to e4m3 (the reference of vLLM's --kv-cache-dtype fp8) once as is and once with
every new K/V scaled by (1 + eps) before rounding, and the same pair without rounding. The count of
equal answers in each pair says whether a last-bit difference between two fp32 forwards (vLLM's and
transformers') is enough to change answers once the cache is e4m3.
"""
import contextlib
import json
import sys

import torch
from kvcomp.config import CompressionConfig
from kvcomp.eval.tasks import make_sample
from kvcomp.hf.cache import KVCompLayer
from kvcomp.hf.fp8 import rounded_kv
from kvcomp.hf.generate import generate, sample_input_ids
from kvcomp.models import load_model

eps = float(sys.argv[1]) if len(sys.argv) > 1 else 1e-6
torch.manual_seed(0)
model, tok = load_model("smollm2-135m", device="cpu")
samples = [make_sample("passkey", tok, 1024, haystack="prose", seed=s, max_new_tokens=16) for s in range(12)]
cfg = CompressionConfig.for_model(model)

def run(perturb: bool, rounded: bool) -> list[str]:
    """Answers of the 12 prompts; ``perturb``: every new K/V scaled by (1 + eps) before it is stored
    (with ``rounded``: before its e4m3 rounding)."""
    with rounded_kv() if rounded else contextlib.nullcontext():
        upd = KVCompLayer.update  # rounding (when on) runs after the nudge
        if perturb:
            def nudged(self, k, v, *a, **kw):
                return upd(self, k * (1 + eps), v * (1 + eps), *a, **kw)
            KVCompLayer.update = nudged
        try:
            return [generate(model, tok, sample_input_ids(tok, s), cfg, max_new_tokens=16).text for s in samples]
        finally:
            KVCompLayer.update = upd


a, b = run(False, True), run(True, True)
c, d = run(False, False), run(True, False)
res = {"eps": eps, "fp8_same": sum(x.strip() == y.strip() for x, y in zip(a, b)),
       "no_fp8_same": sum(x.strip() == y.strip() for x, y in zip(c, d)), "n": len(samples)}
print(json.dumps(res))
if len(sys.argv) > 2:
    from kvcomp.utils.machine import git_commit, machine_info
    res.update(machine=machine_info(), commit=git_commit(), argv=sys.argv[1:],
               answers={"fp8": a, "fp8_nudged": b, "exact": c, "exact_nudged": d})
    with open(sys.argv[2], "w") as f:
        json.dump(res, f, indent=1)
