"""Offline calibration data: DuoAttention-style multi-passkey samples and A²ATS-style text mixes.

The haystack is real prose: the Python reference text in the standard-library module
``pydoc_data.topics`` (~465K characters, topics in sorted order), so nothing is downloaded and
every sample is deterministic for a given seed and tokenizer.

A multi-passkey sample (after duo-attention's ``multi_passkey`` data) is::

    <header> <prose ... needle 1 ... prose ... needle N ... prose>
    <question 1> <answer 1> ... <question N> <answer N>

where needle k reads "Remember this sequence of words, it's the {k-th} passkey to the vault:
{w1 w2 ...}." and the words are random NATO-alphabet words. Only the answer tokens are labelled.

Tokenizers only need ``encode(text, add_special_tokens=...) -> list[int]`` (any HF tokenizer).
"""

from __future__ import annotations

import functools
import random
import uuid
from dataclasses import dataclass, field

import torch

__all__ = [
    "NATO_WORDS",
    "PasskeySample",
    "default_passkey_config",
    "haystack_text",
    "haystack_token_ids",
    "make_multi_passkey_sample",
    "make_multi_passkey_samples",
    "make_text_samples",
    "ordinal",
]

NATO_WORDS = (
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett",
    "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo", "sierra", "tango",
    "uniform", "victor", "whiskey", "xray", "yankee", "zulu",
)

HEADER = (
    "There is important information hidden inside a lot of irrelevant text. Find it and memorize "
    "it. I will quiz you about the important information there.\n\n"
)
NEEDLE = "\n\nRemember this sequence of words, it's the {ordinal} passkey to the vault: {words}.\n\n"
QUESTION = "\nWhat is the {ordinal} passkey to the vault? Answer:"

_ORDINALS = (
    "first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
    "eleventh", "twelfth", "thirteenth", "fourteenth", "fifteenth", "sixteenth", "seventeenth",
    "eighteenth", "nineteenth", "twentieth",
)


def ordinal(k: int) -> str:
    """English ordinal of a 1-based index: ``1 -> "first"``, ``23 -> "23rd"``."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k <= len(_ORDINALS):
        return _ORDINALS[k - 1]
    suffix = "th" if 10 <= k % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(k % 10, "th")
    return f"{k}{suffix}"


@functools.lru_cache(maxsize=1)
def haystack_text() -> str:
    """The prose haystack: every ``pydoc_data.topics`` entry, in sorted topic order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k].strip() for k in sorted(topics))


_TOKEN_CACHE: dict[int, tuple[object, torch.Tensor]] = {}


def _encode(tokenizer, text: str, special: bool = False) -> list[int]:
    if not hasattr(tokenizer, "encode"):
        raise ValueError(f"tokenizer must have an encode(text, add_special_tokens=...) method, got {type(tokenizer).__name__}")
    return list(tokenizer.encode(text, add_special_tokens=special))


def haystack_token_ids(tokenizer) -> torch.Tensor:
    """The haystack tokenized once per tokenizer object. Returns ``[N]`` int64 (N ~ 113K for SmolLM2)."""
    hit = _TOKEN_CACHE.get(id(tokenizer))
    if hit is not None and hit[0] is tokenizer:
        return hit[1]
    ids = torch.tensor(_encode(tokenizer, haystack_text()), dtype=torch.long)
    if ids.numel() < 1024:
        raise ValueError(f"haystack tokenized to only {ids.numel()} tokens")
    _TOKEN_CACHE[id(tokenizer)] = (tokenizer, ids)
    return ids


def _window(ids: torch.Tensor, start: int, n: int) -> torch.Tensor:
    """``n`` consecutive haystack tokens from ``start``, wrapping around."""
    reps = (start + n) // ids.numel() + 1
    return ids.repeat(reps)[start:start + n] if reps > 1 else ids[start:start + n]


