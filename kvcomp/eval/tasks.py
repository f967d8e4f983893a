"""Procedurally generated RULER-style tasks with token-exact length control.

Tasks (all deterministic given ``seed``; every draw goes through one ``random.Random(seed)``):

| task | needles | asked | answers | default budget |
|---|---|---|---|---|
| ``passkey`` | "The pass key is K. Remember it. K is the pass key." (5-digit K) | the pass key | ``[K]`` | 12 |
| ``niah_single`` | "One of the special magic numbers for {key} is: {value}." | key | ``[value]`` | 16 |
| ``niah_multikey`` | 1 needle + ``num_distractors`` (3) needles with other keys | key | ``[value]`` | 16 |
| ``niah_multivalue`` | ``num_values`` (4) needles for one key | key | 4 values | 48 |
| ``niah_multiquery`` | ``num_queries`` (4) needles, 4 keys | all 4 keys | 4 values | 48 |
| ``vt`` | "VAR ABCDE = 12345." then hops "VAR X = VAR Y." | the value | all 5 names | 30 |

``vt`` prepends, like RULER, one solved example (``icl=True``; own names and value, 10 noise sentences).

Keys are adjective-noun pairs ("fretful-place") from built-in word lists; values are 7-digit
numbers. Needle depths (percent of the haystack sentences before the needle) are drawn from the
40 evenly spaced RULER depths ``round(linspace(0, 100, 40))``. Values that occur in the haystack
source are redrawn, so an answer appears in the prompt only through its needle.

Length control: the prompt is tokenized with the caller's tokenizer and the number of haystack
sentences is found by search so that ``n_prompt_tokens + max_new_tokens <= context_len`` with the
largest such haystack.

Prompts follow RULER's templates. A sample carries the user message (``user``) and the answer
prefix (``answer_prefix``) separately; ``prompt`` is ``user + " " + answer_prefix`` (raw) or, with
``chat=True``, the tokenizer's chat template applied to ``user`` (generation prompt added)
followed by the prefix. Tokenize ``prompt`` with ``add_special_tokens=sample.add_special_tokens``.
"""

from __future__ import annotations

import functools
import hashlib
import random
import string
from dataclasses import dataclass, field
from typing import Any, Callable

from .haystack import FILLER, HAYSTACKS, build_context, corpus_text, haystack_sentences, take_sentences

__all__ = [
    "ADJECTIVES",
    "DEPTHS",
    "NOUNS",
    "TASKS",
    "Sample",
    "count_tokens",
    "derive_seed",
    "make_sample",
]

DEPTHS: tuple[int, ...] = tuple(int(round(i * 100 / 39)) for i in range(40))

TASKS: dict[str, int] = {
    "passkey": 12,
    "niah_single": 16,
    "niah_multikey": 16,
    "niah_multivalue": 48,
    "niah_multiquery": 48,
    "vt": 30,
}

ADJECTIVES = (
    "amber", "ancient", "anxious", "bitter", "bold", "brave", "breezy", "brisk", "calm", "careful",
    "cheerful", "chilly", "clever", "cloudy", "crimson", "curious", "damp", "dapper", "daring",
    "dusty", "eager", "elegant", "faint", "fancy", "fearless", "fierce", "fluffy", "fragile",
    "fretful", "frosty", "gentle", "gloomy", "golden", "graceful", "grumpy", "hollow", "humble",
    "frozen", "jolly", "keen", "lively", "lonely", "lucky", "majestic", "mellow", "misty", "modest",
    "muddy", "narrow", "nervous", "nimble", "noisy", "odd", "pale", "patient", "plain", "polite",
    "proud", "quiet", "rapid", "restless", "rough", "rusty", "salty", "scarlet", "shiny", "silent",
    "silver", "sleepy", "slender", "smooth", "sober", "solid", "sour", "spicy", "steady", "sticky",
    "stormy", "sturdy", "sunny", "swift", "tame", "tender", "thirsty", "tidy", "tiny", "tranquil",
    "vivid", "wary", "wicked", "windy", "wise", "witty", "wooden", "young", "zealous",
)
NOUNS = (
    "anchor", "apple", "arrow", "badger", "banjo", "barn", "basket", "beacon", "blanket", "bridge",
    "bucket", "butterfly", "cabin", "candle", "canyon", "carpet", "castle", "cellar", "chimney",
    "clover", "comet", "compass", "cottage", "crater", "cricket", "dolphin", "dragon", "falcon",
    "feather", "fiddle", "forest", "fountain", "garden", "glacier", "harbor", "hedge", "helmet",
    "island", "jacket", "kettle", "ladder", "lantern", "lemon", "lizard", "meadow", "mirror",
    "mitten", "monkey", "needle", "orchard", "otter", "paddle", "parrot", "pebble", "pepper",
    "pillow", "pirate", "place", "planet", "pocket", "puddle", "rabbit", "raven", "ribbon",
    "river", "rocket", "saddle", "salmon", "scooter", "shovel", "spider", "sprout", "squirrel",
    "stable", "teapot", "thistle", "thunder", "tiger", "tractor", "trumpet", "tulip", "turnip",
    "valley", "violin", "walnut", "wagon", "whistle", "window", "wizard", "workhorse", "yacht",
)


