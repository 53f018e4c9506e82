"""The one-process engine: one ``HETA`` for the whole job, rows grouped by length, each row
written whole as soon as it is done.

``RowRunner`` turns one input row into one output record (a result or an error); the Ray
engine's actors run the same class, so both engines write the same records. A ``text`` row is
``HETA.attribute(text, target_pos, target_token)``; a ``prompt`` + ``answer`` or ``messages``
row is ``HETA.attribute_targets(ids, targets, prompt_length=...)`` over the answer's tokens (one
forward, one semantic-flow descent and one set of masked forwards for all of them).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from heta_fast._version import __version__
from heta_fast.api import HETA
from heta_fast.config import HETAConfig
from heta_fast.jobs import io

# Test hook: "ID:PATH" makes the process running row ID exit at once (os._exit) the first time,
# creating PATH so that the rerun on a restarted worker goes through. Used by the Ray
# actor-restart test; unset in normal use.
CRASH_ONCE_ENV = "HETA_FAST_JOBS_CRASH_ONCE"

ModelFactory = Callable[[], Any]


@dataclass
class JobReport:
    """What a job did: rows ``done`` now, ``skipped`` (already in the output), ``failed`` (error
    records written now), and the wall time in seconds."""

    done: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    out: str = ""
    engine: str = "local"
    failures: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (f"done {self.done}, skipped {self.skipped}, failed {self.failed} "
                f"({self.seconds:.1f} s, {self.engine} engine) -> {self.out}")


def build_heta(model: str | None, model_factory: ModelFactory | None, device: str | None = None) -> HETA:
    """The worker's ``HETA``: from ``model_factory()`` (a ``HETA`` or a ``(model, tokenizer)`` pair)
    or from ``HETA.from_pretrained(model)`` (``None``: the embedded SmolLM2)."""
    if model_factory is None:
        return HETA.from_pretrained(model, device=device)
    made = model_factory()
    if isinstance(made, HETA):
        return made
    if isinstance(made, tuple) and len(made) == 2:
        return HETA(made[0], made[1])
    raise TypeError(f"model_factory must return a HETA or a (model, tokenizer) pair, got {type(made).__name__}")


@dataclass
class PreparedRow:
    """A row checked and tokenised: ``run()`` computes its result. ``length``: tokens (for grouping)."""

    key: str
    length: int
    run: Callable[[], Any]


class RowRunner:
    """Input rows -> output records with one ``HETA`` and one ``HETAConfig`` (see the module
    docstring for the row kinds)."""

    def __init__(self, heta: HETA, config: HETAConfig, columns: io.Columns):
        heta.sink_token(config)  # a sink the model cannot have fails the job here, not on every row
        self.heta = heta
        self.config = config
        self.columns = columns
        self.version = __version__

    def prepare(self, row: Mapping) -> PreparedRow:
        """Check the row's columns and tokenise it; ValueError/TypeError name what is wrong."""
        c = self.columns
        key = io.row_id(row, c)
        given = {name: _value(row, getattr(c, name)) for name in ("text", "prompt", "answer", "messages")}
        kinds = [name for name in ("text", "prompt", "messages") if given[name] is not None]
        if len(kinds) != 1:
            found = ", ".join(repr(getattr(c, k)) for k in kinds) or "none"
            raise ValueError(f"a row needs exactly one of {c.text!r}, {c.prompt!r} (with {c.answer!r}) or "
                             f"{c.messages!r}; found {found}")
        if kinds[0] == "text":
            text = _string(given["text"], c.text)
            target_pos = _int_or_none(_value(row, c.target_pos), c.target_pos)
            target_token = _value(row, c.target_token)
            if target_token is not None and not isinstance(target_token, (str, int)):
                raise TypeError(f"{c.target_token!r} must be a token string or an int id, "
                                f"got {type(target_token).__name__}")
            length = len(self.heta.tokenize(text))  # the text itself goes in: results keep it and its offsets
            return PreparedRow(key, length, lambda: self.heta.attribute(text, target_pos=target_pos,
                                                                          target_token=target_token,
                                                                          config=self.config))
        if kinds[0] == "prompt":
            if given["answer"] is None:
                raise ValueError(f"a {c.prompt!r} row needs an {c.answer!r} (the tokens to explain)")
            prompt = self.heta.tokenize(_string(given["prompt"], c.prompt))
            answer = self._answer_ids(_string(given["answer"], c.answer))
        else:
            prompt, answer = self._chat(given["messages"])
        ids = prompt + answer
        targets = list(range(len(prompt), len(ids)))
        return PreparedRow(key, len(ids), lambda: self.heta.attribute_targets(ids, targets,
                                                                              prompt_length=len(prompt),
                                                                              config=self.config))

    def run(self, prepared: PreparedRow) -> dict:
        """The result record of a prepared row (exceptions propagate; ``record`` catches them)."""
        _crash_hook(prepared.key)
        start = time.perf_counter()
        result = prepared.run()
        return io.result_record(prepared.key, result, self.version, time.perf_counter() - start)

    def record(self, row: Mapping) -> dict:
        """One row start to finish: its result record, or an error record when anything fails."""
        try:
            return self.run(self.prepare(row))
        except Exception as exc:  # noqa: BLE001 - a failed row becomes its error record; the job goes on
            return io.error_record(_safe_key(row, self.columns), exc)

    def _answer_ids(self, answer: str) -> list[int]:
        tokenizer = self.heta.tokenizer
        if tokenizer is None:
            raise ValueError("prompt/answer rows need a tokenizer")
        if not answer.strip():
            raise ValueError("empty answer: nothing to explain")
        ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
        if not ids:
            raise ValueError("the answer has no tokens")
        return ids

    def _chat(self, messages: Any) -> tuple[list[int], list[int]]:
        """(prompt ids, reply ids): the chat before the last message through the chat template with
        the generation prompt, and the last message (the assistant's reply) tokenised alone."""
        c = self.columns
        if isinstance(messages, str):  # CSV cells hold the list as JSON text
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{c.messages!r} is not valid JSON ({exc.msg})") from None
        if not isinstance(messages, list) or len(messages) < 2:
            raise ValueError(f"{c.messages!r} must be a list of at least two {{'role', 'content'}} messages, "
                             "the last one the assistant's reply")
        for n, message in enumerate(messages):
            if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) \
                    or not isinstance(message.get("content"), str):
                raise ValueError(f"message {n} must be a {{'role': str, 'content': str}} object")
        if messages[-1]["role"] != "assistant":
            raise ValueError(f"the last message must be the assistant's reply (the tokens explained), "
                             f"got role {messages[-1]['role']!r}")
        tokenizer = self.heta.tokenizer
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("messages rows need a tokenizer with a chat template")
        history = [{"role": m["role"], "content": m["content"]} for m in messages[:-1]]
        prompt = tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=True)
        if isinstance(prompt, Mapping):  # transformers 5 returns a BatchEncoding
            prompt = prompt["input_ids"]
        return self.heta.tokenize(list(prompt)), self._answer_ids(messages[-1]["content"])


