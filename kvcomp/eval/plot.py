"""Accuracy vs KV bytes per token: one panel per context length, one marker per method."""

from __future__ import annotations

import math
import os
from typing import Sequence

from .runner import summarize

__all__ = ["plot_accuracy_vs_kv"]

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def _ctx_label(ctx: int) -> str:
    return f"{ctx // 1024}K" if ctx % 1024 == 0 else str(ctx)


def plot_accuracy_vs_kv(rows: Sequence[dict], path: str, *, title: str | None = None,
                        logx: bool = True) -> str:
    """Save a PNG scatter of accuracy (y, %) against mean KV bytes per token (x).

    ``rows`` is ``summarize`` output, or raw records (summarized here). One panel per context length;
    colour and marker = method, a hollow marker = a simulated saving (``simulated`` rows, e.g. kvpress),
    error bars = the row's ``ci95``. matplotlib (Agg backend) is imported here, not at module import.
    Returns ``path``.
    """
    rows = list(rows)
    if not rows:
        raise ValueError("rows must be a non-empty list")
    if "score" in rows[0]:
        rows = summarize(rows)
    for r in rows:
        for k in ("method", "context_len", "accuracy", "kv_bytes_per_token"):
            if k not in r:
                raise ValueError(f"summary row lacks {k!r}")
    if not str(path).lower().endswith(".png"):
        raise ValueError(f"path must end with .png, got {path!r}")

    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(r["method"] for r in rows))
    ctxs = sorted({r["context_len"] for r in rows})
    colors = plt.get_cmap("tab10" if len(methods) <= 10 else "tab20")
    fig, axes = plt.subplots(1, len(ctxs), figsize=(4.2 * len(ctxs) + 2.6, 4.6), dpi=120, sharex=True, sharey=True, squeeze=False)
    axes = axes[0]
    xs_all = [float(r["kv_bytes_per_token"]) for r in rows]
    xs_all = [x for x in xs_all if math.isfinite(x) and x > 0]
    for ax, c in zip(axes, ctxs):
        for mi, m in enumerate(methods):
            for r in (r for r in rows if r["method"] == m and r["context_len"] == c):
                x, y = float(r["kv_bytes_per_token"]), 100.0 * float(r["accuracy"])
                ci = r.get("ci95")
                yerr = [[y - 100.0 * ci[0]], [100.0 * ci[1] - y]] if ci else None
                hollow = bool(r.get("simulated"))  # a peer's bytes are its ratio's, not allocated
                ax.errorbar([x], [y], yerr=yerr, fmt=_MARKERS[mi % len(_MARKERS)], color=colors(mi % colors.N),
                            ms=7, mec=colors(mi % colors.N), mfc="none" if hollow else colors(mi % colors.N),
                            elinewidth=0.8, capsize=2, alpha=0.9)
        ax.set_title(f"context {_ctx_label(c)}", fontsize=10)
        ax.set_xlabel("device KV bytes per token")
        ax.grid(True, alpha=0.3, which="both")
        if logx and xs_all and max(xs_all) / min(xs_all) > 3:
            from matplotlib.ticker import FuncFormatter, NullFormatter

            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
    axes[0].set_ylabel("accuracy (%), 95% interval")
    axes[0].set_ylim(-5, 105)
    for mi, m in enumerate(methods):
        hollow = any(r.get("simulated") for r in rows if r["method"] == m)
        axes[-1].plot([], [], _MARKERS[mi % len(_MARKERS)], color=colors(mi % colors.N),
                      mfc="none" if hollow else colors(mi % colors.N), label=m + (" (simulated)" if hollow else ""))
    fig.legend(*axes[-1].get_legend_handles_labels(), fontsize=7, loc="center left", bbox_to_anchor=(0.99, 0.5))
    fig.suptitle(title or "Accuracy vs KV memory")
    fig.tight_layout()
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return path
