"""Peers on the same prompts: kvpress presses on SmolLM2, in their own venv (scripts/setup_kvpress.sh).

    scripts/setup_kvpress.sh
    .venv-kvpress/bin/python bench/peers_kvpress.py --context-lens 2048 --trials 4 \
        --presses snapkv@0.42,streaming_llm@0.91 --out bench/results/quality-peers.json

The prompts are kvcomp's (``kvcomp.eval.build_samples`` with the same tasks, haystacks, seed and
chat template as ``kvcomp eval``), the model is the HF folder ``kvcomp.models`` converted from the
bundled GGUF (kvpress loads it with its own transformers pin), greedy decoding, the same scorer.
A press compresses the prompt at prefill (kvpress's forward hooks); decoding is not compressed.

Savings are SIMULATED: kvpress keeps a dense cache and drops or zeros entries (ThinK zeroes key
channels), so ``kv_bytes_per_token`` is the full cache's bytes x (1 - compression ratio), not
allocated bytes. Method names are ``kvpress:<press>@<ratio>``; ``kvpress:none`` is the uncompressed
model under kvpress's transformers (a check that it matches kvcomp's full cache on these prompts).
Ratios matching kvcomp's device bytes on SmolLM2: 0.42 ~ DuoAttention 50% (58% of full), 0.91 ~
DuoAttention + A²ATS / all (9%), ThinK key channels 0.4 ~ kvcomp's ThinK λ=0.4.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

DEFAULT_PRESSES = ("none,snapkv@0.42,snapkv@0.91,streaming_llm@0.42,streaming_llm@0.91,"
                   "expected_attention@0.42,expected_attention@0.91,think@0.4")
DEFAULT_TASKS = "passkey,niah_single,niah_multikey,niah_multivalue,niah_multiquery"
PRESSES = ("none", "snapkv", "streaming_llm", "expected_attention", "think")


def parse_presses(spec: str) -> list[tuple[str, float]]:
    """``"snapkv@0.5,none"`` -> ``[("snapkv", 0.5), ("none", 0.0)]``; ValueError on an unknown press or ratio."""
    out = []
    for item in (x.strip() for x in spec.split(",") if x.strip()):
        name, _, ratio = item.partition("@")
        if name not in PRESSES:
            raise ValueError(f"unknown press {name!r}: choose from {', '.join(PRESSES)}")
        r = float(ratio) if ratio else 0.0
        if name != "none" and not 0.0 < r < 1.0:
            raise ValueError(f"press {name!r} needs a ratio in (0, 1), e.g. {name}@0.5, got {item!r}")
        out.append((name, r))
    if not out:
        raise ValueError("no presses given")
    return out


def make_press(name: str, ratio: float):
    """The kvpress object (None for ``none``); ``think``'s ratio is the fraction of key channels pruned."""
    import kvpress

    if name == "none":
        return None
    if name == "think":
        return kvpress.ThinKPress(key_channel_compression_ratio=ratio)
    cls = {"snapkv": kvpress.SnapKVPress, "streaming_llm": kvpress.StreamingLLMPress,
           "expected_attention": kvpress.ExpectedAttentionPress}[name]
    return cls(compression_ratio=ratio)


def kept_fraction(name: str, ratio: float) -> float:
    """Fraction of the full cache's bytes a press would keep if its dropped entries were freed."""
    if name == "none":
        return 1.0
    return 1.0 - (ratio / 2 if name == "think" else ratio)  # ThinK prunes key channels only


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="kvcomp model name or HF folder")
    p.add_argument("--presses", default=DEFAULT_PRESSES, help="comma-separated press@ratio (none, snapkv, "
                   "streaming_llm, expected_attention, think)")
    p.add_argument("--tasks", default=DEFAULT_TASKS)
    p.add_argument("--haystacks", default="prose")
    p.add_argument("--context-lens", default="2048")
    p.add_argument("--trials", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="model weights and KV cache, as kvcomp eval's --dtype")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    presses = parse_presses(a.presses)
    if a.trials < 1:
        raise SystemExit("--trials must be >= 1")

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from kvcomp.eval.runner import build_samples, evaluate_samples, summarize
    from kvcomp.models import model_folder
    from kvcomp.utils.machine import git_commit, machine_info

    commit, machine = git_commit(), machine_info()
    folder = model_folder(a.model)
    tok = AutoTokenizer.from_pretrained(folder)
    dtype = getattr(torch, a.dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).eval()
    c = model.config
    hkv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    full_bpt = 2 * c.num_hidden_layers * hkv * d * dtype.itemsize  # K and V, every layer and KV head
    samples = build_samples(tok, tasks=a.tasks.split(","), context_lens=[int(x) for x in a.context_lens.split(",")],
                            n_trials=a.trials, haystacks=a.haystacks.split(","), seed=a.seed, chat=True)
    print(f"[peers] {len(samples)} samples x {len(presses)} presses, model {folder}")
    records, t_start, method_seconds = [], time.perf_counter(), {}
    for name, ratio in presses:
        press = make_press(name, ratio)
        method = "kvpress:none" if name == "none" else f"kvpress:{name}@{ratio:g}"
        bpt = full_bpt * kept_fraction(name, ratio)

        @torch.inference_mode()
        def gen(s, press=press, bpt=bpt):
            ids = tok(s.prompt, add_special_tokens=s.add_special_tokens, return_tensors="pt").input_ids
            t0 = time.perf_counter()
            kw = dict(max_new_tokens=s.max_new_tokens, do_sample=False, num_beams=1, pad_token_id=tok.eos_token_id,
                      temperature=None, top_p=None, top_k=None)
            if press is None:
                out = model.generate(ids, **kw)
            else:
                with press(model):
                    out = model.generate(ids, **kw)
            text = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
            return text, {"kv_bytes_per_token": bpt, "device_bytes_per_token": bpt, "simulated": 1.0,
                          "seconds": time.perf_counter() - t0}

        t0 = time.perf_counter()
        records += evaluate_samples(gen, samples, method_name=method)
        method_seconds[method] = round(time.perf_counter() - t0, 1)
    summary = summarize(records)
    for r in summary:
        r["simulated"] = True
        r["tasks"] = a.tasks
    import kvpress
    import transformers

    meta = {"model": a.model, "folder": folder, "tasks": a.tasks.split(","), "haystacks": a.haystacks,
            "trials": a.trials, "seed": a.seed, "dtype": a.dtype, "command": " ".join(sys.argv), "kvpress": kvpress.__version__
            if hasattr(kvpress, "__version__") else "0.5.5", "transformers": transformers.__version__,
            "simulated": True, "note": "kvpress masks/drops entries of a dense cache: bytes are full x (1 - ratio), "
            "not allocated", "method_seconds": method_seconds, "seconds": round(time.perf_counter() - t_start, 1)}
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump({"machine": machine, "commit": commit, "meta": meta, "records": summary, "samples": records},
                  f, indent=1)
    print(json.dumps([{k: r[k] for k in ("method", "context_len", "accuracy", "ci95", "n_prompts")} for r in summary]))
    print(f"[peers] wrote {a.out} ({meta['seconds']} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