@dataclass
class Sample:
    """One generated prompt with its gold answers.

    ``depth`` is the depth (percent, 0..100) of the asked needle (first one for multi-needle
    tasks, the initial assignment for ``vt``); ``depths`` lists every inserted needle's depth in
    insertion order and ``needles`` their texts. ``n_prompt_tokens`` counts ``prompt`` tokenized
    with ``add_special_tokens``; ``n_sentences`` is the number of haystack sentences used.
    """

    task: str
    haystack: str
    context_len: int
    seed: int
    prompt: str
    answers: list[str]
    max_new_tokens: int
    depth: float
    user: str = ""
    answer_prefix: str = ""
    chat: bool = False
    add_special_tokens: bool = True
    n_prompt_tokens: int = 0
    n_sentences: int = 0
    depths: tuple[float, ...] = ()
    needles: tuple[str, ...] = ()
    query: str = ""
    meta: dict[str, Any] = field(default_factory=dict)


def derive_seed(*parts: Any) -> int:
    """A stable 63-bit seed from ``parts`` (independent of ``PYTHONHASHSEED``)."""
    digest = hashlib.sha256("\x1f".join(repr(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def count_tokens(tokenizer: Any, text: str, add_special_tokens: bool = True) -> int:
    """Number of tokens of ``text`` under ``tokenizer`` (``encode`` or ``__call__`` interface)."""
    if hasattr(tokenizer, "encode"):
        return len(tokenizer.encode(text, add_special_tokens=add_special_tokens))
    if callable(tokenizer):
        return len(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])
    raise ValueError(f"tokenizer must have encode() or be callable, got {type(tokenizer).__name__}")


# --------------------------------------------------------------------------------------- draws
@dataclass
class _Plan:
    needles: list[tuple[float, str]]
    answers: list[str]
    template: str  # user message with a {context} slot
    answer_prefix: str
    depth: float
    query: str
    meta: dict[str, Any] = field(default_factory=dict)


@functools.lru_cache(maxsize=None)
def _forbidden_text(haystack: str) -> str:
    """Lower-cased haystack source plus the fixed template words: drawn values must avoid both."""
    return corpus_text(haystack).lower() + "\n" + _FIXED_TEXT


class _Draw:
    """Random draws that never repeat a value and never hit text of the haystack source."""

    def __init__(self, rng: random.Random, haystack: str):
        self.rng = rng
        self.corpus = _forbidden_text(haystack)
        self.used: set[str] = set()

    def _fresh(self, make: Callable[[], str]) -> str:
        for _ in range(10_000):
            val = make()
            if val not in self.used and val.lower() not in self.corpus:
                self.used.add(val)
                return val
        raise RuntimeError("could not draw a fresh needle value")

    def number(self, digits: int) -> str:
        lo = 10 ** (digits - 1)
        return self._fresh(lambda: str(self.rng.randint(lo, 10 * lo - 1)))

    def key(self) -> str:
        for _ in range(10_000):
            key = self._fresh(lambda: f"{self.rng.choice(ADJECTIVES)}-{self.rng.choice(NOUNS)}")
            if not any(key in u or u in key for u in self.used if u != key):
                return key
            self.used.discard(key)
        raise RuntimeError("could not draw a fresh key")

    def var(self) -> str:
        return self._fresh(lambda: "".join(self.rng.choices(string.ascii_uppercase, k=5)))

    def depths(self, k: int) -> list[float]:
        if k == 1:
            return [float(self.rng.choice(DEPTHS))]
        return [float(d) for d in self.rng.sample(DEPTHS, k)]


_NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize "
               "it. I will quiz you about the numbers afterwards.\n")
_NIAH_INTRO_1 = ("A special magic number is hidden within the following text. Make sure to memorize it. "
                 "I will quiz you about the number afterwards.\n")


_FIXED_TEXT = " ".join([
    _NIAH_INTRO, _NIAH_INTRO_1, "What is are all the special magic number numbers for mentioned in the provided text",
    "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you "
    "about the important information there. What is the pass key? The pass key is Remember it.",
    "Memorize and track the chain(s) of variable assignment hidden in the following text. Question: Find all "
    "variables that are assigned the value in the text above. Answer: According to the chain(s) of variable "
    "assignment in the text above, variables are assigned the value, they are: VAR One of",
    FILLER,
]).lower()


def _needle(key: str, value: str) -> str:
    return f"One of the special magic numbers for {key} is: {value}."


def _niah_plan(d: _Draw, keys: list[str], values: list[list[str]], n_query: int) -> _Plan:
    """Needles for ``keys[i]`` with ``values[i]``; the first ``n_query`` keys are asked."""
    pairs = [(k, v) for k, vs in zip(keys, values) for v in vs]
    if len(pairs) > len(DEPTHS):
        raise ValueError(f"at most {len(DEPTHS)} needles per sample, got {len(pairs)}")
    depths = d.depths(len(pairs))
    order = list(range(len(pairs)))
    d.rng.shuffle(order)  # insertion order of equal-boundary needles is random too
    needles = [(depths[i], _needle(*pairs[i])) for i in order]
    asked = keys[:n_query]
    answers = [v for vs in values[:n_query] for v in vs]
    single = n_query == 1 and len(values[0]) == 1
    query = asked[0] if n_query == 1 else ", ".join(asked[:-1]) + ", and " + asked[-1]
    if single:
        template = (_NIAH_INTRO_1 + "{context}\n" +
                    f"What is the special magic number for {query} mentioned in the provided text?")
        prefix = f"The special magic number for {query} mentioned in the provided text is"
    else:
        template = (_NIAH_INTRO + "{context}\n" +
                    f"What are all the special magic numbers for {query} mentioned in the provided text?")
        prefix = f"The special magic numbers for {query} mentioned in the provided text are"
    return _Plan(needles, answers, template, prefix, depth=depths[0], query=query)


def _plan_passkey(d: _Draw, **kw: Any) -> _Plan:
    _no_kwargs("passkey", kw)
    key = d.number(5)
    depth = d.depths(1)[0]
    template = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
                "it. I will quiz you about the important information there.\n\n{context}\n\n"
                "What is the pass key?")
    needle = f"The pass key is {key}. Remember it. {key} is the pass key."
    return _Plan([(depth, needle)], [key], template, "The pass key is", depth=depth, query="pass key")


