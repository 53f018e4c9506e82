"""Words and sentences of a text, and which tokens make each one (from the tokenizer's offsets).

A token covers the characters ``text[a:b]`` of its offset ``(a, b)``. Units (words or
sentences) are character spans of the text; a token belongs to the unit that holds its
non-whitespace characters. A token whose characters fall in two units (``"Paris."`` as one
token over the word ``Paris`` and the punctuation ``.``) joins them into one unit, because its
score cannot be split. A token of whitespace only (``"\\n"``, a run of spaces) joins the unit
after it (the last one at the end of the text). Skipped tokens (special tokens) belong to no
unit, and their characters do not start or join units.

Every token not skipped lands in exactly one unit, so summing over units keeps the total.
"""

from __future__ import annotations

import bisect
import re

UNITS = ("words", "sentences")

# A word: letters/digits/underscore with inner apostrophes ("It's", "don't"), or a run of
# punctuation and symbols. Together the two cover every non-whitespace character.
_WORD = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]+")
# A sentence ends after terminal punctuation (with closing quotes or brackets) before whitespace
# or the end, and at every line break.
_SENTENCE_END = re.compile(r"[.!?…]+[\"'”’)\]]*(?=\s|$)")


def word_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` character spans of the words and punctuation runs of ``text``, in order."""
    return [m.span() for m in _WORD.finditer(text)]


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` spans of the sentences of ``text`` (outer whitespace trimmed), in order."""
    cuts = {m.end() for m in _SENTENCE_END.finditer(text)} | {i for i, ch in enumerate(text) if ch == "\n"}
    spans, start = [], 0
    for end in sorted(cuts) + [len(text)]:
        piece = text[start:end]
        if piece.strip():
            lead = len(piece) - len(piece.lstrip())
            spans.append((start + lead, start + len(piece.rstrip())))
        start = end
    return spans


def unit_spans(text: str, unit: str) -> list[tuple[int, int]]:
    """The spans of ``unit`` (``words`` or ``sentences``) in ``text``."""
    if unit == "words":
        return word_spans(text)
    if unit == "sentences":
        return sentence_spans(text)
    raise ValueError(f"unknown unit {unit!r}; expected one of {', '.join(UNITS)}")


def group_tokens(text: str, offsets: list[tuple[int, int]], unit: str,
                 skip: set[int] | frozenset[int] = frozenset()) -> tuple[list[tuple[int, int]], list[list[int]]]:
    """Token positions grouped into the words or sentences of ``text``.

    offsets: ``[n]`` character spans ``(a, b)`` of the tokens; skip: positions that belong to no
    unit (their characters are blanked before the text is segmented). Returns ``(spans,
    members)``: per unit, its character span and the token positions in it (ascending).
    Units without tokens (text the tokens do not reach) are left out.
    """
    if len(offsets) and max(b for _, b in offsets) > len(text):
        raise ValueError(f"token offsets reach character {max(b for _, b in offsets)}, past the text's "
                         f"{len(text)} characters: the offsets are not of this text")
    chars = list(text)
    for i in skip:
        a, b = offsets[i]
        chars[a:b] = " " * (b - a)
    blanked = "".join(chars)
    spans = unit_spans(blanked, unit)
    starts = [s for s, _ in spans]
    units: list[list] = []  # [first span, last span, members]
    pending: list[int] = []  # whitespace-only tokens waiting for the next unit
    for i, (a, b) in enumerate(offsets):
        if i in skip:
            continue
        piece = blanked[a:b]
        lo = a + len(piece) - len(piece.lstrip())
        hi = a + len(piece.rstrip())
        if lo >= hi:
            pending.append(i)
            continue
        first = max(0, bisect.bisect_right(starts, lo) - 1)
        last = bisect.bisect_left(starts, hi) - 1
        if units and first <= units[-1][1]:
            units[-1][1] = max(units[-1][1], last)
            units[-1][2].extend(pending + [i])
        else:
            units.append([first, last, pending + [i]])
        pending = []
    if pending:
        if units:
            units[-1][2].extend(pending)
        else:  # nothing but whitespace: one unit over those tokens' characters
            units.append([None, None, pending])
    out_spans, members = [], []
    for first, last, tokens in units:
        if first is None:
            out_spans.append((min(offsets[i][0] for i in tokens), max(offsets[i][1] for i in tokens)))
        else:
            out_spans.append((spans[first][0], spans[last][1]))
        members.append(sorted(tokens))
    return out_spans, members
