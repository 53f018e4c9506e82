"""The Ray engine: the same job on Ray Data, one ``HETA`` per actor.

The input is read with ``ray.data`` (``read_json``/``read_csv``/``read_parquet``,
``from_huggingface``, ``from_items``) and ``map_batches`` sends batches to a pool of ``actors``
actors. Each actor loads the model once (``model`` path or ``model_factory``, called inside the
actor, so the factory must be picklable), sets ``threads`` torch threads (or holds ``gpus``
GPUs), drops the rows already in the output, sorts the rest by length and runs the local
engine's ``RowRunner`` on them, so its records are the local engine's. The driver receives the
records and appends them with the same ``RecordWriter``: one writer, the same atomic rows and
the same resume, whether the actors run here or on a cluster.

Failures: an actor that dies (a killed process, a lost node) is restarted by Ray
(``max_restarts``) and its unfinished batch retried (``max_task_retries``). A retried batch can
deliver rows the driver already wrote; the driver writes each id once.

Ray is the optional extra ``[ray]``. Without ``address`` the job starts a local Ray instance
with ``actors * threads`` CPUs (and stops it at the end); with ``address`` it joins that
cluster. A Ray instance already running in this process (``ray.init`` by the caller) is used as
it is.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from heta_fast.config import HETAConfig
from heta_fast.jobs import io
from heta_fast.jobs.local import JobReport, ModelFactory, RowRunner, build_heta, progress_bar, write_record

# Actor restarts and task retries after a worker dies: enough for a few crashes per job without
# looping forever on a row that kills its worker every time.
MAX_RESTARTS = 4


def import_ray():
    try:
        import ray
        import ray.data  # noqa: F401 - the Data library is a separate install ("ray[data]")
    except ModuleNotFoundError:
        raise ModuleNotFoundError("engine 'ray' needs Ray Data: pip install 'heta_fast[ray]'") from None
    return ray


class _Worker:
    """One actor: one ``HETA``; a batch of input rows -> a batch of records (JSON text)."""

    def __init__(self, model: str | None, model_factory: ModelFactory | None, config: dict, columns: dict,
                 threads: int, device: str | None, done: frozenset[str]):
        if threads:
            torch.set_num_threads(threads)
        heta = build_heta(model, model_factory, device)
        self.runner = RowRunner(heta, HETAConfig(**config), io.Columns(**columns))
        self.done = done  # ids already in the output: skipped here rather than in a separate filter stage

    def __call__(self, batch) -> dict:
        rows = [row for row in batch.to_pylist() if io.row_id(row, self.runner.columns) not in self.done]
        prepared, records = [], []
        for row in rows:
            try:
                prepared.append(self.runner.prepare(row))
            except Exception as exc:  # noqa: BLE001 - a bad row becomes its error record
                records.append(io.error_record(io.row_id(row, self.runner.columns), exc))
        for item in sorted(prepared, key=lambda p: p.length):
            try:
                records.append(self.runner.run(item))
            except Exception as exc:  # noqa: BLE001
                records.append(io.error_record(item.key, exc))
        return {"record": np.array([json.dumps(r, allow_nan=False) for r in records], dtype=object)}


def read_dataset(ray, source: Any, columns: io.Columns):
    """The input as a ``ray.data.Dataset``."""
    rd = ray.data
    if isinstance(source, list):
        return rd.from_items(source)
    if io.is_hf_dataset(source):
        return rd.from_huggingface(source)
    path = os.path.abspath(os.fspath(source))
    kind = io.input_format(path)
    if kind == "jsonl":
        return rd.read_json(path, lines=True)
    if kind == "csv":
        import pyarrow.csv as pacsv

        # Every column as text, as the local engine's csv reader sees it (ids "007" stay "007").
        names = _csv_header(path)
        return rd.read_csv(path, convert_options=pacsv.ConvertOptions(column_types={n: "string" for n in names},
                                                                      strings_can_be_null=True))
    return rd.read_parquet(path)


def one_batch_per_block(ds, batch_size: int):
    """``ds`` cut into blocks of ``batch_size`` rows (the last may be shorter), materialised.

    Ray Data hands a map task's output to the driver one block at a time, and a task's output is
    one block however many batches it ran: a 200-row JSONL read as blocks of 50 rows reached the
    writer 50 rows at a time, and a job stopped at its time limit lost a block's worth of finished
    rows (BENCHMARKS.md, "200 prompts, Gauss-Newton on Ray"). With one batch per block every
    batch is written as soon as its actor returns it.
    Materialised before the actors start: the actors may hold every CPU of the instance (2 actors
    on num_cpus=2), and read tasks queued behind them would never run.
    """
    return ds.repartition(target_num_rows_per_block=batch_size, strict=True).materialize()


def _csv_header(path: str) -> list[str]:
    with open(path, encoding="utf-8", newline="") as f:
        return next(csv.reader(f), [])


def run_ray(source: Any, writer: io.RecordWriter, *, model: str | None, model_factory: ModelFactory | None,
            config: HETAConfig, columns: io.Columns, report: JobReport, quiet: bool, actors: int, threads: int,
            gpus: float | None, address: str | None, batch_size: int, device: str | None) -> None:
    """Run the job's remaining rows on Ray and append their records with ``writer``."""
    ray = import_ray()
    started = not ray.is_initialized()
    if started:
        ray.init(address=address, num_cpus=None if address else actors * max(threads, 1),
                 include_dashboard=False, log_to_driver=not quiet, configure_logging=not quiet,
                 logging_level="ERROR" if quiet else "INFO")
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = False  # our own bar counts rows written
        ds = one_batch_per_block(read_dataset(ray, source, columns), batch_size)
        ids = io.check_ids(ds.select_columns([columns.id]).take_all(), columns)
        done = frozenset(writer.done)
        report.skipped = sum(key in done for key in ids)
        total = len(ids) - report.skipped
        if total == 0:
            return
        if gpus is None:  # one GPU per actor where the cluster has enough, CPU threads otherwise
            gpus = 1 if ray.cluster_resources().get("GPU", 0) >= actors else 0
        if gpus and device is None:
            device = "cuda"
        out = ds.map_batches(
            _Worker, batch_format="pyarrow", batch_size=batch_size, compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=max(threads, 1) if not gpus else None, num_gpus=gpus or None,
            fn_constructor_kwargs=worker_kwargs(model, model_factory, config, columns, threads, device, done),
            max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)
        bar = progress_bar(total, quiet)
        try:
            for batch in out.iter_batches(batch_format="numpy", batch_size=None):
                for line in batch["record"]:
                    record = json.loads(line)
                    if record["id"] in writer.done:  # a retried batch after an actor restart
                        continue
                    write_record(writer, record, report, bar)
        finally:
            if bar is not None:
                bar.close()
    finally:
        if started:
            ray.shutdown()


def worker_kwargs(model: str | None, model_factory: ModelFactory | None, config: HETAConfig, columns: io.Columns,
                  threads: int, device: str | None, done: frozenset[str]) -> dict[str, Any]:
    """The keyword arguments of ``_Worker`` (``map_batches``' ``fn_constructor_kwargs``), as plain values."""
    return {"model": model, "model_factory": model_factory, "config": config.to_dict(),
            "columns": _columns_dict(columns), "threads": threads, "device": device, "done": done}


def _columns_dict(columns: io.Columns) -> Mapping[str, str]:
    return {name: getattr(columns, name) for name in io.Columns.__dataclass_fields__}
