"""The shipped curated set (``heta_fast/data/curated_qa.jsonl``): schema, answerability, independence.

Each check collects every offending row, so a failure lists all of them at once, by id.
"""

from __future__ import annotations

import json
import os
import re
from importlib.resources import files
from pathlib import Path

import pytest

KEYS = ["id", "distractor", "support", "question", "answer", "important_words"]
MIN_ROWS = 120
SUPPORT_WORDS = (10, 25)  # the range the set was written to (data/README.md)
IMPORTANT_WORDS = (4, 8)
PAPER_DEFAULT = "/work/shared/data/curated_qa_100.json"


def load_rows() -> list[dict]:
    text = files("heta_fast").joinpath("data/curated_qa.jsonl").read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


ROWS = load_rows()


def has_word(word: str, text: str) -> bool:
    """``word`` occurs in ``text`` as a whole word, ignoring case."""
    return re.search(rf"\b{re.escape(word)}\b", text, re.IGNORECASE) is not None


def normalise(sentence: str) -> str:
    """Lower case, letters and digits only, single spaces: the same sentence however punctuated."""
    return " ".join(re.findall(r"[a-z0-9]+", sentence.lower()))


def test_has_enough_rows_with_unique_ids_in_order():
    assert len(ROWS) >= MIN_ROWS
    ids = [row["id"] for row in ROWS]
    assert ids == [f"hf_qa_{k:03d}" for k in range(len(ROWS))]


def test_schema_keys_in_order_and_types():
    bad = []
    for row in ROWS:
        if list(row) != KEYS:
            bad.append((row.get("id"), "keys", list(row)))
            continue
        texts = [row[k] for k in KEYS[:5]]
        words = row["important_words"]
        if not all(isinstance(t, str) and t == t.strip() and t for t in texts):
            bad.append((row["id"], "text fields must be non-empty stripped strings"))
        if not (isinstance(words, list) and all(isinstance(w, str) for w in words)):
            bad.append((row["id"], "important_words must be a list of strings"))
    assert bad == []


def test_each_support_and_question_is_used_once():
    for key in ("support", "question"):
        seen = [normalise(row[key]) for row in ROWS]
        assert len(set(seen)) == len(seen), key


def test_answer_is_one_word_and_occurs_in_the_support():
    bad = []
    for row in ROWS:
        answer = row["answer"]
        if not re.fullmatch(r"\w+", answer):
            bad.append((row["id"], "not one word", answer))
        elif not has_word(answer, row["support"]):
            bad.append((row["id"], "not in support", answer))
        elif answer != answer.lower() and not re.search(rf"\b{re.escape(answer)}\b", row["support"]):
            bad.append((row["id"], "capitalised answer not written so in support", answer))
    assert bad == []


def test_answer_is_neither_in_the_question_nor_in_the_distractor():
    bad = [(row["id"], key, row["answer"]) for row in ROWS for key in ("question", "distractor")
           if has_word(row["answer"], row[key])]
    assert bad == []


def test_support_length():
    bad = [(row["id"], n) for row in ROWS
           if not SUPPORT_WORDS[0] <= (n := len(row["support"].split())) <= SUPPORT_WORDS[1]]
    assert bad == []


def test_important_words_carry_the_answer_and_occur_in_the_support():
    bad = []
    for row in ROWS:
        words = row["important_words"]
        if not IMPORTANT_WORDS[0] <= len(words) <= IMPORTANT_WORDS[1]:
            bad.append((row["id"], "count", len(words)))
        if not words or words[0] != row["answer"]:
            bad.append((row["id"], "the answer is not the first important word"))
        if len({w.lower() for w in words}) != len(words):
            bad.append((row["id"], "repeated important word"))
        bad.extend((row["id"], "not a whole word of the support", w) for w in words
                   if not has_word(w, row["support"]))
    assert bad == []


def test_has_word_is_whole_word_and_case_insensitive():
    assert has_word("ice", "Ice is the solid form of water.")
    assert not has_word("ice", "The ship hit an iceberg.")
    assert has_word("Earth", "the Earth's crust")
    assert not has_word("ball", "Basketball players")


def paper_examples() -> list[dict]:
    path = Path(os.environ.get("HETA_PAPER_CURATED", PAPER_DEFAULT))
    if not path.is_file():
        pytest.skip(f"the paper's curated set is not at {path} (set HETA_PAPER_CURATED to its path)")
    data = json.loads(path.read_text(encoding="utf-8"))
    return data["examples"] if isinstance(data, dict) else data


@pytest.mark.parametrize("ours, theirs", [("support", "sciq_support_segment"), ("distractor", "narrative_segment"),
                                          ("question", "question")])
def test_no_sentence_of_the_papers_set_is_reused(ours, theirs):
    examples = paper_examples()
    paper = {normalise(example[theirs]) for example in examples}
    assert len(paper) > 1  # the field exists and was read
    reused = [row["id"] for row in ROWS if normalise(row[ours]) in paper]
    assert reused == []
