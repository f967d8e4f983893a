"""The vLLM-CPU serving table, generated from ``bench/results/serve-vllm-cpu.json`` (``kvcomp bench serve``).

    python bench/report_serve.py [--json bench/results/serve-vllm-cpu.json] [--out bench/results/serve-vllm-cpu.md]

Prints markdown (also written to ``--out``): the machine line and run, one table per load (every
method: TTFT, decode tokens/s over the window where every request decodes, end-to-end tokens/s,
each against stock vLLM in the same run, passkey accuracy, KV capacity, peak RSS) and each issue-10
serving target as met / missed / not measured with the measured values.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "bench" / "results" / "serve-vllm-cpu.json"
HEADER = ("| method | TTFT s (x stock) | decode tok/s (x stock) | e2e tok/s (x stock) | accuracy (HF path) "
          "| KV capacity tokens | peak RSS GiB | load avg before → after |")
LONG_LOADS = ((4, 4096), (8, 7680))
# method -> decode tokens/s ratio to stock required at the long loads (issue 10)
DECODE_TARGETS = {"off": 1.0, "duo": 1.2, "think": 1.05, "vq": 1.5, "duo+vq": 1.5}


def _load(r: dict) -> tuple[int, int]:
    return r["concurrency"], r["prompt_tokens"]


def _x(v, ratio, spec=".1f") -> str:
    if v is None:
        return "–"
    return f"{v:{spec}}" + (f" ({ratio:.2f}x)" if ratio is not None else "")


def _row(r: dict) -> str:
    if r.get("error") or r.get("skipped"):
        return f"| {r['method']} | {'skipped' if r.get('skipped') else 'error'}: {r.get('skipped') or r['error']} " \
               + "| " * 6 + "|"
    acc = f"{r['accuracy']:.2f}" + (f" ({r['hf_accuracy']:.2f})" if r.get("hf_accuracy") is not None else "")
    rss = r.get("peak_rss_bytes")
    return "| " + " | ".join([
        r["method"], _x(r.get("ttft_s"), r.get("ttft_vs_stock")),
        _x(r.get("decode_tokens_per_s"), r.get("decode_vs_stock")),
        _x(r.get("e2e_tokens_per_s"), r.get("e2e_vs_stock")), acc,
        f"{r['kv_capacity_tokens']:,}" if r.get("kv_capacity_tokens") else "–",
        f"{rss / 2**30:.2f}" if rss else "–",
        f"{r.get('loadavg_1m_before', '–')} → {r.get('loadavg_1m_after', '–')}"]) + " |"


def targets(rows: list[dict]) -> list[str]:
    """Issue 10's serving targets, one line each, from the rows' ratios to stock in the same run."""
    ok_rows = [r for r in rows if not r.get("error") and not r.get("skipped") and r["method"] != "stock"]
    out = []

    def line(label: str, vals: list[tuple[str, float | None]], good) -> None:
        got = [(k, v) for k, v in vals if v is not None]
        if not got:
            out.append(f"- **not measured**: {label}")
            return
        met = all(good(v) for _, v in got) and len(got) == len(vals)
        out.append(f"- **{'met' if met else 'missed'}**: {label} (" + ", ".join(f"{k} {v:.2f}x" for k, v in got)
                   + (", some loads not measured" if len(got) < len(vals) else "") + ")")

    for m, thr in DECODE_TARGETS.items():
        vals = [(f"{n}x{p}", next((r.get("decode_vs_stock") for r in ok_rows if r["method"] == m
                                   and _load(r) == (n, p)), None)) for n, p in LONG_LOADS]
        line(f"{m}: decode tokens/s >= {thr}x stock at 4x4K and 8x7.5K", vals, lambda v, t=thr: v >= t)
    ttft = [(f"{r['method']} {r['concurrency']}x{r['prompt_tokens']}", r.get("ttft_vs_stock"))
            for r in ok_rows if _load(r) in LONG_LOADS]
    line("TTFT <= 1.2x stock at 4x4K and 8x7.5K (every method)", ttft, lambda v: v <= 1.2)
    short = [(f"{r['method']} {k}", r.get(f"{k}_vs_stock")) for r in ok_rows if r["prompt_tokens"] <= 1024
             for k in ("decode", "e2e")]
    line("1K prompts: no method below 0.9x stock (decode and end-to-end tokens/s)", short, lambda v: v >= 0.9)
    same = [(f"{r['method']} {r['concurrency']}x{r['prompt_tokens']}", r["accuracy"] - r["hf_accuracy"])
            for r in ok_rows if r.get("hf_accuracy") is not None]
    if same:
        ok = all(abs(d) < 1e-9 for _, d in same)
        out.append(f"- **{'met' if ok else 'missed'}**: same accuracy as the transformers path ("
                   + ", ".join(f"{k} {d:+.2f}" for k, d in same) + ")")
    else:
        out.append("- **not measured**: same accuracy as the transformers path (run with --hf-check)")
    return out


def render(data: dict) -> str:
    rows = data["results"]
    lines = [
        "### vLLM-CPU serving, SmolLM2-135M (fp32), every method against stock vLLM (CPU_ATTN) in one run",
        "",
        f"Machine: {data['machine'].get('line')} | commit {str(data.get('commit'))[:12]} | "
        f"`kvcomp {' '.join(data.get('argv', []))}` | device KV budget {data.get('kv_cache_memory_bytes', 0) / 2**30:.2f} "
        f"GiB for every server (A²ATS: {data.get('a2ats_num_blocks')} blocks, full K/V on the host) | prefix caching "
        f"off for all | {data.get('output_tokens')} output tokens per request, EOS ignored.",
        "",
        "TTFT: mean over the requests, all sent at once. Decode tok/s: every token streamed while all "
        "requests were decoding (from the last first token to the first last token). Accuracy: passkey "
        "found in the first 32 output tokens; in brackets the transformers path on the same prompts.",
        "",
    ]
    for n, p in sorted({_load(r) for r in rows}, key=lambda x: (x[1], x[0])):
        lines += [f"#### {n} requests x {p} prompt tokens", "", HEADER, "|---" * 8 + "|"]
        lines += [_row(r) for r in rows if _load(r) == (n, p)] + [""]
    lines += ["#### Targets (issue 10, ratios to stock within this run)", ""] + targets(rows) + [""]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=DEFAULT_JSON)
    ap.add_argument("--out", type=Path, default=None, help="markdown path (default: the JSON path with .md)")
    args = ap.parse_args(argv)
    text = render(json.loads(args.json.read_text()))
    (args.out or args.json.with_suffix(".md")).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
