"""ThinK variants on chosen prompts of the ``kvcomp eval`` grid (same seeds, same prompts), for quick
A/B tests of ThinK's knobs on a small fast set (e.g. the prompts a full run flipped) before a full run.

Variants are ``;``-separated, each a ``,``-joined list of ``base`` (the defaults), ``w=N`` (observation
window / full-width recent keys), ``skip=N`` (the first N layers unpruned), ``lam=X`` (prune ratio)::

    OMP_NUM_THREADS=1 PYTHONPATH=. python bench/think_variants.py --context-len 4096 \\
        --select niah_single:1,niah_single:5,niah_single:7,niah_multivalue:7 \\
        --variants "base;w=128;w=256;skip=1;skip=2" --out /tmp/think-variants.json

Writes per variant the records (task, trial, score, prediction) and device bytes per token; a rerun
skips the variants already in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery")


def think_config(model, variant: str):
    """The :class:`~kvcomp.config.CompressionConfig` (ThinK only) of one variant string."""
    from kvcomp.config import CompressionConfig, ThinK

    c = model.config
    kw = {}
    for part in variant.split(","):
        k, _, val = part.partition("=")
        if k == "base":
            continue
        if k == "w":
            kw["window"] = int(val)
        elif k == "skip":
            heads = torch.ones(c.num_hidden_layers, c.num_key_value_heads, dtype=torch.bool)
            heads[: int(val)] = False
            kw["heads"] = heads
        elif k == "lam":
            kw["prune_ratio"] = float(val)
        else:
            raise SystemExit(f"variant {variant!r}: unknown knob {k!r} (use base, w=, skip=, lam=)")
    return CompressionConfig.for_model(model, think=ThinK(**kw))


def main() -> None:
    from kvcomp.eval.runner import build_samples, evaluate_samples
    from kvcomp.hf.generate import make_generate
    from kvcomp.models import load_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", required=True)
    p.add_argument("--select", default="all", help="'all' or task:trial,... of the grid")
    p.add_argument("--context-len", type=int, default=4096)
    p.add_argument("--trials", type=int, default=13)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    model, tok = load_model("smollm2-135m", device="cpu", dtype=torch.bfloat16)
    samples = build_samples(tok, tasks=TASKS, context_lens=[a.context_len], n_trials=a.trials,
                            haystacks=["prose"], seed=a.seed, chat=True)
    if a.select != "all":
        keep = {(s.split(":")[0], int(s.split(":")[1])) for s in a.select.split(",")}
        samples = [s for s in samples if (s.task, s.meta["trial"]) in keep]
    out = json.load(open(a.out)) if os.path.exists(a.out) else {}
    for v in a.variants.split(";"):
        if v in out:
            continue
        cfg, t0 = think_config(model, v), time.time()
        recs = evaluate_samples(make_generate(model, tok, cfg, batched=a.batch_size > 1), samples,
                                method_name=v, batch_size=a.batch_size, progress=False)
        out[v] = {"seconds": round(time.time() - t0, 1), "config": cfg.describe(),
                  "device_bytes_per_token": recs[0]["stats"]["device_bytes_per_token"],
                  "records": [{k: r[k] for k in ("task", "trial", "score", "prediction")} for r in recs]}
        print(v, [(r["task"], r["trial"], r["score"]) for r in recs], out[v]["seconds"], "s", flush=True)
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
