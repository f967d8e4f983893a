"""The README's CPU kernel performance table, generated from ``bench/results/kernels-cpu.json``.

    python bench/report.py [--json bench/results/kernels-cpu.json] [--out bench/results/kernels-cpu.md]
                           [--plot bench/results/kernels-cpu.png] [--note "..."]

Prints markdown (also written to ``--out``): the machine line, one table per context length (every
method x batch x dtype: ms, bytes read, GB/s, % of the read bandwidth measured in the same run,
speedup against torch SDPA and against kvcomp's dense paged decode, the implementation that ran) and
each issue-10 target as met / missed / not measured, with the measured values.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "bench" / "results" / "kernels-cpu.json"
HEADER = "| method | batch | dtype | ms (p20–p80) | MiB read | GB/s | % read bw | × SDPA | × dense | impl |"
DECODE_METHODS = ("off", "duo50", "think", "vq3", "vq10", "duo50+vq3")

# (label, method, context, field, threshold): issue 10's targets, ratios from one run
TARGETS = [
    ("dense paged decode >= 50% of read bandwidth at 32K", "off", 32768, "pct_read_bw", 50.0),
    ("DuoAttention 50% >= 1.8x dense at 32K", "duo50", 32768, "speedup_vs_dense", 1.8),
    ("ThinK 0.4 >= 1.15x dense at 32K", "think", 32768, "speedup_vs_dense", 1.15),
    ("A2ATS top-K 3% >= 8x dense at 32K", "vq3", 32768, "speedup_vs_dense", 8.0),
    ("A2ATS top-K 3% >= 12x dense at 128K", "vq3", 131072, "speedup_vs_dense", 12.0),
    ("DuoAttention + A2ATS >= 12x dense at 128K", "duo50+vq3", 131072, "speedup_vs_dense", 12.0),
] + [(f"{m} >= 2x torch SDPA at 32K", m, 32768, "speedup_vs_sdpa", 2.0) for m in DECODE_METHODS]


def _ctx(t: int) -> str:
    return f"{t // 1024}K" if t % 1024 == 0 else str(t)


def _num(v, spec: str) -> str:
    return "–" if v is None else format(v, spec)


def _row(r: dict) -> str:
    cells = [r["method"], str(r["batch"]), r["dtype"]]
    if r.get("skipped") or r.get("error"):
        why = r.get("skipped") or r.get("error")
        return "| " + " | ".join(cells + [f"{'skipped' if r.get('skipped') else 'error'}: {why}"] + [""] * 6) + " |"
    ms = f"{r['ms']:.2f} ({r['p20_ms']:.2f}–{r['p80_ms']:.2f})"
    mib = _num(None if r.get("bytes") is None else r["bytes"] / 2**20, ".1f")
    cells += [ms, mib, _num(r.get("gbps"), ".2f"), _num(r.get("pct_read_bw"), ".1f"),
              _num(r.get("speedup_vs_sdpa"), ".2f"), _num(r.get("speedup_vs_dense"), ".2f"), r.get("impl") or ""]
    return "| " + " | ".join(cells) + " |"


def targets(rows: list[dict]) -> list[str]:
    """One line per target: met / missed / not measured, with every measured (batch, dtype) value."""
    out = []
    for label, method, ctx, field, thr in TARGETS:
        vals = [(r["batch"], r["dtype"], r.get(field)) for r in rows
                if r["method"] == method and r["context_len"] == ctx and r.get(field) is not None]
        if not vals:
            out.append(f"- **not measured**: {label}")
            continue
        ok = all(v >= thr for _, _, v in vals)
        unit = "%" if field == "pct_read_bw" else "x"
        got = ", ".join(f"B{b} {dt} {v:.2f}{unit}" for b, dt, v in vals)
        line = f"- **{'met' if ok else 'missed'}**: {label} ({got})"
        if field == "speedup_vs_dense" and not ok:
            line += "; " + _byte_bound(rows, method, ctx)
        out.append(line)
    return out


def _byte_bound(rows: list[dict], method: str, ctx: int) -> str:
    """What the bytes allow: dense bytes / the method's bytes (same batch and dtype), the speedup a
    method reading its rows as efficiently as the dense decode reads all of them would reach."""
    out = []
    for r in rows:
        if r["method"] != method or r["context_len"] != ctx or not r.get("bytes"):
            continue
        dense = next((x for x in rows if x["method"] == "off" and x["context_len"] == ctx
                      and x["batch"] == r["batch"] and x["dtype"] == r["dtype"] and x.get("bytes")), None)
        if dense:
            out.append(f"B{r['batch']} {r['dtype']} {dense['bytes'] / r['bytes']:.1f}x")
    return "byte bound (dense bytes / its bytes): " + (", ".join(out) if out else "not measured")


def stages(rows: list[dict]) -> list[str]:
    """Where each A²ATS step's time goes: every stage timed alone, and the rest of the step."""
    out = []
    for r in rows:
        st = r.get("stage_ms")
        if not st or r.get("ms") is None:
            continue
        parts = " + ".join(f"{k} {v:.2f}" for k, v in st.items())
        rest = r["ms"] - sum(st.values())
        out.append(f"- {r['method']} {_ctx(r['context_len'])} B{r['batch']} {r['dtype']}: step {r['ms']:.2f} ms = "
                   f"{parts} ms, {rest:+.2f} ms between them (concatenation, Python)")
    return out


