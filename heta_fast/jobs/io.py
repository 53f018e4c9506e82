"""Reading a corpus of attribution jobs and writing their results, one whole row at a time.

Input: one job per row, from a JSONL file (``.jsonl``/``.ndjson``), a CSV file (``.csv``), a
Parquet file (``.parquet``, needs pyarrow), a ``datasets.Dataset`` or a list of dicts. Each row
has an ``id`` and one of

- ``text``: explain one token of the text, by default the last one; optional ``target_pos``
  (the position ``t``) and ``target_token`` (a token string, or an int id) as in
  ``HETA.attribute``;
- ``prompt`` + ``answer``: explain every token of the answer appended to the prompt (the
  multi-target path, ``HETA.attribute_targets``);
- ``messages``: a chat, a list of ``{"role", "content"}`` ending with the assistant's reply;
  the conversation before it goes through the tokenizer's chat template (with the generation
  prompt) and every token of the reply is explained, as for ``prompt`` + ``answer``.

The column names are configurable (``Columns``). In CSV, ``messages`` is a JSON string and
``target_pos`` an integer string; empty cells are missing values.

Output (``OUTPUT_SCHEMA``): one record per input row, JSON Lines by default. A record is either
a result or an error:

- result, ``kind`` ``"single"`` (a ``text`` row): ``id``, ``kind``, ``heta_fast_version``,
  ``seconds`` (wall time of the row), then exactly the fields of ``Attribution.to_dict()``:
  ``target_pos``, ``target_id``, ``target_token``, ``context_ids``, ``context_tokens``,
  ``scores``, ``M``, ``S``, ``I`` (``[n]`` lists), ``config`` (every ``HETAConfig`` field, seed
  included), ``backend``, ``timings`` (seconds per component), ``text`` and ``offsets`` (the
  row's text and each token's character span; null where the tokenizer gives none) and
  ``special`` (which context tokens are the tokenizer's special tokens), ``sink_share`` (with
  ``config.sink``: the sink token's share of the score before it was dropped; null otherwise);
- result, ``kind`` ``"multi"`` (``prompt`` + ``answer`` and ``messages`` rows): ``id``, ``kind``,
  ``heta_fast_version``, ``seconds``, then the fields of ``MultiAttribution.to_dict()``:
  ``targets``, ``target_ids``, ``target_tokens``, ``context_ids``, ``context_tokens``, ``scores``,
  ``M``, ``S``, ``I`` (ragged: row ``k`` has ``targets[k]`` entries), ``config``, ``backend``,
  ``timings``, ``row_timings``, ``prompt_length`` (the number of prompt tokens: targets start there),
  ``sink_shares`` (per target its ``sink_share``; empty without a sink),
  ``text``/``offsets`` (null: these rows are tokenised in two parts) and ``special``;
- error: ``{"id": ..., "error": "ExceptionType: message"}``.

``id`` is always written as a string (``str`` of the input's id), so ids from JSON numbers and
CSV text compare equal on resume. ``load_result(record)`` turns a result back into an
``Attribution`` or ``MultiAttribution``; ``read_records(path)`` reads a whole output file.

Parquet output holds the same records with a fixed column set (``PARQUET_SCHEMA``): the fields
of both kinds, null where a kind has none; ``scores``/``M``/``S``/``I`` as lists of rows (one
row for ``single``), and ``config``, ``timings``, ``row_timings`` as JSON text (their keys vary
by backend and estimator). Parquet cannot be appended to, so a Parquet job writes its rows to a
journal ``OUT.journal.jsonl`` beside it and turns the journal into ``OUT`` at the end (an atomic
rename); a restart reads the finished ``OUT`` and the journal.

Atomic rows: ``RecordWriter`` appends each record as one complete line with a single ``write``
and then flushes and fsyncs, so a record is on disk whole before the next row starts. A kill
can still cut the line being written; on opening, the writer drops an unterminated last line
(the only place a torn line can be), so a restarted job sees every finished row once and
nothing torn.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from heta_fast.results import Attribution, MultiAttribution

FORMATS = ("jsonl", "parquet")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
JOURNAL_SUFFIX = ".journal.jsonl"

# Fields every result record carries besides the attribution's own to_dict().
RECORD_FIELDS = ("id", "kind", "heta_fast_version", "seconds")
SOURCE_FIELDS = ("text", "offsets", "special")  # heta_fast.results: the source text, token offsets, special flags
SINGLE_FIELDS = ("target_pos", "target_id", "target_token", "context_ids", "context_tokens", "scores", "M", "S",
                 "I", "config", "backend", "timings", "sink_share") + SOURCE_FIELDS
MULTI_FIELDS = ("targets", "target_ids", "target_tokens", "context_ids", "context_tokens", "scores", "M", "S", "I",
                "config", "backend", "timings", "row_timings", "prompt_length", "sink_shares") + SOURCE_FIELDS
ERROR_FIELDS = ("id", "error")
OUTPUT_SCHEMA = {"single": RECORD_FIELDS + SINGLE_FIELDS, "multi": RECORD_FIELDS + MULTI_FIELDS,
                 "error": ERROR_FIELDS}
_SCORE_FIELDS = ("scores", "M", "S", "I")
_JSON_TEXT_FIELDS = ("config", "timings", "row_timings")


@dataclass(frozen=True)
class Columns:
    """Names of the input columns (defaults: the field names of the output schema)."""

    id: str = "id"
    text: str = "text"
    target_pos: str = "target_pos"
    target_token: str = "target_token"
    prompt: str = "prompt"
    answer: str = "answer"
    messages: str = "messages"

    @classmethod
    def of(cls, columns: Columns | Mapping[str, str] | None) -> Columns:
        """``None`` (defaults), a ``Columns``, or a dict renaming some of them (``{"text": "sentence"}``)."""
        if columns is None:
            return cls()
        if isinstance(columns, cls):
            return columns
        if not isinstance(columns, Mapping):
            raise TypeError(f"columns must be a dict of column names or a Columns, got {type(columns).__name__}")
        unknown = sorted(set(columns) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"unknown column role {unknown[0]!r}; expected one of "
                             f"{', '.join(cls.__dataclass_fields__)}")
        for role, name in columns.items():
            if not isinstance(name, str) or not name:
                raise TypeError(f"column name for {role!r} must be a non-empty str, got {name!r}")
        return cls(**columns)


# --- input -----------------------------------------------------------------------------------


def input_format(path: str) -> str:
    """``jsonl``, ``csv`` or ``parquet`` from a file name; ValueError for anything else."""
    lower = path.lower()
    if lower.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if lower.endswith(".csv"):
        return "csv"
    if lower.endswith((".parquet", ".pq")):
        return "parquet"
    raise ValueError(f"cannot tell the input format of {path!r}: name it .jsonl, .csv or .parquet")


def check_source(source: Any) -> None:
    """Fail early for an input that is none of the supported kinds or a file that is missing."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        input_format(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input file not found: {path}")
        return
    if is_hf_dataset(source) or isinstance(source, list):
        return
    raise TypeError(f"input must be a file path, a datasets.Dataset or a list of dicts, got {type(source).__name__}")


