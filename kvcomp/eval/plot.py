"""Accuracy vs KV bytes per token, one marker per (method, context length)."""

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

    ``rows`` is ``summarize`` output, or raw records (summarized here). Colour = method, marker
    shape = context length; each point is labelled with its context length, and the points of a
    method are joined in context-length order. matplotlib (Agg backend) is imported here, not at
    module import. Returns ``path``.
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
    colors = plt.get_cmap("tab10")
    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=120)
    xs_all = []
    for mi, m in enumerate(methods):
        pts = sorted((r for r in rows if r["method"] == m), key=lambda r: r["context_len"])
        color = colors(mi % 10)
        xs = [float(r["kv_bytes_per_token"]) for r in pts]
        ys = [100.0 * float(r["accuracy"]) for r in pts]
        xs_all += [x for x in xs if math.isfinite(x) and x > 0]
        if len(pts) > 1:
            ax.plot(xs, ys, "-", color=color, alpha=0.35, lw=1)
        for r, x, y in zip(pts, xs, ys):
            marker = _MARKERS[ctxs.index(r["context_len"]) % len(_MARKERS)]
            ax.plot([x], [y], marker, color=color, ms=8, mec="black", mew=0.5)
            ax.annotate(_ctx_label(r["context_len"]), (x, y), textcoords="offset points",
                        xytext=(6, 4), fontsize=8, color=color)
        ax.plot([], [], "o", color=color, label=m)  # legend entry per method
    for ci, c in enumerate(ctxs):
        ax.plot([], [], _MARKERS[ci % len(_MARKERS)], color="grey", label=f"ctx {_ctx_label(c)}")
    if logx and xs_all and max(xs_all) / min(xs_all) > 3:
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        plain = FuncFormatter(lambda v, _: f"{v:,.0f}" if v >= 1 else f"{v:g}")
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(plain)
        ax.xaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))  # labelled minor ticks that do not collide
        ax.xaxis.set_minor_formatter(plain if max(xs_all) / min(xs_all) <= 30 else NullFormatter())
    ax.set_xlabel("KV cache bytes per token")
    ax.set_ylabel("accuracy (%)")
    ax.set_ylim(-5, 105)
    ax.grid(True, alpha=0.3, which="both")
    ax.set_title(title or "Accuracy vs KV memory")
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