def _plan_single(d: _Draw, **kw: Any) -> _Plan:
    _no_kwargs("niah_single", kw)
    return _niah_plan(d, [d.key()], [[d.number(7)]], 1)


def _plan_multikey(d: _Draw, num_distractors: int = 3, **kw: Any) -> _Plan:
    _no_kwargs("niah_multikey", kw)
    _positive("num_distractors", num_distractors)
    keys = [d.key() for _ in range(num_distractors + 1)]
    return _niah_plan(d, keys, [[d.number(7)] for _ in keys], 1)


def _plan_multivalue(d: _Draw, num_values: int = 4, **kw: Any) -> _Plan:
    _no_kwargs("niah_multivalue", kw)
    _positive("num_values", num_values)
    return _niah_plan(d, [d.key()], [[d.number(7) for _ in range(num_values)]], 1)


def _plan_multiquery(d: _Draw, num_queries: int = 4, **kw: Any) -> _Plan:
    _no_kwargs("niah_multiquery", kw)
    _positive("num_queries", num_queries)
    keys = [d.key() for _ in range(num_queries)]
    return _niah_plan(d, keys, [[d.number(7)] for _ in keys], num_queries)


_VT_INTRO = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"


def _vt_chain(d: _Draw, num_hops: int) -> tuple[list[str], str, list[str]]:
    """(names, value, statements) of one chain: ``VAR A = value.`` then ``VAR B = VAR A.`` ..."""
    names = [d.var() for _ in range(num_hops + 1)]
    value = d.number(5)
    stmts = [f"VAR {names[0]} = {value}."] + [
        f"VAR {names[j + 1]} = VAR {names[j]}." for j in range(num_hops)]
    return names, value, stmts


