"""A²ATS top-K sweep next to the oracle top-K: one JSON from `kvcomp eval --keep-samples` runs.

Each cell is a ``kvcomp eval`` output of one method (``--methods vq --topk T``, with
``--vq-select oracle`` for the exact-score baseline) on the same prompts as the full-cache run
(``--full``); ``--cell LABEL=FILE`` renames the cell's records to LABEL (e.g. to reuse the
published ``single-2048-vq.json`` as ``vq@topk0.1``). Before merging, every cell's prompts
(task, haystack, context, seed, gold answers, prompt length) must equal the full run's. Rows carry
accuracy, the Wilson 95% interval, retention and paired flips vs the full cache
(:func:`kvcomp.eval.runner.compare_to_full`), the mean fraction of tokens attended by the VQ
heads (``selected_fraction``: GQA union + sinks + local window, at the last decode step), and
``vs_oracle``: the codes' cell paired against the oracle's cell of the same top-K. The output keeps
its rows under ``cells`` and the per-prompt records under ``prompt_records`` so that
``bench/merge_quality.py`` (which pools ``samples`` and imports ``rows``) skips it: these are
analysis cells, not published method rows.

    python bench/a2ats_sweep.py --full bench/results/quality-runs/single-2048-full.json \\
        --cell vq@topk0.03=runs/2048-vq-0.03.json --cell vq@oracle0.03=runs/2048-oracle-0.03.json \\
        --out bench/results/quality-runs/analysis/a2ats-topk-sweep-2048.json --note "..."
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from merge_quality import _row, _source, _tasks  # noqa: E402


def _prompt(s: dict) -> tuple:
    return (s["task"], s["haystack"], s["context_len"], s["seed"], s.get("trial"), s.get("depth"),
            tuple(s["answers"]), s["n_prompt_tokens"])


def load_cell(path: str, label: str | None) -> tuple[dict, list[dict]]:
    with open(path) as f:
        run = json.load(f)
    samples = run.get("samples")
    if not samples:
        raise ValueError(f"{path}: no per-sample records (run kvcomp eval with --keep-samples)")
    names = {s["method"] for s in samples}
    if len(names) != 1:
        raise ValueError(f"{path}: one method per cell expected, got {sorted(names)}")
    if label:
        samples = [dict(s, method=label) for s in samples]
    return run, samples


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", required=True, help="kvcomp eval output of --methods full (with --keep-samples)")
    ap.add_argument("--cell", action="append", default=[], help="LABEL=FILE or FILE (label: the run's method name)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--note", default="")
    ap.add_argument("--extra", default=None, help="JSON file merged into the output (e.g. a paper comparison)")
    a = ap.parse_args(argv)
    from kvcomp.eval.runner import compare_to_full, summarize
    from kvcomp.eval.stats import paired

    full_run, full = load_cell(a.full, "full")
    want = sorted(_prompt(s) for s in full)
    pooled, sources, cells = list(full), {"full": _source(a.full, full_run)}, {}
    tasks = _tasks(full_run)
    for c in a.cell:
        label, path = c.split("=", 1) if "=" in c else (None, c)
        run, samples = load_cell(path, label)
        got = sorted(_prompt(s) for s in samples)
        if got != want:
            raise ValueError(f"{path}: its prompts differ from {a.full}'s ({len(got)} vs {len(want)})")
        name = samples[0]["method"]
        if name in sources:
            raise ValueError(f"{path}: method {name!r} given twice")
        sources[name] = _source(path, run)
        cells[name] = samples
        pooled += samples
    rows = [_row(r, sources[r["method"]], tasks) for r in compare_to_full(summarize(pooled), pooled)]
    for r in rows:
        m = r["method"]
        if "@oracle" in m:
            r["analysis_baseline"] = ("exact q.k ranking over the full host keys: saves nothing; its bytes columns "
                                      "are those of the codes path it runs on, not a cost")
        if "@topk" in m:
            o = m.replace("@topk", "@oracle")
            if o in cells:
                p = paired(cells[m], cells[o])
                r["vs_oracle"] = {"n": p["n"], "codes_wrong_oracle_right": p["right_to_wrong"],
                                  "codes_right_oracle_wrong": p["wrong_to_right"], "oracle_accuracy": p["full_accuracy"],
                                  "retention_of_oracle": p["retention"]}
    order = {"full": (0, 0.0)}
    for r in rows:
        m = r["method"]
        if m != "full":
            order[m] = (1 if "@topk" in m else 2, float(m.rsplit("@", 1)[1].lstrip("topkoracle")))
    rows.sort(key=lambda r: (r["context_len"], order[r["method"]][1], order[r["method"]][0]))
    obj = {"about": "A2ATS (codes) vs the oracle top-K (exact q.k ranking, same sink/local/GQA-union rules; an "
                    "analysis baseline that saves nothing) at the same top-K fractions, paired with the full cache "
                    "on the same prompts",
           "machine": full_run.get("machine", {}).get("line"),
           "commits": sorted({s["commit"] for s in sources.values() if s.get("commit")}),
           "commands": [s["command"] for s in sources.values()],
           "merged_by": "python bench/a2ats_sweep.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "prompts": len(want), "prompts_match_full": True, "cells": rows, "note": a.note}
    if a.extra:
        with open(a.extra) as f:
            obj.update(json.load(f))
    obj["prompt_records"] = pooled  # not "samples" / "rows": bench/merge_quality.py must not pool these cells
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(obj, f, indent=1)
    for r in rows:
        p = r.get("paired") or {}
        vo = r.get("vs_oracle") or {}
        print(f"{r['method']:>18} acc {r['accuracy']:.3f} [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}] "
              f"ret {r.get('accuracy_retained') or 0:.3f} r->w {p.get('right_to_wrong')} w->r {p.get('wrong_to_right')} "
              f"sel {r.get('selected_fraction') or 0:.3f}"
              + (f" | vs oracle: codes wrong/oracle right {vo['codes_wrong_oracle_right']}, "
                 f"codes right/oracle wrong {vo['codes_right_oracle_wrong']}" if vo else ""))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
