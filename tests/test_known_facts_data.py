"""The shipped known-facts set (``heta_fast/data/known_facts.jsonl``): schema and the rules it was written to.

Standard library and pytest only (no torch), so it runs anywhere. Every message names the offending id.
See ``heta_fast/data/KNOWN_FACTS.md`` for what the set is for.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[1] / "heta_fast" / "data" / "known_facts.jsonl"
KEYS = ["id", "relation", "prompt", "answer", "subject", "distractor", "distractor_subject"]
MIN_ROWS = 300
MIN_RELATIONS = 12
MIN_PER_RELATION = 15
PROMPT_WORDS = (4, 12)
MAX_SUBJECT_FIRST = 1 / 3  # the subject opens at most about a third of the prompts


def load_rows() -> list[dict]:
    lines = PATH.read_text(encoding="utf-8").splitlines()
    assert all(line.strip() for line in lines), f"{PATH.name}: blank line"
    return [json.loads(line) for line in lines]


ROWS = load_rows()


def has_word(word: str, text: str) -> bool:
    """``word`` occurs in ``text`` as a whole word, ignoring case."""
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE) is not None


def test_size_and_relations():
    assert len(ROWS) >= MIN_ROWS, f"only {len(ROWS)} rows"
    counts = Counter(row.get("relation") for row in ROWS)
    big = {relation: n for relation, n in counts.items() if n >= MIN_PER_RELATION}
    assert len(big) >= MIN_RELATIONS, f"relations with at least {MIN_PER_RELATION} rows: {big}"


def test_ids_unique_and_well_formed():
    ids = [row.get("id") for row in ROWS]
    bad = [i for i in ids if not (isinstance(i, str) and re.fullmatch(r"kf-\d{3}", i))]
    assert bad == [], f"malformed ids: {bad}"
    repeated = sorted(i for i, n in Counter(ids).items() if n > 1)
    assert repeated == [], f"repeated ids: {repeated}"


def test_subject_is_not_mostly_first():
    first = [row["id"] for row in ROWS if row["prompt"].startswith(row["subject"])]
    assert len(first) <= MAX_SUBJECT_FIRST * len(ROWS), f"{len(first)} of {len(ROWS)} prompts open with the subject"


@pytest.mark.parametrize("row", ROWS, ids=[str(row.get("id")) for row in ROWS])
def test_row(row):
    rid = row.get("id")
    assert list(row) == KEYS, f"{rid}: keys {list(row)}, expected {KEYS}"
    assert all(isinstance(row[key], str) and row[key] for key in KEYS), f"{rid}: every field is a non-empty string"
    prompt, answer, subject = row["prompt"], row["answer"], row["subject"]
    distractor, other = row["distractor"], row["distractor_subject"]

    assert prompt == prompt.rstrip(), f"{rid}: prompt has trailing whitespace: {prompt!r}"
    assert prompt == prompt.lstrip(), f"{rid}: prompt has leading whitespace: {prompt!r}"
    assert PROMPT_WORDS[0] <= len(prompt.split()) <= PROMPT_WORDS[1], f"{rid}: prompt length {prompt!r}"
    assert subject in prompt, f"{rid}: subject {subject!r} not in prompt {prompt!r}"

    assert re.fullmatch(r" \S+", answer), f"{rid}: answer must be one space then one word: {answer!r}"
    word = answer.strip()
    assert not has_word(word, prompt), f"{rid}: answer {word!r} occurs in prompt {prompt!r}"

    assert distractor.endswith("."), f"{rid}: distractor does not end with '.': {distractor!r}"
    assert other in distractor, f"{rid}: distractor_subject {other!r} not in distractor {distractor!r}"
    assert subject.lower() not in distractor.lower(), f"{rid}: subject {subject!r} in distractor {distractor!r}"
    assert not has_word(word, distractor), f"{rid}: answer {word!r} occurs in distractor {distractor!r}"
    assert other.lower() != subject.lower(), f"{rid}: distractor_subject is the subject"


def test_has_word_is_whole_word_and_case_insensitive():
    assert has_word("paris", "Paris is big")
    assert not has_word("he", "the capital")
    assert not has_word("real", "really")