def default_passkey_config(context_len: int) -> tuple[int, int]:
    """``(num_passkeys, passkey_words)`` for a context length.

    duo-attention uses 10 passkeys of 32 words at 1K-128K tokens on 8B models; small contexts
    get fewer and shorter passkeys so the haystack keeps most of the tokens:
    1K -> (4, 8), 2K -> (8, 8), 4K -> (10, 16), >= 8K -> (10, 32).
    """
    if context_len < 64:
        raise ValueError(f"context_len must be >= 64, got {context_len}")
    n = max(2, min(10, context_len // 256))
    words = 8 if context_len <= 2048 else 16 if context_len < 8192 else 32
    return n, words


@dataclass
class PasskeySample:
    """One multi-passkey sample.

    ``input_ids [1, T]`` int64; ``answer_mask [1, T]`` bool, True exactly at the answer tokens
    (the positions whose final hidden states are matched in DuoAttention training);
    ``passkeys`` the words of each passkey; ``needle_positions`` the first token of each needle.
    """

    input_ids: torch.Tensor
    answer_mask: torch.Tensor
    passkeys: list[list[str]] = field(default_factory=list)
    needle_positions: list[int] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[1])


def make_multi_passkey_sample(
    tokenizer,
    context_len: int,
    *,
    num_passkeys: int | None = None,
    passkey_words: int | None = None,
    seed: int = 0,
    depth_range: tuple[float, float] = (0.05, 0.95),
) -> PasskeySample:
    """Build one multi-passkey sample of exactly ``context_len`` tokens.

    Args:
        tokenizer: object with ``encode(text, add_special_tokens=...)``; special tokens (e.g. BOS)
            are added only to the header.
        context_len: total tokens T.
        num_passkeys, passkey_words: default from ``default_passkey_config(context_len)``.
        seed: all randomness (haystack offset, needle depths, words) comes from it.
        depth_range: needles sit at sorted uniform depths in this fraction of the haystack.

    Returns:
        ``PasskeySample`` with ``input_ids [1, T]`` and ``answer_mask [1, T]``.
    """
    if not isinstance(context_len, int) or context_len < 64:
        raise ValueError(f"context_len must be an int >= 64, got {context_len!r}")
    dn, dw = default_passkey_config(context_len)
    n = dn if num_passkeys is None else num_passkeys
    w = dw if passkey_words is None else passkey_words
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"num_passkeys must be an int >= 1, got {n!r}")
    if not isinstance(w, int) or w < 1:
        raise ValueError(f"passkey_words must be an int >= 1, got {w!r}")
    lo, hi = depth_range
    if not 0.0 <= lo <= hi <= 1.0:
        raise ValueError(f"depth_range must satisfy 0 <= lo <= hi <= 1, got {depth_range!r}")

    rng = random.Random(seed)
    keys = [[rng.choice(NATO_WORDS) for _ in range(w)] for _ in range(n)]
    header = _encode(tokenizer, HEADER, special=True)
    needles = [_encode(tokenizer, NEEDLE.format(ordinal=ordinal(i + 1), words=" ".join(k))) for i, k in enumerate(keys)]
    questions = [_encode(tokenizer, QUESTION.format(ordinal=ordinal(i + 1))) for i in range(n)]
    answers = [_encode(tokenizer, " " + " ".join(k)) for k in keys]
    tail_len = sum(len(q) + len(a) for q, a in zip(questions, answers))
    n_hay = context_len - len(header) - sum(len(x) for x in needles) - tail_len
    if n_hay < context_len // 4:
        raise ValueError(
            f"context_len {context_len} is too small for {n} passkeys of {w} words "
            f"(only {max(n_hay, 0)} haystack tokens would remain); lower num_passkeys or passkey_words"
        )

    hay_all = haystack_token_ids(tokenizer)
    hay = _window(hay_all, rng.randrange(hay_all.numel()), n_hay).tolist()
    cuts = sorted(int(round((lo + (hi - lo) * rng.random()) * n_hay)) for _ in range(n))

    ids: list[int] = list(header)
    needle_pos: list[int] = []
    prev = 0
    for cut, needle in zip(cuts, needles):
        ids += hay[prev:cut]
        needle_pos.append(len(ids))
        ids += needle
        prev = cut
    ids += hay[prev:]
    mask = [False] * len(ids)
    for q, a in zip(questions, answers):
        ids += q
        mask += [False] * len(q)
        ids += a
        mask += [True] * len(a)
    assert len(ids) == context_len, (len(ids), context_len)
    return PasskeySample(
        input_ids=torch.tensor(ids, dtype=torch.long).unsqueeze(0),
        answer_mask=torch.tensor(mask, dtype=torch.bool).unsqueeze(0),
        passkeys=keys,
        needle_positions=needle_pos,
    )


def make_multi_passkey_samples(
    tokenizer,
    n_samples: int,
    *,
    min_len: int = 1024,
    max_len: int = 2048,
    num_passkeys: int | None = None,
    passkey_words: int | None = None,
    seed: int = 0,
) -> list[PasskeySample]:
    """``n_samples`` samples with lengths evenly spaced in ``[min_len, max_len]`` (as duo-attention's
    linspace of context lengths), sample i seeded with ``seed * 1_000_003 + i``."""
    if not isinstance(n_samples, int) or n_samples < 1:
        raise ValueError(f"n_samples must be an int >= 1, got {n_samples!r}")
    if not (isinstance(min_len, int) and isinstance(max_len, int) and 64 <= min_len <= max_len):
        raise ValueError(f"need ints 64 <= min_len <= max_len, got min_len={min_len!r} max_len={max_len!r}")
    if n_samples == 1:
        lens = [max_len]
    else:
        lens = [int(round(min_len + (max_len - min_len) * i / (n_samples - 1))) for i in range(n_samples)]
    return [
        make_multi_passkey_sample(
            tokenizer, t, num_passkeys=num_passkeys, passkey_words=passkey_words, seed=seed * 1_000_003 + i
        )
        for i, t in enumerate(lens)
    ]


def make_text_samples(
    tokenizer,
    n_tokens: int,
    *,
    sample_len: int = 2048,
    uuid_fraction: float = 0.2,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Calibration text for VQ codebooks: prose windows plus random-UUID strings (A²ATS mixes
    FineWeb-Edu with 20% UUID tokens).

    Returns a list of ``[1, t]`` int64 tensors (t <= sample_len) totalling exactly ``n_tokens``;
    the last ``round(uuid_fraction * n_tokens)`` tokens are UUID text.
    """
    if not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens must be an int >= 1, got {n_tokens!r}")
    if not isinstance(sample_len, int) or sample_len < 16:
        raise ValueError(f"sample_len must be an int >= 16, got {sample_len!r}")
    if not 0.0 <= uuid_fraction <= 1.0:
        raise ValueError(f"uuid_fraction must be in [0, 1], got {uuid_fraction!r}")
    rng = random.Random(seed)
    n_uuid = int(round(uuid_fraction * n_tokens))
    n_prose = n_tokens - n_uuid
    out: list[torch.Tensor] = []
    if n_prose:
        hay = haystack_token_ids(tokenizer)
        left = n_prose
        while left:
            t = min(sample_len, left)
            out.append(_window(hay, rng.randrange(hay.numel()), t).clone().unsqueeze(0))
            left -= t
    left = n_uuid
    while left:
        t = min(sample_len, left)
        ids: list[int] = []
        while len(ids) < t:
            text = " ".join(str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(16))
            ids += _encode(tokenizer, text + "\n")
        out.append(torch.tensor(ids[:t], dtype=torch.long).unsqueeze(0))
        left -= t
    return out