def _vt_question(query: str, num_v: int) -> tuple[str, str]:
    question = f"Question: Find all variables that are assigned the value {query} in the text above."
    prefix = (f"Answer: According to the chain(s) of variable assignment in the text above, "
              f"{num_v} variables are assigned the value {query}, they are:")
    return question, prefix


def _plan_vt(d: _Draw, num_chains: int = 1, num_hops: int = 4, icl: bool = True, **kw: Any) -> _Plan:
    """Variable tracking. With ``icl`` (RULER's default) a short solved example on a fixed
    10-sentence noise haystack, with its own fresh names and value, precedes the question."""
    _no_kwargs("vt", kw)
    _positive("num_chains", num_chains)
    _positive("num_hops", num_hops)
    if num_hops + 1 > len(DEPTHS):
        raise ValueError(f"num_hops must be < {len(DEPTHS)}, got {num_hops}")
    needles: list[tuple[float, str]] = []
    chains: list[list[str]] = []
    values: list[str] = []
    first_depth = 0.0
    for c in range(num_chains):
        names, value, stmts = _vt_chain(d, num_hops)
        depths = sorted(d.depths(num_hops + 1))
        needles.extend(zip(depths, stmts))
        chains.append(names)
        values.append(value)
        if c == 0:
            first_depth = depths[0]
    query = values[0]
    question, prefix = _vt_question(query, num_hops + 1)
    demo = ""
    if icl:
        names, value, stmts = _vt_chain(d, num_hops)
        ctx = build_context(take_sentences("noise", 10), list(zip(sorted(d.depths(num_hops + 1)), stmts)))
        q, p = _vt_question(value, num_hops + 1)
        demo = _VT_INTRO + ctx + "\n" + q + " " + p + " " + " ".join(names) + ".\n\n"
    template = demo + _VT_INTRO + "{context}\n" + question
    return _Plan(needles, list(chains[0]), template, prefix, depth=first_depth, query=query,
                 meta={"chains": chains, "values": values, "icl": bool(icl)})


_PLANS: dict[str, Callable[..., _Plan]] = {
    "passkey": _plan_passkey,
    "niah_single": _plan_single,
    "niah_multikey": _plan_multikey,
    "niah_multivalue": _plan_multivalue,
    "niah_multiquery": _plan_multiquery,
    "vt": _plan_vt,
}


def _no_kwargs(task: str, kw: dict) -> None:
    if kw:
        raise ValueError(f"unknown option(s) for task {task!r}: {sorted(kw)}")


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


# ------------------------------------------------------------------------------ length control
def _render(tokenizer: Any, user: str, prefix: str, chat: bool) -> str:
    if not chat:
        return user + " " + prefix
    head = tokenizer.apply_chat_template(
        [{"role": "user", "content": user}], tokenize=False, add_generation_prompt=True)
    return head + prefix


