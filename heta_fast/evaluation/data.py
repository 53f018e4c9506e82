"""Curated QA examples, known facts, and the protocols that turn one into a prompt and a target.

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

Known facts (``Fact``, ``load_facts``; heta_fast/data/KNOWN_FACTS.md): a completion prompt, its
answer's first word, the subject named in the prompt, and a distractor sentence naming another
subject of the same kind. Protocols:

- ``facts``: the input is the prompt as plain text (no chat template, no cue; the tokenizer's
  own special tokens, a BOS say, as it adds them, like ``answer``); the target is the
  model's own greedy next token. The row is kept only if that token, decoded, is a non-empty
  prefix of the answer with its leading space (``answers``): a fact the model does not know has
  nothing to locate.
- ``facts_distractor``: the same with ``distractor + " " + prompt`` as the input; kept only if
  the model answers right both with the distractor and without it (under ``facts``): the fact
  is known, and the distractor did not change the answer.

The subject's (and the distractor subject's) token positions come from the offset mapping, like
the curated segments'. ``load(protocol, path)`` reads the kind of row a protocol takes.

File formats (``load_examples``): JSONL or JSON (a list, or an object with ``examples``), one
object per example in the curated schema (``id``, ``distractor``, ``support``, ``question``,
``answer``, ``important_words``) or the paper's (``narrative_segment``,
``sciq_support_segment`` instead of the two segments). ``None`` loads the project's own set,
``heta_fast/data/curated_qa.jsonl``. ``load_facts`` reads the same JSON/JSONL kinds in the
known-facts schema (``None``: ``heta_fast/data/known_facts.jsonl``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

CURATED_PROTOCOLS = ("answer", "predicted", "chat")
FACT_PROTOCOLS = ("facts", "facts_distractor")
PROTOCOLS = (*CURATED_PROTOCOLS, *FACT_PROTOCOLS)
SEPARATOR = " <s> "
QUESTION = "Question: "
ANSWER_CUE = "\nAnswer:"
BUILTIN = "curated_qa.jsonl"
BUILTIN_FACTS = "known_facts.jsonl"
FACT_FIELDS = ("id", "relation", "prompt", "answer", "subject", "distractor", "distractor_subject")

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


@dataclass(frozen=True)
class Fact:
    """One known fact (heta_fast/data/KNOWN_FACTS.md); ``subject`` occurs in ``prompt`` and
    ``distractor_subject`` in ``distractor``, verbatim; ``answer`` has its leading space."""

    id: str
    relation: str
    prompt: str
    answer: str
    subject: str
    distractor: str
    distractor_subject: str

    def text(self, protocol: str) -> str:
        """The input under ``facts`` (the prompt) or ``facts_distractor`` (``distractor + " " + prompt``)."""
        return f"{self.distractor} {self.prompt}" if protocol == "facts_distractor" else self.prompt

    def spans(self, protocol: str) -> dict[str, tuple[int, int]]:
        """``[start, end)`` in ``text(protocol)`` of ``subject`` (its first occurrence in the prompt)
        and, under ``facts_distractor``, of ``distractor_subject`` (its first in the distractor)."""
        shift = len(self.distractor) + 1 if protocol == "facts_distractor" else 0
        start = shift + self.prompt.index(self.subject)
        out = {"subject": (start, start + len(self.subject))}
        if protocol == "facts_distractor":
            other = self.distractor.index(self.distractor_subject)
            out["distractor_subject"] = (other, other + len(self.distractor_subject))
        return out


@dataclass
class Prepared:
    """One example (or fact) under one protocol, as token ids.

    ids: the prompt ``[n]`` (the target follows it); target: the token explained.
    context: positions of ``ids`` that are attributed (all of them except chat-template tokens).
    distractor, support, important: positions (subsets of ``context``) by character overlap;
    ``None`` for a fact. subject (and, under ``facts_distractor``, distractor_subject): the same
    for a fact's subjects; ``None`` for a curated example.
    kept: False for a fact the model answers wrong (``answers``; under ``facts_distractor``, with
    or without the distractor); the runner skips it. plain_target: under ``facts_distractor``,
    the greedy token after the prompt alone (the ``facts`` target).
    """

    example_id: str
    protocol: str
    ids: list[int]
    target: int
    context: list[int]
    distractor: list[int] | None
    support: list[int] | None
    important: list[int] | None
    tokens: list[str] = field(default_factory=list)
    subject: list[int] | None = None
    distractor_subject: list[int] | None = None
    kept: bool = True
    plain_target: int | None = None


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


def _read_objects(path: str | Path | None, builtin: str) -> tuple[str, list[tuple[str, object]]]:
    """The JSON objects of a JSON/JSONL file (``None``: ``heta_fast/data/<builtin>``): its name and,
    per object, ``(where, object)`` with ``where`` naming the file and the line or index."""
    if path is None:
        text = resources.files("heta_fast.data").joinpath(builtin).read_text(encoding="utf-8")
        name = f"heta_fast/data/{builtin}"
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
        return name, [(f"{name}: example {k}", raw) for k, raw in enumerate(raws)]
    objects = []
    for k, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                objects.append((f"{name}: line {k}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{name}: line {k} is not JSON ({exc.msg})") from None
    return name, objects


def _checked(name: str, rows: list, limit: int | None) -> list:
    """``rows`` (examples or facts) with ids checked unique, the first ``limit`` of them."""
    if not rows:
        raise ValueError(f"{name}: no examples")
    ids = [r.id for r in rows]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{name}: example ids are not unique")
    return rows[:limit] if limit is not None else rows


def load_examples(path: str | Path | None = None, limit: int | None = None) -> list[Example]:
    """Examples from a JSON/JSONL file (``None``: the project's curated set), the first ``limit`` of them."""
    name, objects = _read_objects(path, BUILTIN)
    return _checked(name, [parse_example(raw, where) for where, raw in objects], limit)


def parse_fact(raw: dict, where: str) -> Fact:
    """One JSON object in the known-facts schema -> ``Fact`` (ValueError naming the missing/bad field)."""
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(raw).__name__}")
    for key in FACT_FIELDS:
        if key not in raw:
            raise ValueError(f"{where}: missing field {key!r}")
        if not isinstance(raw[key], str) or not raw[key].strip():
            raise ValueError(f"{where}: field {key!r} must be a non-empty string")
    fact = Fact(**{key: raw[key] for key in FACT_FIELDS})
    if fact.subject not in fact.prompt:
        raise ValueError(f"{where}: subject {fact.subject!r} is not in the prompt {fact.prompt!r}")
    if fact.distractor_subject not in fact.distractor:
        raise ValueError(f"{where}: distractor_subject {fact.distractor_subject!r} is not in the distractor "
                         f"{fact.distractor!r}")
    return fact


