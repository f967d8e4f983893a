"""argparse ``type=`` validators of the ``kvcomp`` command line.

Each turns one argument string into its value or raises :class:`argparse.ArgumentTypeError`,
so a bad number or list fails while the arguments are parsed, before any model loads.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable


def _number(s: str, kind: type):
    try:
        v = kind(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an int' if kind is int else 'a number'}, got {s!r}") from None
    if kind is float and not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return v


def positive_int(s: str) -> int:
    v = _number(s, int)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def nonneg_int(s: str) -> int:
    v = _number(s, int)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def int_in(lo: int, hi: int) -> Callable[[str], int]:
    """An int in [lo, hi]."""

    def parse(s: str) -> int:
        v = _number(s, int)
        if not lo <= v <= hi:
            raise argparse.ArgumentTypeError(f"must be in [{lo}, {hi}], got {v}")
        return v

    parse.__name__ = "int_in"
    return parse


def nonneg_float(s: str) -> float:
    v = _number(s, float)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def positive_float(s: str) -> float:
    v = _number(s, float)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
    return v


def fraction(s: str) -> float:
    """A number in [0, 1]."""
    v = _number(s, float)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {v}")
    return v


def prune_ratio(s: str) -> float:
    """ThinK's pruned-channel fraction, in [0, 1)."""
    v = _number(s, float)
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {v}")
    return v


def topk(s: str) -> float:
    """A fraction of the context in (0, 1) or a whole token count >= 1."""
    v = _number(s, float)
    if not (0.0 < v < 1.0 or (v >= 1.0 and v.is_integer())):
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1) or a whole token count, got {s!r}")
    return v


def _items(s: str) -> list[str]:
    items = [x.strip() for x in s.split(",") if x.strip()]
    if not items:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {s!r}")
    return items


def positive_int_list(s: str) -> list[int]:
    """``"2048,4096"`` -> ``[2048, 4096]``."""
    try:
        return [positive_int(x) for x in _items(s)]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints >= 1, got {s!r}") from None


def names(allowed) -> Callable[[str], list[str]]:
    """A comma-separated list whose items are drawn from ``allowed``."""
    allowed = tuple(allowed)

    def parse(s: str) -> list[str]:
        items = _items(s)
        bad = [x for x in items if x not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {', '.join(map(repr, bad))}: choose from {', '.join(allowed)}")
        return items

    parse.__name__ = "names"
    return parse


def method(s: str) -> str:
    """One method name: ``full``, ``all`` or a ``+``-joined subset of duo, think, vq."""
    from .methods import parse_method

    try:
        parse_method(s)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return s.strip()


def method_list(s: str) -> list[str]:
    """Comma-separated method names."""
    return [method(x) for x in _items(s)]
