"""Intervals and paired comparisons for the quality cells.

A *cell* is the set of records of one (method, context length, mode, turn) group. Each record
scores one prompt (or one question of a multi-query prompt) in [0, 1]; a prompt is *right* when its
score is 1.0 (every gold string found).

- :func:`wilson` is the 95% Wilson score interval of an accuracy over ``n`` prompts (a fractional
  mean is treated as ``n * p`` successes, the usual approximation for partial-credit scores);
- :func:`paired` compares a method with the full cache on the *same* prompts (matched by
  :func:`sample_key`): how many flipped right -> wrong and wrong -> right, an exact two-sided sign
  test on those flips (:func:`sign_test`) and a 95% paired bootstrap interval of the retention
  (:func:`retention_interval`: prompts resampled together with their full-cache score; the questions
  of one shared context are resampled as one unit, since they share its cache).
"""

from __future__ import annotations

import math
import random
from typing import Sequence

__all__ = ["Z95", "paired", "retention_interval", "sample_key", "sign_test", "wilson"]

Z95 = 1.959963984540054  # two-sided 95% normal quantile


def wilson(p: float, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval ``(lo, hi)`` of a proportion ``p`` measured on ``n`` trials.

    Example: ``wilson(0.5, 20)`` is about ``(0.299, 0.701)``; ``wilson(1.0, 20)`` about ``(0.839, 1.0)``.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not (isinstance(p, (int, float)) and 0.0 <= p <= 1.0):
        raise ValueError(f"p must be a proportion in [0, 1], got {p!r}")
    z2 = z * z
    den = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / den
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4 * n * n)) / den
    lo = 0.0 if p == 0.0 else max(0.0, centre - half)  # exact ends: no rounding residue at 0 / 1
    hi = 1.0 if p == 1.0 else min(1.0, centre + half)
    return lo, hi


def sample_key(r: dict) -> tuple:
    """What makes two records the same prompt: mode, task, haystack, context length, seed, question."""
    return (r.get("mode", "single"), r["task"], r["haystack"], r["context_len"], r["seed"], r.get("query_index", 0))


def sign_test(worse: int, better: int) -> float:
    """Exact two-sided sign test: the probability of a split at least as uneven as ``worse`` vs
    ``better`` discordant prompts if either direction were equally likely (1.0 when there are none).

    Example: ``sign_test(4, 0)`` is 0.125 — four losses and no wins is not yet evidence of a loss.
    """
    n = worse + better
    if worse < 0 or better < 0:
        raise ValueError(f"counts must be >= 0, got {worse}, {better}")
    if n == 0:
        return 1.0
    k = min(worse, better)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
    return min(1.0, 2.0 * tail)


def retention_interval(pairs: Sequence[tuple], resamples: int = 2000, seed: int = 0) -> list | None:
    """95% percentile bootstrap interval of sum(method) / sum(full) over ``pairs`` of
    ``(cluster, method_score, full_score)``; whole clusters are resampled (one prompt, or the
    questions of one shared context). Deterministic for a given ``seed``. None when the full cache
    scored 0 on every prompt or there are fewer than 2 clusters.
    """
    clusters: dict = {}
    for c, m, f in pairs:
        a = clusters.setdefault(c, [0.0, 0.0])
        a[0] += m
        a[1] += f
    sums = list(clusters.values())
    if len(sums) < 2 or not any(f for _, f in sums):
        return None
    rng, n, ratios = random.Random(seed), len(sums), []
    for _ in range(resamples):
        m = f = 0.0
        for _ in range(n):
            a = sums[rng.randrange(n)]
            m += a[0]
            f += a[1]
        if f:
            ratios.append(m / f)
    ratios.sort()
    return [ratios[int(0.025 * (len(ratios) - 1))], ratios[int(round(0.975 * (len(ratios) - 1)))]]


def paired(records: Sequence[dict], full_records: Sequence[dict]) -> dict:
    """Paired comparison of ``records`` against ``full_records`` on the prompts both scored.

    Returns ``n`` (prompts in both), ``right_to_wrong`` (full right, method not), ``wrong_to_right``,
    ``both_right``, ``both_wrong``, ``accuracy`` and ``full_accuracy`` over those prompts, and
    ``retention`` = accuracy / full_accuracy (None when the full cache scored 0), ``retention_ci95``
    (:func:`retention_interval`) and ``sign_p`` (:func:`sign_test` on the two flip counts).
    Raises ValueError when a prompt occurs twice on one side.
    """
    def index(rs: Sequence[dict], side: str) -> dict:
        out: dict = {}
        for r in rs:
            k = sample_key(r)
            if k in out:
                raise ValueError(f"{side}: prompt {k} scored twice")
            out[k] = float(r["score"])
        return out

    mine, full = index(records, "records"), index(full_records, "full_records")
    keys = [k for k in mine if k in full]
    res = {"n": len(keys), "right_to_wrong": 0, "wrong_to_right": 0, "both_right": 0, "both_wrong": 0}
    for k in keys:
        a, b = mine[k] == 1.0, full[k] == 1.0
        res[{(True, True): "both_right", (False, False): "both_wrong",
             (False, True): "right_to_wrong", (True, False): "wrong_to_right"}[(a, b)]] += 1
    acc = sum(mine[k] for k in keys) / len(keys) if keys else float("nan")
    full_acc = sum(full[k] for k in keys) / len(keys) if keys else float("nan")
    res.update(accuracy=acc, full_accuracy=full_acc, retention=(acc / full_acc) if keys and full_acc else None,
               retention_ci95=retention_interval([(k[:-1], mine[k], full[k]) for k in keys]),
               sign_p=sign_test(res["right_to_wrong"], res["wrong_to_right"]))
    return res