def plot(rows: list[dict], path: Path) -> None:
    """Speedup against kvcomp's dense paged decode vs context, one line per method, one panel per
    (batch, dtype)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["batch"], r["dtype"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (b, dt) in zip(axes[0], panels):
        for m in ("sdpa",) + DECODE_METHODS[1:]:
            pts = sorted((r["context_len"], r["speedup_vs_dense"]) for r in rows if r["method"] == m
                         and (r["batch"], r["dtype"]) == (b, dt) and r.get("speedup_vs_dense") is not None)
            if pts:
                ax.plot([_ctx(t) for t, _ in pts], [s for _, s in pts], marker="o", label=m)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(f"batch {b}, {dt}")
        ax.set_xlabel("context")
        ax.set_ylabel("speedup vs kvcomp dense paged decode")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def render(data: dict, note: str = "") -> str:
    m = data["machine"]
    rows = data["results"]
    lines = [
        "### Kernel decode time on the CPU (one layer, Llama-3.1-8B attention: 32 q / 8 KV heads, D=128)",
        "",
        f"Machine: {m.get('line')} | kvcomp._C built: {m.get('kvcomp_C')} "
        f"(native ops: {', '.join(m.get('native_ops') or []) or 'none'}) | {m.get('threads')} torch threads | "
        "(the latest run's; each run's commit and load below).",
        f"Read bandwidth: {data.get('read_bw_probe')}; each row's % is relative to its own run's. Runs:",
        "",
        *[f"- `{r['command']}` (commit {str(r['commit'])[:12]}, load average {r.get('loadavg_1m')}): read bandwidth "
          f"{r['read_bw_gbps']:.1f} GB/s at the start"
          + (f", {r['read_bw_end_gbps']:.1f} at the end" if r.get("read_bw_end_gbps") else "")
          + (f", {r['wall_s']:.0f} s" if r.get("wall_s") else "") + f"; timer: {r['timer']}"
          for r in data.get("runs", [])],
        "",
        *([note, ""] if note else []),
        f"Bytes: {data.get('byte_model')}",
        "",
        "Methods: " + "; ".join(f"`{k}` = {v}" for k, v in data.get("methods", {}).items()) + ".",
        "",
    ]
    for ctx in sorted({r["context_len"] for r in rows}):
        lines += [f"#### {_ctx(ctx)} tokens", "", HEADER, "|---" * 10 + "|"]
        group = sorted((r for r in rows if r["context_len"] == ctx), key=lambda r: (r["batch"], r["dtype"]))
        lines += [_row(r) for r in group] + [""]
    lines += ["#### Targets (issue 10, ratios within this run)", ""] + targets(rows) + [""]
    if any(r.get("stage_ms") for r in rows):
        lines += ["#### Where the A²ATS step's time goes (each stage timed alone, ms)", ""] + stages(rows) + [""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--out", type=Path, default=None, help="markdown path (default: the JSON path with .md)")
    ap.add_argument("--note", default="", help="a sentence printed under the machine line (e.g. how noisy it was)")
    ap.add_argument("--plot", type=Path, default=None, help="also a PNG of speedup vs dense over context")
    args = ap.parse_args(argv)
    data = json.loads(args.json.read_text())
    text = render(data, args.note)
    if args.plot:
        plot(data["results"], args.plot)
    out = args.out or args.json.with_suffix(".md")
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
