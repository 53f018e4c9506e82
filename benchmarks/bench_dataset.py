"""Corpus throughput on SmolLM2-135M: rows per hour of ``attribute_dataset`` and the peak memory.

    python -m benchmarks.bench_dataset                                   # 200 prompts, every estimator, both engines
    python -m benchmarks.bench_dataset --prompts 200 --estimators gauss_newton low_rank --engines local ray
    python -m benchmarks.bench_dataset --prompts 4 --estimators exact --engines local --out /tmp/d.json
    python -m benchmarks.bench_dataset --prompts 200 --sample 16 --estimators exact --work runs/exact  # resumable

Prompts: ``--prompts`` windows of the shipped prompts (``benchmarks/data/prompts.txt``; the
paper's curated QA text with ``--curated PATH``), each ``32 .. 128`` tokens long
(``--min-tokens``/``--max-tokens``, lengths drawn with a
fixed seed, so every run and estimator gets the same prompts); the target is each prompt's last
token. Every (estimator, engine) pair runs as its own job in a fresh subprocess (so each peak
is its own) under ``--memory-budget``:

- ``local``: this machine's one-process engine with ``--threads`` torch threads;
- ``ray``: a local Ray instance with ``--actors`` actors of one thread each.

Per run it reports the rows done, the job's wall time (model loads and Ray start-up included),
rows per hour from that wall time, rows per hour of the attribution alone (rows / the sum of the
records' ``seconds``, per worker), the load average before and after, and the peak resident
memory: of the process (``ru_maxrss``) for ``local``, of the largest actor (sampled every 0.2 s
by this process) for ``ray``, against the resident size of a process (or of one of the engine's
actors) that has only loaded the model, plus ``--memory-budget``. A job stopped by ``--timeout``
still reports the rows it wrote and the peaks sampled until then.

``--sample K`` runs ``K`` of the ``--prompts`` prompts, taken at evenly spaced ranks of their
length (a systematic sample: the ``j``-th of ``K`` is the prompt at rank ``(j + 1/2) N / K``), for
an estimator whose full job does not fit in a sitting. Such a run also reports
``rows_per_hour_projected``: the rate over all ``N`` prompts, with each prompt's row time read
off the sample's row times by linear interpolation in the token count. ``--work DIR`` keeps the
jobs' outputs in ``DIR`` instead of a fresh temporary folder, and a rerun with the same ``DIR``
resumes them (``attribute_dataset`` skips the rows already written), so a long job can be spread
over sittings; its wall-time figures are then those of the last sitting only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import REPO, RESULTS, add_curated_argument, check_curated, commit, machine, prompt_text

DEFAULT_OUT = RESULTS / "dataset.json"
ESTIMATORS = ("exact", "low_rank", "gauss_newton")
ENGINES = ("local", "ray")


def make_prompts(tokenizer, text: str, count: int, lo: int, hi: int, seed: int = 0) -> list[dict]:
    """``count`` rows ``{"id", "text"}`` of ``lo .. hi`` tokens each, cut from ``text`` at random offsets."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    rng = random.Random(seed)
    rows = []
    for k in range(count):
        n = rng.randint(lo, hi)
        start = rng.randrange(0, len(ids) - n)
        rows.append({"id": f"p{k:04d}", "text": tokenizer.decode(ids[start:start + n]), "tokens": n})
    return rows


def length_sample(rows: list[dict], k: int) -> list[dict]:
    """``k`` of ``rows`` at evenly spaced ranks of ``tokens`` (ties by id): rank ``floor((j + 1/2) N / k)``
    for ``j < k``, so the sample's lengths follow the whole set's. ``k >= len(rows)`` keeps every row."""
    if k >= len(rows):
        return list(rows)
    ranked = sorted(rows, key=lambda r: (r["tokens"], r["id"]))
    return [ranked[int((j + 0.5) * len(rows) / k)] for j in range(k)]