def _value(row: Mapping, name: str) -> Any:
    """A column's value, None when absent or null (CSV's empty cells, Arrow's nulls, NaN)."""
    value = row.get(name)
    if isinstance(value, float) and value != value:
        return None
    return value


def _string(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name!r} must be a string, got {type(value).__name__}")
    return value


def _int_or_none(value: Any, name: str) -> int | None:
    """An int column that may arrive as text (CSV) or as an integral float (a column with nulls)."""
    if value is None:
        return None
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name!r} must be an int, got {value!r}")
    return value


def _safe_key(row: Mapping, columns: io.Columns) -> str | None:
    try:
        return io.row_id(row, columns)
    except ValueError:
        return None


def _crash_hook(key: str) -> None:
    spec = os.environ.get(CRASH_ONCE_ENV)
    if not spec:
        return
    target, _, marker = spec.partition(":")
    if key == target and marker and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        os._exit(1)


def progress_bar(total: int, quiet: bool, unit: str = "row"):
    """A tqdm bar on stderr (rows/s and ETA), or None when quiet."""
    if quiet:
        return None
    try:
        from tqdm.auto import tqdm
    except ModuleNotFoundError:
        raise ModuleNotFoundError("the progress bar needs tqdm: pip install 'heta_fast[jobs]' "
                                  "(or pass quiet=True / --quiet)") from None
    return tqdm(total=total, unit=unit, file=sys.stderr, dynamic_ncols=True, smoothing=0.1)


def run_local(rows: list[dict], writer: io.RecordWriter, heta: HETA, config: HETAConfig, columns: io.Columns,
              report: JobReport, quiet: bool) -> None:
    """Every row whose id is not yet in the output: prepared (tokenised), sorted by length, run,
    written. Rows whose preparation fails are written as errors first. The input rows and their
    token ids are held in memory (text only); results go to disk as they are made."""
    runner = RowRunner(heta, config, columns)
    pending = [row for row in rows if io.row_id(row, columns) not in writer.done]
    report.skipped = len(rows) - len(pending)
    bar = progress_bar(len(pending), quiet)
    prepared = []
    try:
        for row in pending:
            try:
                prepared.append(runner.prepare(row))
            except Exception as exc:  # noqa: BLE001 - a bad row becomes its error record
                write_record(writer, io.error_record(io.row_id(row, columns), exc), report, bar)
        # Similar lengths back to back: the fast path's batch sizes and buffer shapes then change
        # little from one row to the next (the gain is not measured separately; see BENCHMARKS.md).
        prepared.sort(key=lambda p: p.length)
        for item in prepared:
            try:
                record = runner.run(item)
            except Exception as exc:  # noqa: BLE001
                record = io.error_record(item.key, exc)
            write_record(writer, record, report, bar)
    finally:
        if bar is not None:
            bar.close()


def write_record(writer: io.RecordWriter, record: dict, report: JobReport, bar) -> None:
    """Append one record and count it in the report (done or failed) and on the progress bar."""
    writer.write(record)
    if "error" in record:
        report.failed += 1
        report.failures.append(f"{record['id']}: {record['error']}")
    else:
        report.done += 1
    if bar is not None:
        bar.update(1)
