"""Haystack sources for the offline RULER-style harness.

Two sources, both offline and both exposed as *sentence lists* so needles are always inserted at
sentence boundaries:

- ``"noise"``: RULER's filler, "The grass is green. The sky is blue. The sun is yellow. Here we go.
  There and back again." repeated (five sentences, cycled).
- ``"prose"``: real English from the standard library module ``pydoc_data.topics`` (the Python
  language reference topics shipped with CPython, ~460K characters). Topics are concatenated in
  sorted key order, code blocks / grammar productions / headings are dropped, and the remaining
  paragraphs are split into sentences. The text depends on the Python version (3.11 and 3.12
  ship slightly different topics), so results record the Python version through the machine line.

A haystack of ``n`` sentences is the first ``n`` sentences of the source after a start offset,
cycling when ``n`` exceeds the source length.
"""

from __future__ import annotations

import functools
import re

__all__ = [
    "FILLER",
    "HAYSTACKS",
    "build_context",
    "corpus_text",
    "haystack_sentences",
    "prose_sentences",
    "split_sentences",
    "take_sentences",
]

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
HAYSTACKS = ("noise", "prose")

_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "cf.", "Mr.", "Dr.", "No.", "approx.")
_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"“(])")
_UNDERLINE = re.compile(r"^\s*([*=\-~^#+])\1{2,}\s*$")
_BULLET = re.compile(r"^\s*(?:[*\-+]|\d+\.|\(\d+\))\s+")
_SENT_END = re.compile(r"[.!?][\"”')\]]*$")
_PLAIN_WORD = re.compile(r"^[\"“(*]*[A-Za-z][A-Za-z'’\-]*[\"”)*]*[.,;:!?]?[\"”)]*$")


def split_sentences(text: str) -> list[str]:
    """Split one paragraph of English into sentences (whitespace collapsed).

    A split happens after ``.``, ``!`` or ``?`` followed by whitespace and an upper-case letter,
    digit, quote or parenthesis; a piece ending in a common abbreviation ("e.g.", "i.e.", ...)
    is merged with the next one.

    Example: ``split_sentences("A b. C d.") == ["A b.", "C d."]``.
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    flat = " ".join(text.split())
    if not flat:
        return []
    pieces = _SENT_SPLIT.split(flat)
    out: list[str] = []
    for piece in pieces:
        if out and out[-1].endswith(_ABBREVIATIONS):
            out[-1] = out[-1] + " " + piece
        else:
            out.append(piece)
    return out


def _clean_paragraph(par: str) -> str | None:
    """Return the prose of one paragraph, or None when it is a heading, code, grammar or table.

    Indented paragraphs are kept when they read as prose (method descriptions are indented in
    the topics text); code is recognised by prompts, grammar rules, missing end punctuation and a
    low share of plain words.
    """
    lines = [line for line in par.split("\n") if line.strip()]
    if not lines or any(_UNDERLINE.match(line) for line in lines):
        return None  # headings (underlined) and table rules
    first = lines[0]
    bullet = _BULLET.match(first)
    if bullet:
        first = first[bullet.end():]
    body = " ".join([first.strip()] + [line.strip() for line in lines[1:]])
    if any(tok in body for tok in (">>>", "::=", "|", "...")) or not _SENT_END.search(body):
        return None
    words = body.split()
    plain = sum(1 for w in words if _PLAIN_WORD.match(w))
    if len(words) < 4 or plain < 0.75 * len(words):
        return None
    return body


@functools.lru_cache(maxsize=1)
def prose_sentences() -> tuple[str, ...]:
    """Sentences of the cleaned ``pydoc_data.topics`` text, deterministic for a Python version.

    Topics are visited in sorted key order; only sentences of at least four words that end with
    terminal punctuation are kept. Returns a tuple of ~3-4K sentences (~100K tokens).
    """
    from pydoc_data.topics import topics

    out: list[str] = []
    for key in sorted(topics):
        for par in re.split(r"\n[ \t]*\n", topics[key]):
            body = _clean_paragraph(par.strip("\n"))
            if body is None:
                continue
            for sent in split_sentences(body):
                if len(sent.split()) >= 4 and _SENT_END.search(sent):
                    out.append(sent)
    if not out:
        raise RuntimeError("pydoc_data.topics produced no prose sentences")
    return tuple(out)


@functools.lru_cache(maxsize=None)
def haystack_sentences(name: str) -> tuple[str, ...]:
    """One period of the haystack ``name`` (``"noise"`` or ``"prose"``) as a tuple of sentences."""
    if name == "noise":
        return tuple(split_sentences(FILLER))
    if name == "prose":
        return prose_sentences()
    raise ValueError(f"haystack must be one of {HAYSTACKS}, got {name!r}")


@functools.lru_cache(maxsize=None)
def corpus_text(name: str) -> str:
    """The full text of one period of haystack ``name`` (used to reject needle values that occur in it)."""
    return " ".join(haystack_sentences(name))


def take_sentences(name: str, n: int, offset: int = 0) -> list[str]:
    """The ``n`` sentences of haystack ``name`` starting at sentence ``offset``, cycling as needed."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    src = haystack_sentences(name)
    if not isinstance(offset, int) or not 0 <= offset < len(src):
        raise ValueError(f"offset must be in [0, {len(src)}), got {offset!r}")
    out: list[str] = []
    pos = offset
    while len(out) < n:
        chunk = src[pos: pos + (n - len(out))]
        out.extend(chunk)
        pos = 0
    return out


def build_context(sentences: list[str], needles: list[tuple[float, str]], sep: str = " ") -> str:
    """Join ``sentences`` with ``sep``, inserting each needle at a sentence boundary.

    ``needles`` is a list of ``(depth_percent, text)``; a needle at depth ``d`` (0..100) goes before
    sentence ``int(len(sentences) * d / 100)`` (100 -> after the last sentence). Needles that land
    on the same boundary keep their order in ``needles``.
    """
    n = len(sentences)
    slots: dict[int, list[str]] = {}
    for depth, text in needles:
        if not 0.0 <= float(depth) <= 100.0:
            raise ValueError(f"needle depth must be in [0, 100], got {depth!r}")
        idx = min(n, int(n * float(depth) / 100.0))
        slots.setdefault(idx, []).append(text)
    parts: list[str] = []
    for i in range(n + 1):
        parts.extend(slots.get(i, ()))
        if i < n:
            parts.append(sentences[i])
    return sep.join(parts)