def make_sample(task: str, tokenizer: Any, context_len: int, *, haystack: str = "noise", seed: int = 0,
                chat: bool = False, max_new_tokens: int | None = None, **options: Any) -> Sample:
    """Generate one sample of ``task`` that fills ``context_len`` tokens under ``tokenizer``.

    Args:
        task: one of ``TASKS``.
        tokenizer: a Hugging Face tokenizer (or anything with ``encode(text, add_special_tokens=)``;
            ``apply_chat_template`` too when ``chat``).
        context_len: total token budget: prompt tokens + ``max_new_tokens`` <= ``context_len``.
        haystack: ``"noise"`` or ``"prose"``.
        seed: seeds the sample's private ``random.Random`` (needle values, keys, depths, prose
            start offset).
        chat: wrap the user message in the tokenizer's chat template (then the prompt is tokenized
            without extra special tokens).
        max_new_tokens: output budget; defaults to ``TASKS[task]``.
        **options: task options (``num_distractors``, ``num_values``, ``num_queries``,
            ``num_chains``, ``num_hops``, ``icl`` for ``vt``).

    Returns the ``Sample`` with the largest haystack (in sentences) that fits.
    Raises ValueError for an unknown task/haystack, a non-positive budget, or a ``context_len``
    too small for the prompt with an empty haystack.
    """
    if task not in _PLANS:
        raise ValueError(f"task must be one of {sorted(_PLANS)}, got {task!r}")
    if haystack not in HAYSTACKS:
        raise ValueError(f"haystack must be one of {HAYSTACKS}, got {haystack!r}")
    if not isinstance(context_len, int) or isinstance(context_len, bool) or context_len < 1:
        raise ValueError(f"context_len must be a positive int, got {context_len!r}")
    if not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    budget = TASKS[task] if max_new_tokens is None else max_new_tokens
    _positive("max_new_tokens", budget)
    if chat and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("chat=True needs a tokenizer with a chat_template")

    rng = random.Random(seed)
    plan = _PLANS[task](_Draw(rng, haystack), **options)
    src_len = len(haystack_sentences(haystack))
    offset = rng.randrange(src_len) if haystack == "prose" else 0
    add_special = not chat

    cache: dict[int, tuple[int, str, str]] = {}

    def build(n: int) -> tuple[int, str, str]:
        if n not in cache:
            context = build_context(take_sentences(haystack, n, offset), plan.needles)
            user = plan.template.replace("{context}", context)
            prompt = _render(tokenizer, user, plan.answer_prefix, chat)
            cache[n] = (count_tokens(tokenizer, prompt, add_special), user, prompt)
        return cache[n]

    def fits(n: int) -> bool:
        return build(n)[0] + budget <= context_len

    if not fits(0):
        raise ValueError(f"context_len={context_len} is too small for task {task!r}: the prompt "
                         f"without haystack takes {build(0)[0]} tokens + {budget} new tokens")
    # Secant guesses from the token cost per sentence, then bracket and bisect.
    limit = context_len - budget
    base = build(0)[0]
    guess, n_prev, t_prev = 64, 0, base
    for _ in range(6):
        t_guess = build(guess)[0]
        rate = max((t_guess - t_prev) / max(guess - n_prev, 1), 1e-3)
        nxt = min(max(0, guess + int((limit - t_guess) / rate)), 16 * guess + 64)
        if abs(nxt - guess) <= 1:
            break
        n_prev, t_prev, guess = guess, t_guess, nxt
    # Tightest bracket from everything measured so far; grow it upwards if nothing overflowed.
    lo = max(n for n, (t, _, _) in cache.items() if t + budget <= context_len)
    over = [n for n, (t, _, _) in cache.items() if n > lo and t + budget > context_len]
    hi, step = (min(over) if over else None), 2
    while hi is None:
        if fits(lo + step):
            lo, step = lo + step, 2 * step
            if lo > 64 * context_len + 1024:
                raise ValueError("tokenizer: prompt length does not grow with the haystack")
        else:
            hi = lo + step
    while hi - lo > 1:  # invariant: fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    n_tok, user, prompt = build(lo)
    return Sample(
        task=task, haystack=haystack, context_len=context_len, seed=seed, prompt=prompt,
        answers=list(plan.answers), max_new_tokens=budget, depth=plan.depth, user=user,
        answer_prefix=plan.answer_prefix, chat=chat, add_special_tokens=add_special,
        n_prompt_tokens=n_tok, n_sentences=lo, depths=tuple(dp for dp, _ in plan.needles),
        needles=tuple(t for _, t in plan.needles), query=plan.query, meta=dict(plan.meta))
