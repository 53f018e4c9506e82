"""Curated QA examples and the three protocols that turn one into a prompt and a target.

An example is a distractor sentence, an answer-bearing support sentence, a question, the
answer and the important words of the support sentence. The text is the paper's join,
``distractor + " <s> " + support + " <s> Question: " + question``, so every segment's character
span is known by construction; token positions come from the tokenizer's offset mapping.

Protocols (``prepare``):

- ``answer``: the corrected curated protocol of docs/method.md §8. Prompt ``text + "\\nAnswer:"``, target
  the first token of ``" " + answer``.
- ``predicted``: the same prompt; the target is the model's own greedy next token, so the
  explanation is of what the model does.
- ``chat``: the text as the user turn of the tokenizer's chat template with the generation
  prompt; the target is the assistant's first token: the first token of the answer as a reply
  starts, no leading space and its first letter upper case (``reply_start``). Only the tokens
  of the text are the attributed context; the template's tokens stay in the input and their
  share of the score is reported.

File formats (``load_examples``): JSONL or JSON (a list, or an object with ``examples``), one
object per example in the curated schema (``id``, ``distractor``, ``support``, ``question``,
``answer``, ``important_words``) or the paper's (``narrative_segment``,
``sciq_support_segment`` instead of the two segments). ``None`` loads the project's own set,
``heta_fast/data/curated_qa.jsonl``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

PROTOCOLS = ("answer", "predicted", "chat")
SEPARATOR = " <s> "
QUESTION = "Question: "
ANSWER_CUE = "\nAnswer:"
BUILTIN = "curated_qa.jsonl"

_SCHEMAS = {  # our field -> the field names it may have, curated schema first
    "distractor": ("distractor", "narrative_segment"),
    "support": ("support", "sciq_support_segment"),
    "question": ("question",),
    "answer": ("answer",),
    "important_words": ("important_words",),
}


@dataclass(frozen=True)
class Example:
    """One curated example; ``text`` is the joined input and ``spans`` its segments' ``[start, end)``."""

    id: str
    distractor: str
    support: str
    question: str
    answer: str
    important_words: tuple[str, ...]

    @property
    def text(self) -> str:
        return f"{self.distractor}{SEPARATOR}{self.support}{SEPARATOR}{QUESTION}{self.question}"

    def spans(self) -> dict[str, tuple[int, int]]:
        """Character spans of ``distractor``, ``support`` and ``question`` in ``text``."""
        d_end = len(self.distractor)
        s_start = d_end + len(SEPARATOR)
        s_end = s_start + len(self.support)
        q_start = s_end + len(SEPARATOR)
        return {"distractor": (0, d_end), "support": (s_start, s_end), "question": (q_start, len(self.text))}

    def important_spans(self) -> list[tuple[int, int]]:
        """Character spans in ``text`` of every whole-word, case-insensitive occurrence of an
        important word inside the support sentence."""
        start, end = self.spans()["support"]
        found = []
        for word in self.important_words:
            for match in re.finditer(rf"(?<!\w){re.escape(word)}(?!\w)", self.support, flags=re.IGNORECASE):
                found.append((start + match.start(), start + match.end()))
        return sorted(found)


@dataclass
class Prepared:
    """One example under one protocol, as token ids.

    ids: the prompt ``[n]`` (the target follows it); target: the token explained.
    context: positions of ``ids`` that are attributed (all of them except chat-template tokens).
    distractor, support, important: positions (subsets of ``context``) by character overlap.
    """

    example_id: str
    protocol: str
    ids: list[int]
    target: int
    context: list[int]
    distractor: list[int]
    support: list[int]
    important: list[int]
    tokens: list[str] = field(default_factory=list)


def _field(raw: dict, name: str, where: str):
    for key in _SCHEMAS[name]:
        if key in raw:
            return raw[key]
    raise ValueError(f"{where}: missing field {name!r} (or {' / '.join(_SCHEMAS[name][1:]) or 'no alias'})")


