"""One quality results source: merge `kvcomp eval` / peer runs into one JSON, the README table and the plot.

    python bench/merge_quality.py bench/results/quality-smollm2-2048-*.json \
        --out bench/results/quality-smollm2.json --plot bench/results/quality-smollm2.png --readme README.md

Inputs are `kvcomp eval` outputs (one process per method or context length, so they can run in
parallel), `bench/peers_kvpress.py` outputs, or an earlier merged file. Runs kept with
``--keep-samples`` are pooled: their cells are re-summarized and paired with the full cache's
records of the same prompts even when the full cache ran in another process. Every row names the
run it came from (``source``: file, commit, machine line, command). A row measured again (same
method, context length, task group, mode, turn and number of prompts) replaces the older one: rows
of ``--out`` come first, then the inputs in the order given.

With ``--readme`` the text between ``<!-- BEGIN quality-table -->`` and ``<!-- END quality-table -->``
is replaced by the table built from the merged rows (for each cell the row with the most prompts), and
the ``quality-glance`` block, when the file has one, by the per-method summary (:func:`glance`);
``--plot`` draws the same rows (accuracy vs device KV bytes per token).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

PEER_PREFIX = "kvpress:"
BEGIN, END = "<!-- BEGIN quality-table -->", "<!-- END quality-table -->"
GLANCE = ("<!-- BEGIN quality-glance -->", "<!-- END quality-glance -->")
NAMES = {"full": "full cache", "duo": "DuoAttention 50%", "think": "ThinK λ=0.4",
         "think-static": "ThinK λ=0.4, static channels (vLLM's default)", "vq": "A²ATS top-K 10% (K/V on the host)",
         "all": "all three (A²ATS K/V on the host)"}
KEY = ("method", "context_len", "tasks", "mode", "turn", "n_prompts")
ROW_FIELDS = ("method", "context_len", "tasks", "mode", "turn", "n_prompts", "accuracy", "ci95", "full_accuracy",
              "accuracy_retained", "paired", "kv_bytes_per_token", "device_bytes_per_token", "host_bytes_per_token",
              "retention_ci95", "full_kv_bytes_per_token", "bytes_fraction", "wall_s", "per_task", "config", "simulated",
              "selected_fraction")


def _source(path: str, run: dict) -> dict:
    meta = run.get("meta") or {}
    meta = meta if isinstance(meta, dict) else {}
    machine = run.get("machine") or {}
    return {"file": os.path.relpath(path), "commit": run.get("commit"), "machine_line": machine.get("line"),
            "command": meta.get("command"), "seconds": meta.get("seconds")}


def _row(r: dict, source: dict, tasks: str) -> dict:
    from kvcomp.eval.stats import wilson

    row = {k: r[k] for k in ROW_FIELDS if k in r}
    row.setdefault("mode", "single")
    row.setdefault("turn", "all")
    row.setdefault("tasks", tasks)
    row.setdefault("n_prompts", r.get("n_samples"))
    if "ci95" not in row and row["n_prompts"]:
        row["ci95"] = list(wilson(row["accuracy"], row["n_prompts"]))
    if "selected_fraction" not in row and "selected_fraction" in r.get("stats", {}):
        row["selected_fraction"] = r["stats"]["selected_fraction"]
    if row["method"].startswith(PEER_PREFIX):
        row["simulated"] = True  # kvpress: bytes are full x (1 - ratio), not allocated
    row["source"] = r.get("source") or source
    return row


def _tasks(run: dict) -> str:
    meta = run.get("meta") if isinstance(run.get("meta"), dict) else {}
    t = meta.get("tasks") or []
    if meta.get("mode") == "multi-query":
        return f"niah_shared x{meta.get('queries')}, {meta.get('history') or 'model'} history"
    return ",".join(t) if isinstance(t, list) else str(t)


def merge(paths: list[str], existing: list[dict] | None = None) -> list[dict]:
    """Rows of ``existing`` then of each input in order; a later row replaces an earlier one with the same KEY.

    Records kept with ``--keep-samples`` are pooled over all inputs first (so a method is paired with a
    full-cache run of another process); their rows take the place of the input they came from.
    """
    from kvcomp.eval.runner import compare_to_full, summarize

    runs = []
    for p in paths:
        with open(p) as f:
            runs.append((p, json.load(f)))
    pooled, owner = [], {}
    for p, run in runs:
        if "rows" not in run and run.get("samples"):
            for s in run["samples"]:
                pooled.append(s)
                cell = owner.setdefault((s["method"], s["context_len"], s.get("mode", "single")), {})
                cell.setdefault(p, (_source(p, run), _tasks(run)))
    by_file: dict = {}
    if pooled:
        for r in compare_to_full(summarize(pooled), pooled):
            files = owner[(r["method"], r["context_len"], r["mode"])]  # a cell pooled from several runs (seeds)
            p, (src, tasks) = next(iter(files.items()))
            if len(files) > 1:
                src = dict(src, also=[s for s, _ in list(files.values())[1:]])
            by_file.setdefault(p, []).append(_row(r, src, tasks))
    rows: dict = {}
    for r in existing or []:
        rows[tuple(r.get(k) for k in KEY)] = r
    for p, run in runs:
        if "rows" in run:  # an earlier merged file: its rows keep their own sources
            new = [dict(r) for r in run["rows"]]
        elif run.get("samples"):
            new = by_file.get(p, [])
        elif "records" in run:
            new = [_row(r, _source(p, run), _tasks(run)) for r in run["records"]]
        else:  # e.g. bench/a2ats_sweep.py's analysis cells: not published rows
            print(f"[merge] {p}: no rows, samples or records: skipped", file=sys.stderr)
            continue
        for r in new:
            rows[tuple(r.get(k) for k in KEY)] = r
    _unpaired_retention(list(rows.values()))
    return sorted(rows.values(), key=lambda r: (r["mode"], r["context_len"], r["turn"], r["method"]))


def _unpaired_retention(rows: list[dict]) -> None:
    """Rows of runs without per-sample records (no pairing possible) get accuracy / full accuracy of the
    full-cache row with the most prompts in the same cell, marked ``retention_unpaired``."""
    full = {(r["context_len"], r["mode"], r["turn"], r.get("tasks")): r for r in best_rows(rows) if r["method"] == "full"}
    for r in rows:
        f = full.get((r["context_len"], r["mode"], r["turn"], r.get("tasks")))
        if r.get("paired") or f is None or r is f:
            continue
        r["full_accuracy"] = f["accuracy"]
        r["accuracy_retained"] = r["accuracy"] / f["accuracy"] if f["accuracy"] else None
        r["full_kv_bytes_per_token"] = f["kv_bytes_per_token"]
        r["bytes_fraction"] = r["kv_bytes_per_token"] / f["kv_bytes_per_token"]
        r["retention_unpaired"] = True


def best_rows(rows: list[dict]) -> list[dict]:
    """For each (method, context, mode, turn) the row with the most prompts (ties: the later row)."""
    best: dict = {}
    for r in rows:
        k = (r["method"], r["context_len"], r["mode"], r["turn"])
        if k not in best or r["n_prompts"] >= best[k]["n_prompts"]:
            best[k] = r
    return list(best.values())


def _ctx(c: int) -> str:
    return f"{c // 1024}K" if c % 1024 == 0 else str(c)


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.0f}%"


def table(rows: list[dict], out_name: str) -> str:
    """Markdown of the chosen rows: one line per cell, with its interval, paired flips and run."""
    lines = [f"Generated by `bench/merge_quality.py` from `{out_name}`; each row names its run (file @ commit).",
             "Accuracy with its 95% Wilson interval; *kept* = accuracy / full-cache accuracy on the same prompts,",
             "with a 95% paired bootstrap interval (a shared context's questions resampled together);",
             "flips = prompts full got right and the method wrong / the reverse, *p* = exact two-sided sign test",
             "on them (*unpaired*: the run kept no",
             "per-prompt records, so *kept* divides by the full-cache row). Peer rows (kvpress) are simulated:",
             "kvpress masks or zeros entries instead of freeing them, so their bytes are the ratio's, not allocated.",
             "",
             "| method | context | mode | n | accuracy [95% CI] | kept [95% CI] | flips r→w / w→r (p) | device B/token (of full) | run |",
             "|---|---|---|---|---|---|---|---|---|"]
    order = {"all": 0, "first": 1, "later": 2}
    for r in sorted(best_rows(rows), key=lambda r: (r["mode"] != "single", r["context_len"], order[r["turn"]],
                                                     r["method"].startswith(PEER_PREFIX), r["method"])):
        lo, hi = r.get("ci95") or (None, None)
        p = r.get("paired") or {}
        flips = f"{p['right_to_wrong']} / {p['wrong_to_right']}" if p else "unpaired"
        if r["method"] == "full":
            flips = "–"
        elif p.get("sign_p") is not None:
            flips += f" ({p['sign_p']:.2g})"
        kept = _pct(r.get("accuracy_retained"))
        if r.get("retention_ci95") and r["method"] != "full":
            kept += f" [{100 * r['retention_ci95'][0]:.0f}–{100 * r['retention_ci95'][1]:.0f}]"
        frac = r.get("bytes_fraction")
        mode = "single" if r["mode"] == "single" else f"shared, {r['turn']} q"
        src = r["source"]
        runs = " + ".join(f"`{os.path.basename(x['file'])}` @ {str(x.get('commit'))[:7]}" for x in [src] + src.get("also", []))
        name = r["method"] + (" (simulated)" if r.get("simulated") else "")
        ci = f" [{100 * lo:.0f}–{100 * hi:.0f}]" if lo is not None else ""
        lines.append(f"| {name} | {_ctx(r['context_len'])} | {mode} | {r['n_prompts']} | {100 * r['accuracy']:.0f}%{ci} "
                     f"| {kept} | {flips} | {r['kv_bytes_per_token']:.0f} ({_pct(frac)}) "
                     f"| {runs} |")
    return "\n".join(lines) + "\n"


def glance(rows: list[dict]) -> str:
    """The README's summary: per method its device bytes and the share of the full cache's accuracy it
    keeps (paired, with the bootstrap interval) at each context, single question and shared context."""
    best = best_rows(rows)
    cell = {(r["method"], r["context_len"], r["mode"], r["turn"]): r for r in best}
    single = sorted({r["context_len"] for r in best if r["mode"] == "single"})
    shared = sorted({r["context_len"] for r in best if r["mode"] != "single"})
    methods = [m for m in NAMES if any(k[0] == m for k in cell)]
    methods += sorted({r["method"] for r in best if r["method"].startswith(PEER_PREFIX) and r["method"] != "kvpress:none"})

    def kept(m, c, mode, turn):
        r = cell.get((m, c, mode, turn))
        if r is None:
            return "–"
        if m == "full":
            return f"{100 * r['accuracy']:.0f}% acc."
        ci = r.get("retention_ci95")
        return _pct(r.get("accuracy_retained")) + (f" [{100 * ci[0]:.0f}–{100 * ci[1]:.0f}]" if ci else "")

    def frac(m):
        fs = [cell[(m, c, "single", "all")].get("bytes_fraction") for c in single if (m, c, "single", "all") in cell]
        fs = [f for f in fs if f is not None]
        if not fs:
            return "–"
        lo, hi = min(fs), max(fs)
        return f"{100 * lo:.0f}%" if round(100 * lo) == round(100 * hi) else f"{100 * lo:.0f}–{100 * hi:.0f}%"

    ctx = " / ".join(_ctx(c) for c in single)
    sctx = " / ".join(_ctx(c) for c in shared)
    lines = [f"| method | device KV bytes (of full, bf16) | kept, one question: {ctx} | kept, shared context, first / later "
             f"questions: {sctx} |", "|---|---|---|---|"]
    for m in methods:
        name = NAMES.get(m) or m[len(PEER_PREFIX):].replace("_", " ") + " (kvpress, simulated)"
        one = " / ".join(kept(m, c, "single", "all") for c in single)
        many = " / ".join(f"{kept(m, c, 'multi-query', 'first')}, {kept(m, c, 'multi-query', 'later')}" for c in shared)
        lines.append(f"| {name} | {frac(m)} | {one} | {many or '–'} |")
    return "\n".join(lines) + "\n"


def write_readme(path: str, text: str, markers: tuple = (BEGIN, END), required: bool = True) -> None:
    begin, end = markers
    with open(path) as f:
        doc = f.read()
    if doc.count(begin) != 1 or doc.count(end) != 1 or doc.index(begin) > doc.index(end):
        if not required and begin not in doc and end not in doc:
            return
        raise SystemExit(f"{path} needs exactly one {begin} ... {end} block")
    head, rest = doc.split(begin)
    tail = rest.split(end)[1]
    with open(path, "w") as f:
        f.write(head + begin + "\n" + text + end + tail)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("inputs", nargs="*", help="kvcomp eval / peers / merged JSON files")
    p.add_argument("--out", required=True, help="the merged JSON (read first when it exists, then rewritten)")
    p.add_argument("--plot", default=None)
    p.add_argument("--readme", default=None, help="file with the quality-table markers to regenerate")
    a = p.parse_args(argv)
    existing = []
    if os.path.exists(a.out):
        with open(a.out) as f:
            old = json.load(f)
        existing = old.get("rows", [])
    rows = merge(a.inputs, existing)
    if not rows:
        raise SystemExit("no rows: give kvcomp eval outputs as inputs")
    with open(a.out, "w") as f:
        json.dump({"schema": 2, "about": __doc__.splitlines()[0], "rows": rows}, f, indent=1)
        f.write("\n")
    text = table(rows, os.path.relpath(a.out))
    print(text)
    if a.readme:
        write_readme(a.readme, text)
        write_readme(a.readme, glance(rows), GLANCE, required=False)
    if a.plot:
        from kvcomp.eval.plot import plot_accuracy_vs_kv

        pts = [dict(r, method=r["method"] + ("" if r["mode"] == "single" else " (shared, later q)"))
               for r in best_rows(rows) if r["turn"] in ("all", "later")]
        plot_accuracy_vs_kv(pts, a.plot, title="SmolLM2-135M: accuracy vs device KV bytes/token")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
