"""Exact RULER scoring: case-insensitive substring match of the gold strings in the prediction.

RULER post-processes a prediction by replacing control characters with newlines and stripping
it, then scores per sample:

- ``string_match_all``: fraction of gold strings found (used for every RULER task here);
- ``string_match_part``: 1 if any gold string is found, else 0 (RULER's QA metric).

Scores are fractions in [0, 1] (RULER multiplies the mean by 100).
"""

from __future__ import annotations

import re
from typing import Sequence

__all__ = ["postprocess", "string_match_all", "string_match_part"]

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess(pred: str) -> str:
    """RULER's prediction clean-up: control characters become newlines, outer whitespace removed."""
    if not isinstance(pred, str):
        raise ValueError(f"pred must be a str, got {type(pred).__name__}")
    return _CONTROL.sub("\n", pred.strip())


def _check(answers: Sequence[str]) -> list[str]:
    if isinstance(answers, str) or not isinstance(answers, Sequence) or len(answers) == 0:
        raise ValueError("answers must be a non-empty list of strings")
    if not all(isinstance(a, str) and a for a in answers):
        raise ValueError("answers must be non-empty strings")
    return list(answers)


def string_match_all(pred: str, answers: Sequence[str]) -> float:
    """Fraction of ``answers`` contained (case-insensitively) in ``pred``.

    Example: ``string_match_all("It is 123 and 456", ["123", "789"]) == 0.5``.
    """
    refs = _check(answers)
    p = postprocess(pred).lower()
    return sum(1.0 for r in refs if r.lower() in p) / len(refs)


def string_match_part(pred: str, answers: Sequence[str]) -> float:
    """1.0 if any of ``answers`` is contained (case-insensitively) in ``pred``, else 0.0."""
    refs = _check(answers)
    p = postprocess(pred).lower()
    return 1.0 if any(r.lower() in p for r in refs) else 0.0