def read_rows(source: Any) -> list[dict]:
    """All rows of the input as plain dicts (see the module docstring for the formats)."""
    check_source(source)
    if isinstance(source, list):
        rows = source
    elif is_hf_dataset(source):
        rows = [dict(row) for row in source]
    else:
        path = os.fspath(source)
        kind = input_format(path)
        rows = _read_jsonl(path) if kind == "jsonl" else _read_csv(path) if kind == "csv" else _read_parquet(path)
    for n, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise TypeError(f"input row {n} is a {type(row).__name__}, not an object with named columns")
    return [dict(row) for row in rows]


def is_hf_dataset(source: Any) -> bool:
    cls = type(source)
    return cls.__name__ == "Dataset" and cls.__module__.startswith("datasets")


def _read_jsonl(path: str) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}, line {number}: not valid JSON ({exc.msg})") from None
    return rows


def _read_csv(path: str) -> list[dict]:
    with open(path, encoding="utf-8", newline="") as f:
        return [{k: v for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def _read_parquet(path: str) -> list[dict]:
    return pyarrow_parquet().read_table(path).to_pylist()


def pyarrow_parquet():
    try:
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        raise ModuleNotFoundError("Parquet needs pyarrow: pip install 'heta_fast[jobs]'") from None
    return pq


def row_id(row: Mapping, columns: Columns) -> str:
    """The row's id as a string; ValueError when the row has none."""
    value = row.get(columns.id)
    if value is None or (isinstance(value, float) and value != value):
        raise ValueError(f"a row has no {columns.id!r} column; every row needs an id")
    return str(value)


def check_ids(rows: Iterable[Mapping], columns: Columns) -> list[str]:
    """Every row's id (as strings), checked present and unique before any model work."""
    ids, seen = [], set()
    for n, row in enumerate(rows):
        try:
            key = row_id(row, columns)
        except ValueError:
            raise ValueError(f"input row {n} has no {columns.id!r}; every row needs an id "
                             "(column names: columns=/--id-column)") from None
        if key in seen:
            raise ValueError(f"id {key!r} appears twice in the input; ids must be unique (resume skips by id)")
        seen.add(key)
        ids.append(key)
    return ids


# --- output ----------------------------------------------------------------------------------


def output_format(path: str, fmt: str | None) -> str:
    """The output format asked for, or the one the file name implies (JSON Lines by default)."""
    if fmt is None:
        return "parquet" if path.lower().endswith((".parquet", ".pq")) else "jsonl"
    if fmt not in FORMATS:
        raise ValueError(f"unknown output format {fmt!r}; expected one of {', '.join(FORMATS)}")
    return fmt


def result_record(row_key: str, result: Attribution | MultiAttribution, version: str, seconds: float) -> dict:
    """The output record of one result: the record fields, then the attribution's own ``to_dict()``."""
    kind = "multi" if isinstance(result, MultiAttribution) else "single"
    return {"id": row_key, "kind": kind, "heta_fast_version": version, "seconds": seconds, **result.to_dict()}


def error_record(row_key: str, exc: BaseException) -> dict:
    return {"id": row_key, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())}"}


def load_result(record: Mapping) -> Attribution | MultiAttribution:
    """A result record (JSON Lines or Parquet) -> its ``Attribution`` or ``MultiAttribution``."""
    if "error" in record and record["error"] is not None:
        raise ValueError(f"row {record.get('id')!r} failed: {record['error']}")
    kind = record.get("kind")
    if kind == "single":
        return Attribution.from_dict({k: record[k] for k in SINGLE_FIELDS})
    if kind == "multi":
        return MultiAttribution.from_dict({k: record[k] for k in MULTI_FIELDS})
    raise ValueError(f"record {record.get('id')!r} has kind {kind!r}; expected 'single' or 'multi'")


def read_records(path: str) -> list[dict]:
    """Every record of a job's output file (JSON Lines or Parquet), in file order."""
    path = os.fspath(path)
    if path.lower().endswith((".parquet", ".pq")):
        return [_from_parquet_row(row) for row in pyarrow_parquet().read_table(path).to_pylist()]
    return _read_jsonl(path)


def _parquet_schema():
    import pyarrow as pa

    ints, strs, rows = pa.list_(pa.int64()), pa.list_(pa.string()), pa.list_(pa.list_(pa.float64()))
    return pa.schema([
        ("id", pa.string()), ("kind", pa.string()), ("error", pa.string()), ("heta_fast_version", pa.string()),
        ("seconds", pa.float64()), ("target_pos", pa.int64()), ("target_id", pa.int64()),
        ("target_token", pa.string()), ("targets", ints), ("target_ids", ints), ("target_tokens", strs),
        ("context_ids", ints), ("context_tokens", strs), ("scores", rows), ("M", rows), ("S", rows), ("I", rows),
        ("config", pa.string()), ("backend", pa.string()), ("timings", pa.string()), ("row_timings", pa.string()),
        ("prompt_length", pa.int64()), ("text", pa.string()), ("offsets", pa.list_(ints)),
        ("special", pa.list_(pa.bool_())), ("sink_share", pa.float64()), ("sink_shares", pa.list_(pa.float64())),
    ])


PARQUET_SCHEMA = _parquet_schema  # called lazily: pyarrow is an extra


def _to_parquet_row(record: Mapping) -> dict:
    row = dict(record)
    if row.get("kind") == "single":
        for name in _SCORE_FIELDS:
            row[name] = [row[name]]
    for name in _JSON_TEXT_FIELDS:
        if name in row:
            row[name] = json.dumps(row[name])
    return row


def _from_parquet_row(row: Mapping) -> dict:
    kind = row.get("kind")
    if row.get("error") is not None:
        return {"id": row["id"], "error": row["error"]}
    fields = OUTPUT_SCHEMA.get(kind, ())
    record = {name: row.get(name) for name in fields}
    for name in _JSON_TEXT_FIELDS:
        if name in record:
            record[name] = json.loads(record[name])
    if kind == "single":
        for name in _SCORE_FIELDS:
            record[name] = record[name][0]
    return record


def write_parquet(records: list[dict], path: str) -> None:
    """All records into one Parquet file, atomically (a temporary file renamed over ``path``)."""
    import pyarrow as pa

    pq = pyarrow_parquet()
    table = pa.Table.from_pylist([_to_parquet_row(r) for r in records], schema=PARQUET_SCHEMA())
    tmp = f"{path}.tmp-{os.getpid()}"
    pq.write_table(table, tmp)
    _fsync_path(tmp)
    os.replace(tmp, path)
    _fsync_dir(path)


class RecordWriter:
    """Appends records to a JSON Lines file, each one whole and on disk before ``write`` returns.

    Opening repairs the file: an unterminated last line (a write cut by a kill) is cut off, and
    with ``drop_errors`` the error records are removed (a rewrite to a temporary file renamed
    over the original) so that their rows run again. ``done`` then holds the ids of the records
    kept: the rows a restarted job skips.
    """

    def __init__(self, path: str, drop_errors: bool = False):
        self.path = os.fspath(path)
        self.torn = _drop_torn_tail(self.path)
        records = _read_jsonl(self.path) if os.path.exists(self.path) else []
        if drop_errors and any("error" in r for r in records):
            records = [r for r in records if "error" not in r]
            _rewrite(self.path, records)
        self.done: set[str] = {str(r["id"]) for r in records}
        self.errors: set[str] = {str(r["id"]) for r in records if "error" in r}
        self._file = open(self.path, "ab")  # noqa: SIM115 - closed by close()

    def write(self, record: Mapping) -> None:
        """One record: one ``write`` of one complete line, then flush and fsync."""
        line = (json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n").encode("utf-8")
        self._file.write(line)
        self._file.flush()
        os.fsync(self._file.fileno())
        self.done.add(str(record["id"]))
        if "error" in record:
            self.errors.add(str(record["id"]))

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _drop_torn_tail(path: str) -> bool:
    """Cut a last line that has no newline (a record whose write was interrupted). True if one was cut."""
    if not os.path.exists(path):
        return False
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        if size == 0:
            return False
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return False
        keep = 0
        block = 1 << 16
        end = size
        while end > 0:  # the last newline, read backwards a block at a time
            start = max(0, end - block)
            f.seek(start)
            chunk = f.read(end - start)
            at = chunk.rfind(b"\n")
            if at >= 0:
                keep = start + at + 1
                break
            end = start
        f.truncate(keep)
        f.flush()
        os.fsync(f.fileno())
    return True


def _rewrite(path: str, records: list[dict]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path)


def _fsync_path(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_output(path: str, fmt: str, retry_errors: bool) -> RecordWriter:
    """The writer a job appends to: ``path`` itself for JSON Lines, its journal for Parquet.

    For Parquet, a finished ``path`` from an earlier run is copied into a fresh journal first, so
    its rows count as done.
    """
    if fmt == "jsonl":
        return RecordWriter(path, drop_errors=retry_errors)
    journal = path + JOURNAL_SUFFIX
    if os.path.exists(path) and not os.path.exists(journal):
        _rewrite(journal, read_records(path))
    return RecordWriter(journal, drop_errors=retry_errors)


def finish_output(path: str, fmt: str) -> None:
    """For Parquet: the journal becomes ``path`` (atomically), then the journal is removed."""
    if fmt != "parquet":
        return
    journal = path + JOURNAL_SUFFIX
    write_parquet(_read_jsonl(journal), path)
    os.remove(journal)

