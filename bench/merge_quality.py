"""Merge per-context-length `kvcomp eval` outputs into one results file and plot.

    python bench/merge_quality.py bench/results/quality-smollm2-2048.json bench/results/quality-smollm2-4096.json \
        --out bench/results/quality-smollm2.json --plot bench/results/quality-smollm2.png

Each input was written by ``kvcomp eval`` (one process per context length, so they can run in
parallel). Records keep their own run's commit; inputs from different commits are refused unless
``--allow-mixed`` is given. Records of a tagged run (``--tag``) without their own full-cache row get
``full_accuracy`` from the untagged full row of the same context length.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

REQUIRED = ("method", "context_len", "accuracy", "full_accuracy", "kv_bytes_per_token", "full_kv_bytes_per_token",
            "n_trials")


def merge(paths: list[str], allow_mixed: bool = False) -> dict:
    runs = []
    for p in paths:
        with open(p) as f:
            runs.append(json.load(f))
    commits = sorted({r["commit"] for r in runs})
    if len(commits) > 1 and not allow_mixed:
        raise SystemExit(f"inputs come from different commits {commits}; rerun or pass --allow-mixed")
    records, samples = [], []
    for run in runs:
        for rec in run["records"]:
            sel = rec.get("stats", {}).get("selected_fraction")
            extra = {} if sel is None else {"selected_fraction": sel}  # VQ: tokens attended per KV head
            records.append(dict(rec, commit=run["commit"], machine_line=run["machine"].get("line"), **extra))
        samples += run.get("samples", [])
    full = {r["context_len"]: r for r in records if r["method"] == "full"}
    for r in records:
        f = full.get(r["context_len"])
        if "full_accuracy" not in r and f is not None:
            r["full_accuracy"] = f["accuracy"]
            r["full_kv_bytes_per_token"] = f["kv_bytes_per_token"]
            r["accuracy_retained"] = r["accuracy"] / f["accuracy"] if f["accuracy"] else None
            r["bytes_fraction"] = r["kv_bytes_per_token"] / f["kv_bytes_per_token"]
        missing = [k for k in REQUIRED if k not in r]
        if missing:
            raise SystemExit(f"record {r['method']}@{r['context_len']} lacks {missing}")
    records.sort(key=lambda r: (r["context_len"], r["method"]))
    return {"commit": commits[0] if len(commits) == 1 else commits, "machine": runs[0]["machine"],
            "meta": [run["meta"] for run in runs], "records": records, "samples": samples}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--plot", default=None)
    p.add_argument("--allow-mixed", action="store_true")
    a = p.parse_args(argv)
    obj = merge(a.inputs, a.allow_mixed)
    with open(a.out, "w") as f:
        json.dump(obj, f, indent=1)
    print(f"{'method':>14} {'ctx':>5} {'acc':>6} {'full':>6} {'kept':>6} {'B/token':>9} {'of full':>8} {'sel':>6}")
    for r in obj["records"]:
        kept = r.get("accuracy_retained")
        sel = r.get("selected_fraction")
        print(f"{r['method']:>14} {r['context_len']:>5} {r['accuracy']:6.3f} {r['full_accuracy']:6.3f} "
              f"{'' if kept is None else f'{kept:6.2f}':>6} {r['kv_bytes_per_token']:9.0f} "
              f"{r['kv_bytes_per_token'] / r['full_kv_bytes_per_token']:8.3f} {'' if sel is None else f'{sel:6.3f}':>6}")
    if a.plot:
        from kvcomp.eval.plot import plot_accuracy_vs_kv

        plot_accuracy_vs_kv(obj["records"], a.plot, title="SmolLM2-135M: accuracy vs allocated KV bytes/token")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
