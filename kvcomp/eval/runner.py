"""Run the RULER-style tasks through a caller-supplied ``generate`` function and aggregate.

``generate(sample) -> (text, stats)`` is the only model interface: the HF path builds it from a
model, a tokenizer and a compression config. ``stats`` must hold ``kv_bytes_per_token`` (the KV
cache bytes per context token the method kept) and may hold more numbers (``device_bytes_per_token``,
``host_bytes_per_token``, ``seconds``, ...), all averaged by ``summarize``. A generate function with
``batched = True`` takes a list of samples of equal token length and returns one ``(text, stats)``
per sample (``evaluate_samples(..., batch_size=B)`` groups them).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import sys
import time
from collections import OrderedDict
from typing import Any, Callable, Iterable, Sequence

from ..utils.machine import git_commit, machine_info
from .haystack import HAYSTACKS
from .score import string_match_all
from .stats import paired, wilson
from .tasks import TASKS, Sample, derive_seed, make_sample

__all__ = ["build_samples", "compare_to_full", "evaluate_samples", "run_eval", "summarize", "write_results"]

Generate = Callable[[Sample], "tuple[str, dict]"]


def _names(arg: str, values: Any, allowed: Iterable[str]) -> list[str]:
    if isinstance(values, str):
        values = [values]
    values = list(values or [])
    allowed = list(allowed)
    if not values or any(v not in allowed for v in values):
        raise ValueError(f"{arg} must be a non-empty list drawn from {allowed}, got {values!r}")
    return values


def build_samples(tokenizer: Any, *, tasks: Sequence[str], context_lens: Sequence[int], n_trials: int,
                  haystacks: Sequence[str] = ("noise",), seed: int = 0, chat: bool = False,
                  max_new_tokens: dict[str, int] | None = None,
                  task_options: dict[str, dict] | None = None) -> list[Sample]:
    """All samples of the grid context_len x task x haystack x trial (in that nesting order).

    The sample seed is ``derive_seed(seed, task, haystack, context_len, trial)``, so the same
    ``seed`` gives identical prompts for every method compared.
    """
    tasks = _names("tasks", tasks, TASKS)
    haystacks = _names("haystacks", haystacks, HAYSTACKS)
    if isinstance(context_lens, int):
        context_lens = [context_lens]
    lens = list(context_lens)
    if not lens or any(not isinstance(c, int) or c < 1 for c in lens):
        raise ValueError(f"context_lens must be a non-empty list of positive ints, got {context_lens!r}")
    if not isinstance(n_trials, int) or n_trials < 1:
        raise ValueError(f"n_trials must be a positive int, got {n_trials!r}")
    budgets = dict(max_new_tokens or {})
    options = dict(task_options or {})
    for name, d in (("max_new_tokens", budgets), ("task_options", options)):
        if any(t not in TASKS for t in d):
            raise ValueError(f"{name} keys must be task names from {sorted(TASKS)}, got {sorted(d)}")
    samples = []
    for ctx in lens:
        for task in tasks:
            for hay in haystacks:
                for trial in range(n_trials):
                    s = make_sample(task, tokenizer, ctx, haystack=hay, chat=chat,
                                    seed=derive_seed(seed, task, hay, ctx, trial),
                                    max_new_tokens=budgets.get(task), **options.get(task, {}))
                    s.meta["trial"] = trial
                    samples.append(s)
    return samples


def _batches(samples: Sequence[Sample], batch_size: int) -> list[list[Sample]]:
    """Samples grouped by (prompt tokens, output budget) in first-seen order, cut to ``batch_size``."""
    if batch_size == 1:
        return [[s] for s in samples]
    groups: "OrderedDict[tuple[int, int], list[Sample]]" = OrderedDict()
    for s in samples:
        groups.setdefault((s.n_prompt_tokens, s.max_new_tokens), []).append(s)
    return [g[i: i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


def evaluate_samples(generate: Generate, samples: Sequence[Sample], *, method_name: str,
                     progress: bool = True, batch_size: int = 1, checkpoint: Any = None) -> list[dict]:
    """Run ``generate`` on every sample and score it with ``string_match_all``.

    With ``batch_size > 1`` (``generate.batched`` must be true) samples of equal prompt length and
    budget run together, up to ``batch_size`` at a time; each record's ``wall_s`` is its share of
    the batch's time and ``batch`` the batch size. Returns one record per sample: ``method, mode,
    task, haystack, context_len, seed, trial, depth, score, prediction, answers, n_prompt_tokens,
    max_new_tokens, stats, wall_s, batch``. Raises ValueError when ``generate`` does not return
    ``(str, dict)`` with ``kv_bytes_per_token``. With a :class:`~kvcomp.eval.checkpoint.Checkpoint`,
    samples it holds are not run again (their stored records are returned) and every finished sample
    is stored as soon as its batch ends.
    """
    if not callable(generate):
        raise ValueError("generate must be callable: generate(sample) -> (text, stats)")
    if not isinstance(method_name, str) or not method_name:
        raise ValueError(f"method_name must be a non-empty str, got {method_name!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    batched = bool(getattr(generate, "batched", False))
    if batch_size > 1 and not batched:
        raise ValueError("batch_size > 1 needs a batched generate (generate.batched = True)")
    from .checkpoint import sample_key

    stored = {id(s): checkpoint.get(sample_key(method_name, s)) for s in samples} if checkpoint else {}
    todo = [s for s in samples if stored.get(id(s)) is None]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(samples), initial=len(samples) - len(todo), desc=method_name, file=sys.stderr,
                   dynamic_ncols=True)
    new: dict[int, dict] = {}
    total, n_new = 0.0, 0
    try:
        for batch in _batches(todo, batch_size):
            t0 = time.perf_counter()
            outs = generate(batch) if batched else [generate(batch[0])]
            wall = (time.perf_counter() - t0) / len(batch)
            if not isinstance(outs, list) or len(outs) != len(batch):
                raise ValueError(f"a batched generate must return one (text, stats) per sample ({len(batch)})")
            for s, out in zip(batch, outs):
                if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], str)
                        and isinstance(out[1], dict)):
                    raise ValueError("generate must return (text: str, stats: dict)")
                text, stats = out
                if "kv_bytes_per_token" not in stats:
                    raise ValueError("generate's stats must contain 'kv_bytes_per_token'")
                score = string_match_all(text, s.answers)
                total, n_new = total + score, n_new + 1
                new[id(s)] = ({
                    "method": method_name, "mode": "single", "task": s.task, "haystack": s.haystack,
                    "context_len": s.context_len, "seed": s.seed, "trial": s.meta.get("trial"),
                    "depth": s.depth, "score": score, "prediction": text, "answers": list(s.answers),
                    "n_prompt_tokens": s.n_prompt_tokens, "max_new_tokens": s.max_new_tokens,
                    "stats": dict(stats), "wall_s": wall, "batch": len(batch),
                })
                if checkpoint:
                    checkpoint.add(sample_key(method_name, s), [new[id(s)]])
            if bar is not None:
                bar.update(len(batch))
                bar.set_postfix(ctx=batch[0].context_len, task=batch[0].task, acc=f"{total / n_new:.3f}")
    finally:
        if bar is not None:
            bar.close()
    return [r for s in samples for r in (stored.get(id(s)) or [new[id(s)]])]


def run_eval(generate: Generate, tokenizer: Any, *, tasks: Sequence[str], context_lens: Sequence[int],
             n_trials: int, haystacks: Sequence[str] = ("noise",), seed: int = 0,
             method_name: str = "full", progress: bool = True, chat: bool = False,
             max_new_tokens: dict[str, int] | None = None,
             task_options: dict[str, dict] | None = None, batch_size: int = 1) -> list[dict]:
    """Build the sample grid (see ``build_samples``) and evaluate it (see ``evaluate_samples``).

    Example::

        records = run_eval(gen, tok, tasks=["niah_single"], context_lens=[2048], n_trials=4,
                           haystacks=["prose"], method_name="duo")
        summary = summarize(records)
    """
    samples = build_samples(tokenizer, tasks=tasks, context_lens=context_lens, n_trials=n_trials,
                            haystacks=haystacks, seed=seed, chat=chat, max_new_tokens=max_new_tokens,
                            task_options=task_options)
    return evaluate_samples(generate, samples, method_name=method_name, progress=progress, batch_size=batch_size)


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _is_num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _turn(r: dict) -> str:
    """``all`` for single-query records; ``first`` / ``later`` question of a multi-query context."""
    if r.get("mode", "single") == "single":
        return "all"
    return "first" if r.get("query_index", 0) == 0 else "later"


def summarize(records: Sequence[dict]) -> list[dict]:
    """Aggregate records per cell (method, context_len, mode, turn).

    Each row: ``method, context_len, mode`` (``single`` / ``multi-query``), ``turn`` (``all``, or the
    ``first`` / ``later`` questions of a shared context), ``accuracy`` (mean score), ``n_prompts``
    (= ``n_samples``, records in the cell), ``ci95`` (Wilson interval), ``n_trials`` (fewest records
    of any task/haystack pair), ``wall_s`` (summed record wall time), ``kv_bytes_per_token`` (mean)
    and, when every record has them, ``device_bytes_per_token`` / ``host_bytes_per_token``; ``stats``
    (mean of each numeric stat present in every record), ``per_task``, ``per_haystack`` and
    ``per_task_haystack`` (``"task/haystack"``) accuracies. Methods keep their first-seen order.
    """
    if not records:
        raise ValueError("records must be a non-empty list")
    groups: "OrderedDict[tuple[str, int, str, str], list[dict]]" = OrderedDict()
    methods: list[str] = []
    for r in records:
        for k in ("method", "task", "haystack", "context_len", "score", "stats"):
            if k not in r:
                raise ValueError(f"record lacks {k!r}: {sorted(r)}")
        if r["method"] not in methods:
            methods.append(r["method"])
        groups.setdefault((r["method"], r["context_len"], r.get("mode", "single"), _turn(r)), []).append(r)
    turns = ("all", "first", "later")
    rows = []
    for key in sorted(groups, key=lambda k: (methods.index(k[0]), k[1], k[2], turns.index(k[3]))):
        method, ctx, mode, turn = key
        rs = groups[key]

        def by(key: Callable[[dict], str]) -> dict[str, float]:
            acc: "OrderedDict[str, list[float]]" = OrderedDict()
            for r in rs:
                acc.setdefault(key(r), []).append(r["score"])
            return {k: _mean(v) for k, v in acc.items()}

        counts: dict[str, int] = {}
        for r in rs:
            counts[f"{r['task']}/{r['haystack']}"] = counts.get(f"{r['task']}/{r['haystack']}", 0) + 1
        keys = set.intersection(*(set(k for k, v in r["stats"].items() if _is_num(v)) for r in rs))
        stats = {k: _mean([float(r["stats"][k]) for r in rs]) for k in sorted(keys)}
        acc = _mean([float(r["score"]) for r in rs])
        row = {
            "method": method, "context_len": ctx, "mode": mode, "turn": turn, "accuracy": acc,
            "n_prompts": len(rs), "ci95": list(wilson(acc, len(rs))),
            "n_samples": len(rs), "n_trials": min(counts.values()),
            "wall_s": sum(float(r.get("wall_s", 0.0)) for r in rs),
            "kv_bytes_per_token": stats.get("kv_bytes_per_token", float("nan")),
        }
        for k in ("device_bytes_per_token", "host_bytes_per_token"):
            if k in stats:
                row[k] = stats[k]
        row["stats"] = stats
        row["per_task"] = by(lambda r: r["task"])
        row["per_haystack"] = by(lambda r: r["haystack"])
        row["per_task_haystack"] = by(lambda r: f"{r['task']}/{r['haystack']}")
        rows.append(row)
    return rows


def compare_to_full(summary: Sequence[dict], records: Sequence[dict], full_method: str = "full") -> list[dict]:
    """Add the full-cache comparison to every ``summarize`` row, in place, and return the rows.

    For each row the full cache's records of the same cell (context length, mode, turn) are paired
    with the row's records on the same prompts (:func:`kvcomp.eval.stats.paired`): ``paired``
    (``n``, ``right_to_wrong``, ``wrong_to_right``, ``both_right``, ``both_wrong``, ``sign_p``), ``full_accuracy``,
    ``accuracy_retained`` (= accuracy / full accuracy on the paired prompts) with its paired bootstrap
    interval ``retention_ci95``, ``full_kv_bytes_per_token``
    and ``bytes_fraction``. Rows without a full-cache cell are left as they are.
    """
    cells: dict = {}
    for r in records:
        cells.setdefault((r["method"], r["context_len"], r.get("mode", "single"), _turn(r)), []).append(r)
    full_rows = {(r["context_len"], r["mode"], r["turn"]): r for r in summary if r["method"] == full_method}
    for row in summary:
        cell = (row["context_len"], row["mode"], row["turn"])
        full_recs = cells.get((full_method,) + cell)
        if not full_recs:
            continue
        p = paired(cells.get((row["method"],) + cell, []), full_recs)
        f = full_rows[cell]
        row["paired"] = {k: p[k] for k in ("n", "right_to_wrong", "wrong_to_right", "both_right", "both_wrong",
                                           "sign_p")}
        row["full_accuracy"] = p["full_accuracy"]
        row["accuracy_retained"] = p["retention"]
        row["retention_ci95"] = p["retention_ci95"]
        row["full_kv_bytes_per_token"] = f["kv_bytes_per_token"]
        row["bytes_fraction"] = row["kv_bytes_per_token"] / f["kv_bytes_per_token"] if f["kv_bytes_per_token"] else None
    return list(summary)


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "item") and callable(obj.item):
        try:
            return obj.item()
        except (ValueError, RuntimeError):
            pass
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


def write_results(path: str, records: Sequence[dict], summary: Sequence[dict] | None = None,
                  meta: dict | None = None) -> dict:
    """Write ``{"machine", "commit", "created", "meta", "summary", "records"}`` as JSON to ``path``.

    ``summary`` defaults to ``summarize(records)``; ``machine`` is ``machine_info()`` (with its
    one-line form under ``machine["line"]``) and ``commit`` is ``git_commit()``. Parent folders are
    created. Returns the written object.
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        raise ValueError(f"path must be a file path, got {path!r}")
    records = list(records)
    if summary is None:
        summary = summarize(records) if records else []
    obj = {
        "machine": machine_info(),
        "commit": git_commit(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "meta": dict(meta or {}),
        "summary": list(summary),
        "records": records,
    }
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=_jsonable)
        f.write("\n")
    os.replace(tmp, path)
    return obj
