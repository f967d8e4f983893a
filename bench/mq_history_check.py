"""Multi-query later-question losses under the model's own history: are they the cache or the history?

    .venv/bin/python bench/mq_history_check.py --method duo --context-len 2048 \
        --runs bench/results/quality-runs/mq-model-history --out bench/results/quality-runs/mq-model-history/duo-2048-later-flips-oneshot.json

For each later question the full cache answered right and the method wrong (``kvcomp eval --mode multi-query
--history model`` runs of both, 50 trials), it replays the method's own conversation turn by turn, then
prefills the same tokens in one shot with the method and with the full cache. Equal turn-by-turn and
one-shot answers mean the append path is exact; a full cache that also fails on the method's conversation
means the loss came from the method's earlier answers carried forward, not from the compressed cache.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from transformers import DynamicCache
from kvcomp.cli import build_parser, _setup
from kvcomp.eval.multiquery import build_multiquery_samples
from kvcomp.eval.score import string_match_all
from kvcomp.hf.generate import _greedy, _eos_ids, _decode
from kvcomp.hf.attention import compress, restore

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--method", default="duo")
ap.add_argument("--context-len", type=int, default=2048)
ap.add_argument("--runs", default="bench/results/quality-runs/mq-model-history")
ap.add_argument("--limit", type=int, default=8)
ap.add_argument("--out", required=True)
args = ap.parse_args()
method, ctx, R = args.method, args.context_len, args.runs + "/"
a = build_parser().parse_args(["eval", "--dtype", "bfloat16", "--methods", f"full,{method}", "--context-lens", str(ctx),
                               "--mode", "multi-query", "--trials", "50", "--haystacks", "prose", "--out", "/dev/null"])
model, tok, configs = _setup(a)
samples = build_multiquery_samples(tok, context_lens=[ctx], n_trials=50, n_queries=4, haystacks=["prose"], seed=0, chat=True)
rec = {m: {(r["seed"], r["query_index"]): r for r in json.load(open(f"{R}mq-{ctx}-{m}.json"))["samples"]} for m in ("full", method)}
flips = [k for k in rec[method] if k[1] > 0 and rec["full"][k]["score"] == 1.0 and rec[method][k]["score"] < 1.0]
print(len(flips), "later-q flips r->w")
eos = _eos_ids(tok)
by_seed = {s.seed: s for s in samples}
res = []
for seed, qi in flips[: args.limit]:
    s = by_seed[seed]
    cfg = configs[method]
    # turn by turn, remembering every token fed
    cache = compress(model, cfg)
    fed, pending, outs = [], None, []
    try:
        for i, text in enumerate(s.turns[: qi + 1]):
            ids = tok(text, add_special_tokens=s.add_special_tokens and i == 0).input_ids
            if pending is not None:
                ids = [pending] + (ids[1:] if ids and ids[0] == pending else ids)
            fed.append(ids)
            out = _greedy(model, cache, torch.tensor([ids]), s.max_new_tokens, eos)
            fed[-1] = ids + out[:-1] if i < qi else ids
            pending = out[-1]
            outs.append(out)
    finally:
        restore(model)
    tb = _decode(tok, torch.tensor(outs[-1]))
    flat = [t for f in fed for t in f]
    row = {"seed": seed, "q": qi, "tokens": len(flat), "turns_pred": tb, "recorded": rec[method][(seed, qi)]["prediction"],
           "gold": s.answers[qi]}
    for name, c in (("oneshot_" + method, cfg), ("oneshot_full", None)):
        cache = DynamicCache(config=model.config) if c is None else compress(model, c)
        try:
            out = _greedy(model, cache, torch.tensor([flat]), s.max_new_tokens, eos)
        finally:
            if c is not None:
                restore(model)
        row[name] = _decode(tok, torch.tensor(out))
    row["score_turns"] = string_match_all(tb, s.answers[qi])
    row["score_oneshot"] = string_match_all(row["oneshot_" + method], s.answers[qi])
    row["score_oneshot_full"] = string_match_all(row["oneshot_full"], s.answers[qi])
    print(json.dumps(row), flush=True)
    res.append(row)
from kvcomp.utils.machine import git_commit, machine_info

with open(args.out, "w") as f:
    json.dump({"machine": machine_info(), "commit": git_commit(), "command": " ".join(sys.argv), "later_flips": len(flips),
               "checked": res}, f, indent=1)