def parse_example(raw: dict, where: str) -> Example:
    """One JSON object in either schema -> ``Example`` (ValueError naming the missing/bad field)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    values = {name: _field(raw, name, where) for name in _SCHEMAS}
    for name in ("distractor", "support", "question", "answer"):
        if not isinstance(values[name], str) or not values[name].strip():
            raise ValueError(f"{where}: field {name!r} must be a non-empty string")
    words = values["important_words"]
    if not isinstance(words, list) or not all(isinstance(w, str) and w for w in words):
        raise ValueError(f"{where}: field 'important_words' must be a list of non-empty strings")
    example = Example(id=str(raw.get("id", where)), distractor=values["distractor"], support=values["support"],
                      question=values["question"], answer=values["answer"], important_words=tuple(words))
    if "input_text" in raw and raw["input_text"] != example.text:
        raise ValueError(f"{where}: input_text is not distractor + ' <s> ' + support + ' <s> Question: ' + question")
    return example


def load_examples(path: str | Path | None = None, limit: int | None = None) -> list[Example]:
    """Examples from a JSON/JSONL file (``None``: the project's curated set), the first ``limit`` of them."""
    if path is None:
        text = resources.files("heta_fast.data").joinpath(BUILTIN).read_text(encoding="utf-8")
        name = f"heta_fast/data/{BUILTIN}"
    else:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"evaluation data not found: {path}")
        text = path.read_text(encoding="utf-8")
        name = str(path)
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None  # JSONL: one object a line
    if isinstance(whole, list) or (isinstance(whole, dict) and "examples" in whole):
        raws = whole["examples"] if isinstance(whole, dict) else whole
        examples = [parse_example(raw, f"{name}: example {k}") for k, raw in enumerate(raws)]
    else:
        examples = []
        for k, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    raw = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{name}: line {k} is not JSON ({exc.msg})") from None
                examples.append(parse_example(raw, f"{name}: line {k}"))
    if not examples:
        raise ValueError(f"{name}: no examples")
    ids = [e.id for e in examples]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{name}: example ids are not unique")
    return examples[:limit] if limit is not None else examples


def positions(offsets: list[tuple[int, int]], spans: list[tuple[int, int]], shift: int = 0) -> list[int]:
    """Token positions whose character span ``[a, b)`` (non-empty) overlaps any of ``spans`` (shifted)."""
    return [i for i, (a, b) in enumerate(offsets)
            if b > a and any(a < e + shift and b > s + shift for s, e in spans)]


def first_token(tokenizer, text: str) -> int:
    """The first token id of ``text`` (no special tokens)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"{text!r} has no tokens")
    return ids[0]


def reply_start(answer: str) -> str:
    """The answer as the first word of an assistant's reply: first letter upper case.

    Why: an instruct model starts its turn with a capital. On SmolLM2-135M-Instruct (20 examples,
    chat template) "Leaves" is 40x as probable as "leaves" on the paper's set (median probability
    9.8e-3 against 2.3e-4, median rank 12 against 174) and 28x on the project's set.
    """
    return answer[:1].upper() + answer[1:]


def prepare(example: Example, protocol: str, tokenizer, lm=None) -> Prepared:
    """``example`` under ``protocol`` -> ``Prepared``; ``predicted`` needs ``lm`` (a ``CausalLM``)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    text = example.text
    if protocol == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the chat protocol needs a tokenizer with a chat template")
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                                 add_generation_prompt=True)
        shift = rendered.index(text)
        encoded = tokenizer(rendered, add_special_tokens=False, return_offsets_mapping=True)
        target = first_token(tokenizer, reply_start(example.answer))
    else:
        shift = 0
        encoded = tokenizer(text + ANSWER_CUE, return_offsets_mapping=True)
        target = first_token(tokenizer, " " + example.answer)
    ids = list(encoded["input_ids"])
    offsets = [tuple(o) for o in encoded["offset_mapping"]]
    spans = example.spans()
    if protocol == "chat":
        context = positions(offsets, [(0, len(text))], shift)
    else:
        context = list(range(len(ids)))
    if protocol == "predicted":
        if lm is None:
            raise ValueError("the predicted protocol needs the model")
        with torch.no_grad():
            hidden = lm.hidden(lm.embed(torch.tensor(ids))[None]).last_hidden_state[0, -1]
            target = int(lm.unembed(hidden).argmax())
    inside = set(context)
    def located(span_list):
        return [i for i in positions(offsets, span_list, shift) if i in inside]
    return Prepared(example_id=example.id, protocol=protocol, ids=ids, target=target, context=context,
                    distractor=located([spans["distractor"]]), support=located([spans["support"]]),
                    important=located(example.important_spans()),
                    tokens=[tokenizer.decode([i]) for i in ids])