def projected_rate(sample_tokens: Sequence[int], sample_seconds: Sequence[float], all_tokens: Sequence[int],
                   workers: int) -> float:
    """Rows per hour over prompts of ``all_tokens`` tokens, each row's time interpolated linearly in the
    token count between the sample's ``(tokens, seconds)`` points (held flat beyond the ends; equal
    lengths averaged): ``workers * 3600 * N / sum of the N times``."""
    import numpy as np

    lengths = np.asarray(sample_tokens, dtype=float)
    seconds = np.asarray(sample_seconds, dtype=float)
    xs = np.unique(lengths)
    ys = np.array([seconds[lengths == x].mean() for x in xs])
    total = np.interp(np.asarray(all_tokens, dtype=float), xs, ys).sum()
    return float(workers * 3600 * len(all_tokens) / total)


class PeakSampler(threading.Thread):
    """The largest resident set, sampled every ``interval`` s, of the process ``pid`` itself
    (``peak_process``) and of any Ray actor below it (``MapWorker`` in its title: ``peak_actor``).

    Run from the parent, so a job stopped by its time limit still has its peaks."""

    def __init__(self, pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.interval, self._halt = pid, interval, threading.Event()
        self.peak_process = self.peak_actor = 0

    def run(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._halt.is_set():
            try:
                self.peak_process = max(self.peak_process, root.memory_info().rss)
                children = root.children(recursive=True)
            except psutil.Error:
                return
            for proc in children:
                try:
                    if "MapWorker" in " ".join(proc.cmdline()):
                        self.peak_actor = max(self.peak_actor, proc.memory_info().rss)
                except psutil.Error:
                    continue
            time.sleep(self.interval)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def child(args: argparse.Namespace) -> dict:
    """One job (``--child ESTIMATOR ENGINE``), run in this process; returns its figures."""
    import torch

    from heta_fast import HETAConfig, attribute_dataset

    estimator, engine = args.child
    torch.set_num_threads(args.threads)
    config = HETAConfig.paper(hessian=estimator, memory_budget=args.memory_budget)
    out = Path(args.work) / f"{estimator}-{engine}.jsonl"
    if out.exists() and not args.resume:
        out.unlink()
    load_before = os.getloadavg()
    report = attribute_dataset(args.input, out, config=config, engine=engine, quiet=True, actors=args.actors,
                               threads=1, batch_size=args.batch_size)
    return {"rows": report.done, "failed": report.failed, "wall_s": report.seconds,
            "rows_per_hour_wall": 3600 * report.done / report.seconds,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 if engine == "local" else None,
            "load_before": load_before, "load_after": os.getloadavg()}


def row_figures(path: Path, workers: int, ids: frozenset[str] | None = None) -> dict:
    """From a job's output file (whole or cut short): rows, rows per hour of the attribution alone
    (``workers`` x 3600 / mean record seconds), the median row time, and per row its context length,
    seconds and id. ``ids``: count only these rows (a ``--work`` folder may hold rows of another sample)."""
    from heta_fast.jobs.io import read_records

    records = [r for r in read_records(str(path)) if "error" not in r] if path.exists() else []
    records = [r for r in records if ids is None or r["id"] in ids]
    compute = sum(r["seconds"] for r in records)
    return {"rows_written": len(records),
            "rows_per_hour_compute": 3600 * len(records) * workers / compute if compute else None,
            "median_row_s": sorted(r["seconds"] for r in records)[len(records) // 2] if records else None,
            "tokens": [len(r["context_ids"]) for r in records],
            "row_seconds": [r["seconds"] for r in records], "ids": [r["id"] for r in records]}


def write_prompts(path: Path, rows: list[dict], keep: bool) -> None:
    """Write ``rows`` as the job input ``path`` (``{"id", "text"}`` lines). With ``keep`` (a ``--work``
    folder that a rerun resumes) an existing file must hold the same prompts: the output's ids would
    otherwise name other texts, and the resumed job would skip rows it never ran."""
    text = "".join(json.dumps({"id": r["id"], "text": r["text"]}) + "\n" for r in rows)
    if keep and path.exists() and path.read_text() != text:
        raise SystemExit(f"--work {path.parent}: {path.name} holds other prompts than this run's (another "
                         "--curated, --min-tokens or --max-tokens?); give a new folder")
    path.write_text(text)


def _printed_bytes(code: str, env: dict | None = None) -> int:
    """Run ``code`` in a fresh interpreter and return the integer it prints last (a byte count)."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                          env=env)
    return int(done.stdout.split()[-1])


def model_rss() -> int:
    """Resident bytes of a process that has only loaded the model (the baseline of the peaks)."""
    return _printed_bytes("import resource; from heta_fast import HETA; HETA.from_pretrained(); "
                          "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)")


ACTOR_RSS = """
import resource, numpy as np, ray
from heta_fast.config import HETAConfig
from heta_fast.jobs import io, ray_engine

class Loaded(ray_engine._Worker):  # the engine's own actor, answering its first batch with its peak
    def __call__(self, batch):
        return {"rss": np.array([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024])}

ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
ray.data.DataContext.get_current().enable_progress_bars = False
rows = ray.data.from_items([{"id": "baseline", "text": "unused"}])
kwargs = ray_engine.worker_kwargs(None, None, HETAConfig(), io.Columns(), threads=1, device=None, done=frozenset())
out = rows.map_batches(Loaded, batch_format="pyarrow", batch_size=1, num_cpus=1,
                       compute=ray.data.ActorPoolStrategy(size=1), fn_constructor_kwargs=kwargs)
print(out.take_all()[0]["rss"])
ray.shutdown()
"""


def actor_model_rss() -> int:
    """Resident bytes of one of the Ray engine's actors that has loaded the model and run no row: the
    baseline of an actor's peak. Measured on the engine's own actor (Ray Data's ``MapWorker`` running
    ``ray_engine._Worker``), not a plain Ray actor: the Data worker holds pyarrow, pandas and Ray Data's
    own modules besides, 1,206,571,008 against 1,107,316,736 bytes here (+95 MiB), none of it HETA's."""
    return _printed_bytes(ACTOR_RSS, env={**os.environ, "OMP_NUM_THREADS": "1"})


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=200)
    parser.add_argument("--exact-prompts", type=int, default=None, help="prompts for exact (default: --prompts)")
    parser.add_argument("--sample", type=int, default=None,
                        help="run K of the prompts, at evenly spaced ranks of their length, and project the rate")
    parser.add_argument("--min-tokens", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--estimators", nargs="+", choices=ESTIMATORS, default=list(ESTIMATORS))
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the local engine")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--memory-budget", type=int, default=1 << 30)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per job before it is stopped")
    add_curated_argument(parser)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--baselines-only", action="store_true",
                        help="only the resident size of a process and of a Ray engine actor that have loaded the model")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep the jobs' outputs here and resume them on a rerun (default: a new temporary folder)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    check_curated(parser, args)
    if args.child:
        print(json.dumps(child(args)))
        return {}

    from heta_fast import HETA

    tokenizer = HETA.from_pretrained().tokenizer
    text, source = prompt_text(args.curated)
    if args.work is not None:
        args.work.mkdir(parents=True, exist_ok=True)
    work = str(args.work) if args.work is not None else tempfile.mkdtemp(prefix="bench-dataset-")
    results = {"machine": machine(), "commit": commit(), "data": source, "memory_budget": args.memory_budget,
               "model_rss_bytes": model_rss(), "runs": []}
    if "ray" in args.engines:
        results["actor_model_rss_bytes"] = actor_model_rss()
    if args.baselines_only:
        print(json.dumps({k: results[k] for k in ("model_rss_bytes", "actor_model_rss_bytes") if k in results}))
        return results
    for estimator in args.estimators:
        count = args.exact_prompts if estimator == "exact" and args.exact_prompts else args.prompts
        every = make_prompts(tokenizer, text, count, args.min_tokens, args.max_tokens)
        path = Path(work) / f"prompts-{count}.jsonl"
        write_prompts(path, every, keep=args.work is not None)
        rows = length_sample(every, args.sample) if args.sample else every
        if rows is not every:  # the sample's own input, derived from the checked set above
            path = Path(work) / f"prompts-{count}-{len(rows)}.jsonl"
            write_prompts(path, rows, keep=False)
        for engine in args.engines:
            cmd = [sys.executable, "-m", "benchmarks.bench_dataset", "--child", estimator, engine, "--input",
                   str(path), "--work", work, "--actors", str(args.actors), "--threads", str(args.threads),
                   "--batch-size", str(args.batch_size), "--memory-budget", str(args.memory_budget)]
            cmd += ["--resume"] if args.work is not None else []
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
            start = time.time()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env)
            sampler = PeakSampler(proc.pid)
            sampler.start()
            try:
                stdout, stderr = proc.communicate(timeout=args.timeout)
                run = json.loads(stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {"error": stderr[-2000:]}
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                run = {"error": f"stopped after {args.timeout} s", "wall_s": time.time() - start}
            finally:
                sampler.stop()
            workers = args.actors if engine == "ray" else 1
            run.update(estimator=estimator, engine=engine, **row_figures(Path(work) / f"{estimator}-{engine}.jsonl",
                                                                        workers, frozenset(r["id"] for r in rows)))
            if engine == "ray":
                run["peak_rss_bytes"] = sampler.peak_actor
            elif run.get("peak_rss_bytes") is None:
                run["peak_rss_bytes"] = sampler.peak_process
            run["memory_budget"] = args.memory_budget
            run["prompts"] = len(rows)
            if len(rows) < count and run.get("rows_written"):
                run["sampled_from"] = count
                cut = {r["id"]: r["tokens"] for r in every}  # lengths as drawn, the unit of the whole set
                run["rows_per_hour_projected"] = projected_rate([cut[i] for i in run["ids"]], run["row_seconds"],
                                                                list(cut.values()), workers)
            run["started"] = time.strftime("%H:%M:%S", time.gmtime(start))
            results["runs"].append(run)
            baseline = results["actor_model_rss_bytes"] if engine == "ray" else results["model_rss_bytes"]
            print(format_run(run, baseline), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(results, indent=1))
    return results


def format_run(run: dict, model_rss_bytes: int) -> str:
    """One line per job; ``model_rss_bytes``: the resident size of a process (or actor) with the model only."""
    gib = 2 ** 30
    head = f"{run['estimator']:>12} {run['engine']:>5}: "
    peak = (f"peak RSS {run['peak_rss_bytes'] / gib:.2f} GiB (model loaded {model_rss_bytes / gib:.2f} + budget "
            f"{run['memory_budget'] / gib:.2f})" if run.get("peak_rss_bytes") else "peak RSS not read")
    rows = (f"{run['rows_written']}/{run['prompts']} rows written, median row {run['median_row_s']:.2f} s, "
            f"{run['rows_per_hour_compute']:.0f} rows/h (compute)" if run.get("rows_written") else "no rows written")
    if run.get("rows_per_hour_projected"):
        rows += f", {run['rows_per_hour_projected']:.0f} rows/h projected onto all {run['sampled_from']} prompts"
    if "error" in run:
        return head + f"failed or stopped: {run['error'][-300:]}; {rows}; {peak}"
    return (head + f"{rows}, {run['rows_per_hour_wall']:.0f} rows/h (wall, {run['wall_s']:.0f} s), {peak}, "
            f"load {run['load_before'][0]:.1f} -> {run['load_after'][0]:.1f}")


if __name__ == "__main__":
    main()
