"""Attribute a corpus: resumable dataset jobs on one machine (``local``) or on Ray (``ray``).

    from heta_fast import attribute_dataset
    report = attribute_dataset("prompts.jsonl", "scores.jsonl", hessian="gauss_newton")
    report = attribute_dataset("prompts.parquet", "scores.parquet", engine="ray", actors=8)

Input and output formats: ``heta_fast.jobs.io``; the engines: ``heta_fast.jobs.local`` and
``heta_fast.jobs.ray_engine``; the command line: ``heta-fast attribute-dataset``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from typing import Any

from heta_fast.api import HETA
from heta_fast.config import HETAConfig
from heta_fast.jobs import io
from heta_fast.jobs.io import Columns, load_result, read_records
from heta_fast.jobs.local import JobReport, ModelFactory, build_heta, run_local
from heta_fast.jobs.ray_engine import import_ray, run_ray

ENGINES = ("local", "ray")

__all__ = ["attribute_dataset", "Columns", "JobReport", "load_result", "read_records", "ENGINES"]


def attribute_dataset(source: Any, out: str | os.PathLike, *, model: str | HETA | None = None,
                      model_factory: ModelFactory | None = None, config: HETAConfig | None = None,
                      columns: Columns | Mapping[str, str] | None = None, format: str | None = None,
                      engine: str = "local", retry_errors: bool = False, quiet: bool = False,
                      device: str | None = None, actors: int = 2, threads: int = 1, gpus: float | None = None,
                      address: str | None = None, batch_size: int = 8, **overrides) -> JobReport:
    """Attribute every row of ``source`` and append one record per row to ``out``.

    source: a ``.jsonl``/``.csv``/``.parquet`` path, a ``datasets.Dataset`` or a list of dicts;
    each row has an id and ``text``, ``prompt`` + ``answer`` or ``messages``
    (``heta_fast.jobs.io`` documents the rows and the records). out: the output file, JSON Lines
    unless ``format="parquet"`` or the name ends in ``.parquet``.

    model: a model folder or hub name (``None``: the embedded SmolLM2), or a ``HETA`` (local engine
    only); model_factory: instead of ``model``, a picklable callable returning a ``HETA`` or a
    ``(model, tokenizer)`` pair, called once per worker. config/overrides: the ``HETAConfig`` of
    every row (fields given as keywords replace its defaults, e.g. ``hessian="low_rank"``).
    Results equal ``HETA.attribute`` with that config; set ``memory_budget`` for results that
    do not depend on the free memory at the time (the batch sizes follow the budget).

    Resume: rows whose id is already in ``out`` are skipped, including rows that failed (their
    error records stay) unless ``retry_errors``, which removes the error records and runs those
    rows again. Each record is written whole (one line, flushed and fsynced) before the next row.

    engine: ``local`` (this process) or ``ray``: ``actors`` actors of ``threads`` torch threads
    (or ``gpus`` GPUs; ``None``: one GPU per actor when the Ray cluster has a GPU for each actor,
    none otherwise) each, on the cluster at ``address`` or a local Ray instance; rows go to
    actors ``batch_size`` at a time. quiet: no progress bar and no summary line on stderr.

    Returns a ``JobReport`` with the counts of rows done, skipped and failed.
    """
    start = time.perf_counter()
    # Everything that can be checked without the model is checked here, before any load.
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; expected one of {', '.join(ENGINES)}")
    if config is not None and not isinstance(config, HETAConfig):
        raise TypeError(f"config must be a HETAConfig, got {type(config).__name__}")
    config = (config or HETAConfig()).replace(**overrides) if overrides else (config or HETAConfig())
    columns = Columns.of(columns)
    out = os.fspath(out)
    fmt = io.output_format(out, format)
    io.check_source(source)
    if model is not None and model_factory is not None:
        raise ValueError("give either model or model_factory, not both")
    if model_factory is not None and not callable(model_factory):
        raise TypeError(f"model_factory must be callable, got {type(model_factory).__name__}")
    if isinstance(model, HETA) and engine == "ray":
        raise ValueError("engine 'ray' loads the model in each actor: pass a model path or a model_factory, "
                         "not a HETA")
    if model is not None and not isinstance(model, (str, os.PathLike, HETA)):
        raise TypeError(f"model must be a path, a hub name or a HETA, got {type(model).__name__}")
    for name, value, minimum in (("actors", actors, 1), ("threads", threads, 0), ("batch_size", batch_size, 1)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if gpus is not None and (isinstance(gpus, bool) or not isinstance(gpus, (int, float)) or gpus < 0):
        raise ValueError(f"gpus must be a number >= 0 (or None), got {gpus!r}")
    if fmt == "parquet" or (not isinstance(source, list) and str(source).lower().endswith((".parquet", ".pq"))):
        io.pyarrow_parquet()
    if engine == "ray":
        import_ray()
    report = JobReport(out=out, engine=engine)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with io.open_output(out, fmt, retry_errors) as writer:
        if engine == "local":
            rows = io.read_rows(source)
            io.check_ids(rows, columns)
            heta = model if isinstance(model, HETA) else build_heta(
                None if model is None else os.fspath(model), model_factory, device)
            run_local(rows, writer, heta, config, columns, report, quiet)
        else:
            run_ray(source, writer, model=None if model is None else os.fspath(model), model_factory=model_factory,
                    config=config, columns=columns, report=report, quiet=quiet, actors=actors, threads=threads,
                    gpus=gpus, address=address, batch_size=batch_size, device=device)
    io.finish_output(out, fmt)
    report.seconds = time.perf_counter() - start
    if not quiet:
        print(f"heta-fast: {report.summary()}", file=sys.stderr, flush=True)
    return report
