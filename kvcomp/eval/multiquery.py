"""Shared-context multi-query prompts (SCBench-style): one long context, several questions in turn.

A sample hides ``n_queries`` facts ("One of the special magic numbers for {key} is: {value}.") in
one haystack. The first turn is the context plus the first question (a chat user message followed
by the answer prefix); every later turn is the rest of a multi-turn chat: the end of the previous
answer, a new user message asking for another key, and its answer prefix. The runner appends each
turn to the *same* cache the earlier turns filled (and a compression method compressed), so
query-aware selections made at the first prefill (ThinK's channels, A²ATS's top-K) serve the
later questions too.

Length control: ``context_len`` covers the whole conversation: the first prompt, every later
turn's tokens and every answer's budget (``n_queries * max_new_tokens``). The haystack gets the
largest number of sentences that fits.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from .. import defaults as DEF
from .haystack import HAYSTACKS, build_context, haystack_sentences, take_sentences
from .tasks import _NIAH_INTRO, _Draw, count_tokens

__all__ = ["HISTORIES", "MODE", "MultiQuerySample", "build_multiquery_samples", "evaluate_multiquery", "gold_turn",
           "make_multiquery_sample", "turn_text"]

MODE = "multi-query"
# what a later turn's history holds: the gold answers (SCBench's multi-turn protocol: a later question then
# measures the compressed cache, not an earlier wrong answer carried forward) or the model's own answers
HISTORIES = DEF.MQ_HISTORIES
TASK = "niah_shared"
_SENTINELS = ("QQ1xQQ", "QQ2xQQ")


@dataclass
class MultiQuerySample:
    """One shared context and its questions, asked in order.

    ``prompt`` is the first turn (context + first question + answer prefix); ``turns[i]`` (i >= 1)
    is the text appended before answer ``i`` (``turns[0] == prompt``). ``answers[i]`` holds the gold
    value of question ``i``. Token counts use ``add_special_tokens`` for the first turn only.
    """

    context_len: int
    seed: int
    haystack: str
    turns: list[str]
    questions: list[str]
    answers: list[list[str]]
    keys: list[str]
    depths: tuple[float, ...]
    max_new_tokens: int
    chat: bool = True
    add_special_tokens: bool = False
    n_prompt_tokens: int = 0
    n_turn_tokens: list[int] = field(default_factory=list)
    n_sentences: int = 0
    task: str = TASK
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        return self.turns[0]


def _question(key: str) -> tuple[str, str]:
    return (f"What is the special magic number for {key} mentioned in the provided text?",
            f"The special magic number for {key} mentioned in the provided text is")


def gold_turn(sample: "MultiQuerySample", i: int) -> str:
    """Text appended before answer ``i`` (>= 1) under the gold history: the previous question's gold
    answer after its answer prefix (" 1234567."), then the turn (end of that answer, the new question)."""
    if not 1 <= i < len(sample.turns):
        raise ValueError(f"turn {i} is not a later turn of a {len(sample.turns)}-question sample")
    return f" {sample.answers[i - 1][0]}." + sample.turns[i]


def turn_text(tokenizer: Any, question: str, prefix: str, chat: bool) -> str:
    """The text that follows a previous answer: end of that turn, the new question, its answer prefix.

    With ``chat`` it is read off the tokenizer's chat template (what the template puts between an
    assistant message and the next user message, then the generation prompt); without, a newline.
    """
    if not chat:
        return "\n" + question + " " + prefix
    a, b = _SENTINELS
    full = tokenizer.apply_chat_template(
        [{"role": "user", "content": a}, {"role": "assistant", "content": b}, {"role": "user", "content": question}],
        tokenize=False, add_generation_prompt=True)
    if full.count(b) != 1:
        raise ValueError("the chat template does not render an assistant message verbatim")
    return full[full.index(b) + len(b):] + prefix


def make_multiquery_sample(tokenizer: Any, context_len: int, *, n_queries: int = 4, haystack: str = "prose",
                           seed: int = 0, chat: bool = True, max_new_tokens: int = 16) -> MultiQuerySample:
    """Generate one shared-context sample with ``n_queries`` facts, each asked once, in random order.

    Raises ValueError for bad arguments or a ``context_len`` too small for the conversation
    without any haystack.
    """
    if haystack not in HAYSTACKS:
        raise ValueError(f"haystack must be one of {HAYSTACKS}, got {haystack!r}")
    for name, v in (("context_len", context_len), ("n_queries", n_queries), ("max_new_tokens", max_new_tokens)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if chat and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("chat=True needs a tokenizer with a chat_template")
    rng = random.Random(seed)
    d = _Draw(rng, haystack)
    keys = [d.key() for _ in range(n_queries)]
    values = [d.number(7) for _ in keys]
    depths = d.depths(n_queries)
    needles = [(dp, f"One of the special magic numbers for {k} is: {v}.") for dp, k, v in zip(depths, keys, values)]
    order = list(range(n_queries))
    rng.shuffle(order)
    offset = rng.randrange(len(haystack_sentences(haystack))) if haystack == "prose" else 0
    asked = [keys[i] for i in order]
    qs = [_question(k) for k in asked]
    later = [turn_text(tokenizer, q, p, chat) for q, p in qs[1:]]
    later_tokens = [count_tokens(tokenizer, t, False) for t in later]
    limit = context_len - sum(later_tokens) - n_queries * max_new_tokens
    add_special = not chat

    def first(n: int) -> tuple[int, str]:
        user = _NIAH_INTRO + build_context(take_sentences(haystack, n, offset), needles) + "\n" + qs[0][0]
        text = (tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                              add_generation_prompt=True) if chat else user + " ") + qs[0][1]
        return count_tokens(tokenizer, text, add_special), text

    if first(0)[0] > limit:
        raise ValueError(f"context_len={context_len} is too small for {n_queries} questions: the conversation "
                         f"without haystack takes {first(0)[0] + context_len - limit} tokens")
    lo, hi = 0, 64
    while first(hi)[0] <= limit:
        lo, hi = hi, 2 * hi
        if hi > 64 * context_len + 1024:
            raise ValueError("tokenizer: prompt length does not grow with the haystack")
    while hi - lo > 1:  # invariant: first(lo) fits, first(hi) does not
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if first(mid)[0] <= limit else (lo, mid)
    n_tok, text = first(lo)
    return MultiQuerySample(
        context_len=context_len, seed=seed, haystack=haystack, turns=[text] + later, questions=[q for q, _ in qs],
        answers=[[values[i]] for i in order], keys=asked, depths=tuple(depths), max_new_tokens=max_new_tokens,
        chat=chat, add_special_tokens=add_special, n_prompt_tokens=n_tok, n_turn_tokens=later_tokens,
        n_sentences=lo, meta={"needle_depths_asked": [depths[i] for i in order]})


def build_multiquery_samples(tokenizer: Any, *, context_lens: list[int], n_trials: int, n_queries: int = 4,
                             haystacks: tuple[str, ...] | list[str] = ("prose",), seed: int = 0, chat: bool = True,
                             max_new_tokens: int = 16) -> list[MultiQuerySample]:
    """The grid context_len x haystack x trial; sample seeds come from ``derive_seed`` like ``build_samples``."""
    from .tasks import derive_seed

    if not isinstance(n_trials, int) or n_trials < 1:
        raise ValueError(f"n_trials must be a positive int, got {n_trials!r}")
    out = []
    for ctx in context_lens:
        for hay in haystacks:
            for trial in range(n_trials):
                s = make_multiquery_sample(tokenizer, ctx, n_queries=n_queries, haystack=hay, chat=chat,
                                           seed=derive_seed(seed, TASK, hay, ctx, trial, n_queries),
                                           max_new_tokens=max_new_tokens)
                s.meta["trial"] = trial
                out.append(s)
    return out


def evaluate_multiquery(converse: Any, samples: list[MultiQuerySample], *, method_name: str,
                        progress: bool = True, checkpoint: Any = None) -> list[dict]:
    """Run ``converse(sample) -> [(text, stats)] per question`` on every sample and score each answer.

    One record per question: ``method, mode, task, haystack, context_len, seed, trial, query_index,
    score, prediction, answers, n_prompt_tokens`` (tokens appended for that turn), ``max_new_tokens,
    stats, wall_s`` (the turn's time, from ``stats['seconds']``). A ``checkpoint`` works as in
    :func:`kvcomp.eval.runner.evaluate_samples` (one entry per shared context).
    """
    import sys

    from .checkpoint import sample_key
    from .score import string_match_all

    if not callable(converse):
        raise ValueError("converse must be callable: converse(sample) -> [(text, stats), ...]")
    if not isinstance(method_name, str) or not method_name:
        raise ValueError(f"method_name must be a non-empty str, got {method_name!r}")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(samples), desc=f"{method_name} {MODE}", file=sys.stderr, dynamic_ncols=True)
    records: list[dict] = []
    try:
        for s in samples:
            held = checkpoint.get(sample_key(method_name, s)) if checkpoint else None
            if held is not None:
                records += held
                if bar is not None:
                    bar.update(1)
                continue
            outs = converse(s)
            first = len(records)
            if not isinstance(outs, list) or len(outs) != len(s.turns):
                raise ValueError(f"converse must return one (text, stats) per question ({len(s.turns)})")
            for i, (text, stats) in enumerate(outs):
                if "kv_bytes_per_token" not in stats:
                    raise ValueError("converse's stats must contain 'kv_bytes_per_token'")
                records.append({
                    "method": method_name, "mode": MODE, "task": s.task, "haystack": s.haystack,
                    "context_len": s.context_len, "seed": s.seed, "trial": s.meta.get("trial"), "query_index": i,
                    "score": string_match_all(text, s.answers[i]), "prediction": text, "answers": list(s.answers[i]),
                    "n_prompt_tokens": s.n_prompt_tokens if i == 0 else s.n_turn_tokens[i - 1],
                    "max_new_tokens": s.max_new_tokens, "stats": dict(stats), "wall_s": float(stats.get("seconds", 0.0)),
                })
            if checkpoint:
                checkpoint.add(sample_key(method_name, s), records[first:])
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return records