def load_facts(path: str | Path | None = None, limit: int | None = None) -> list[Fact]:
    """Facts from a JSON/JSONL file (``None``: heta_fast/data/known_facts.jsonl), the first ``limit``
    of them (before the model's filter: ``limit`` rows are read, fewer may be kept)."""
    name, objects = _read_objects(path, BUILTIN_FACTS)
    return _checked(name, [parse_fact(raw, where) for where, raw in objects], limit)


def load(protocol: str, path: str | Path | None = None, limit: int | None = None) -> list[Example] | list[Fact]:
    """The rows ``protocol`` takes: facts for the fact protocols, curated examples otherwise."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    return (load_facts if protocol in FACT_PROTOCOLS else load_examples)(path, limit)


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


def greedy_token(lm, ids: list[int]) -> int:
    """The model's greedy next token after ``ids`` (``lm`` a ``CausalLM``)."""
    with torch.no_grad():
        hidden = lm.hidden(lm.embed(torch.tensor(ids))[None]).last_hidden_state[0, -1]
        return int(lm.unembed(hidden).argmax())


def piece(tokenizer, token: int) -> str:
    """``token`` decoded on its own, as the fact filter compares it (no clean-up of spaces)."""
    return tokenizer.decode([token], clean_up_tokenization_spaces=False)


def answers(said: str, answer: str) -> bool:
    """Whether a decoded token ``said`` (``piece``) answers a fact: a non-empty prefix of ``answer``,
    both compared as they are (leading space included, nothing stripped): " Par" and " Paris"
    answer " Paris"; "Paris", " Parisian" and "" do not."""
    return bool(said) and answer.startswith(said)


def _tokens(tokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.decode([i]) for i in ids]


def prepare(example: Example | Fact, protocol: str, tokenizer, lm=None) -> Prepared:
    """``example`` under ``protocol`` -> ``Prepared``; ``predicted`` and the fact protocols need
    ``lm`` (a ``CausalLM``). A fact protocol takes a ``Fact``, the others an ``Example``."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {', '.join(PROTOCOLS)}")
    wanted = Fact if protocol in FACT_PROTOCOLS else Example
    if not isinstance(example, wanted):
        raise TypeError(f"the {protocol} protocol takes a {wanted.__name__}, got {type(example).__name__}")
    if protocol in ("predicted", *FACT_PROTOCOLS) and lm is None:
        raise ValueError(f"the {protocol} protocol needs the model")
    if protocol in FACT_PROTOCOLS:
        return _prepare_fact(example, protocol, tokenizer, lm)
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
        target = greedy_token(lm, ids)
    inside = set(context)
    def located(span_list):
        return [i for i in positions(offsets, span_list, shift) if i in inside]
    return Prepared(example_id=example.id, protocol=protocol, ids=ids, target=target, context=context,
                    distractor=located([spans["distractor"]]), support=located([spans["support"]]),
                    important=located(example.important_spans()), tokens=_tokens(tokenizer, ids))


def _prepare_fact(fact: Fact, protocol: str, tokenizer, lm) -> Prepared:
    """A fact under ``facts``/``facts_distractor``: plain text, every token attributed, the greedy
    target; under ``facts_distractor`` kept only if it is also kept under ``facts``."""
    encoded = tokenizer(fact.text(protocol), return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    offsets = [tuple(o) for o in encoded["offset_mapping"]]
    spans = fact.spans(protocol)
    target = greedy_token(lm, ids)
    kept = answers(piece(tokenizer, target), fact.answer)
    plain = _prepare_fact(fact, "facts", tokenizer, lm) if protocol == "facts_distractor" else None
    other = spans.get("distractor_subject")
    return Prepared(example_id=fact.id, protocol=protocol, ids=ids, target=target, context=list(range(len(ids))),
                    distractor=None, support=None, important=None, tokens=_tokens(tokenizer, ids),
                    subject=positions(offsets, [spans["subject"]]),
                    distractor_subject=positions(offsets, [other]) if other else None,
                    kept=kept and (plain is None or plain.kept), plain_target=plain.target if plain else None)
