"""The fast exact Hessian with and without the fused second-order Functions, in one process.

    python -m benchmarks.bench_second_order                  # SmolLM2, n = 64, m = 10, 3 repeats
    python -m benchmarks.bench_second_order --lengths 32 --repeats 5 --threads 1
    python -m benchmarks.bench_second_order --first-batch --threads 1   # the first batch of positions only
    python -m benchmarks.bench_second_order --threads 1 --against 8053257   # also the exact path of a commit

For each length the whole fast ``S`` (``hessian.hessian_sensitivity``) runs alternately with the
model's stock modules (``hessian_sensitivity.__wrapped__``) and with ``heta_fast.second_order``'s
fused MLP and norm Functions (the decorated function, what the backend runs), ``--repeats`` times
each, interleaved so that both see the same machine load; medians, their ratio, the load
average at every run and the relative difference of the two ``S`` go to the JSON. Prompts from
``benchmarks.common.prompt_text`` (the shipped prompts, or ``--curated PATH``, cut to ``n + 1``
tokens), the backend's heap settings.
Each run also records this process's CPU time (``time.process_time``), which a shared machine
inflates far less than wall time. ``--first-batch`` stops each run after the first batch of
positions (the longest rows: ``0 .. c - 1`` of ``n``), a sample of the whole for loaded machines.
``--against REV`` adds a third variant: ``heta_fast/sensitivity/exact.py`` as it was at git
revision ``REV`` (loaded from ``git show``, run with today's model code), interleaved with the two.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.util
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.common import (
    REPO,
    RESULTS,
    add_curated_argument,
    check_curated,
    commit,
    load_average,
    machine,
    prompt_ids,
    prompt_text,
    save_json,
)
from heta_fast import HETA
from heta_fast.allocator import retained_heap
from heta_fast.config import HETAConfig
from heta_fast.memory import default_budget
from heta_fast.sensitivity import exact as hessian

DEFAULT_OUT = RESULTS / "second_order.json"


class _Stop(Exception):
    pass


def _stop(_stage: str, _done: int, _total: int) -> None:
    raise _Stop


def exact_at(revision: str):
    """``hessian_sensitivity`` from ``heta_fast/sensitivity/exact.py`` at git ``revision`` (today's imports)."""
    source = subprocess.run(["git", "show", f"{revision}:heta_fast/sensitivity/exact.py"], cwd=REPO,
                            capture_output=True, text=True, check=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as file:
        file.write(source)
    spec = importlib.util.spec_from_file_location(f"exact_at_{revision}", file.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    Path(file.name).unlink()
    return module.hessian_sensitivity


def run(lengths: Sequence[int] = (64,), samples: int = 10, repeats: int = 3, threads: int | None = None,
        data: Path | None = None, seed: int = 0, first_batch: bool = False, memory_budget: int | None = None,
        against: str | None = None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    heta = HETA.from_pretrained()
    lm = heta.lm
    text, source = prompt_text(data)
    variants = {"stock": hessian.hessian_sensitivity.__wrapped__, "fused": hessian.hessian_sensitivity}
    if against:
        variants[against] = exact_at(against)
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine(), "code": commit(), "prompt": source, "samples": samples, "repeats": repeats,
           "first_batch": first_batch, "memory_budget": memory_budget, "against": against, "lengths": {}}
    # as the pipeline runs it: frozen weights (else the fused Functions stand aside) and the
    # grouped attention kernel, entered once so that the timed runs do not include the switch
    with lm.prepared():
        for n in lengths:
            ids = prompt_ids(heta.tokenizer, text, n)
            E = lm.embed(ids)
            y = int(ids[-1])
            # a fixed budget keeps both variants on the same batches (the default follows free memory)
            config = HETAConfig.paper(samples=samples, seed=seed, memory_budget=memory_budget)
            budget = config.memory_budget or default_budget(lm.device)
            with torch.no_grad():
                key_values = lm.key_values(lm.hidden(E[None, :n], use_cache=True))
            seconds: dict[str, list[float]] = {name: [] for name in variants}
            cpu: dict[str, list[float]] = {name: [] for name in variants}
            loads: dict[str, list[list[float]]] = {name: [] for name in variants}
            S = {}
            for _ in range(repeats):
                for name, fn in variants.items():
                    loads[name].append(load_average())
                    reduced: list[torch.Tensor] = []

                    def reduce(hvp, positions, count, m, reduced=reduced):
                        reduced.append(hessian.block_l1_mean(hvp, positions, count, m))
                        return reduced[-1]

                    start, start_cpu = time.perf_counter(), time.process_time()
                    with retained_heap(config.retain_heap, lm.device), contextlib.suppress(_Stop):
                        fn(lm, E, y, key_values, config, budget, block_l1_fn=reduce,
                           progress=_stop if first_batch else None)
                    seconds[name].append(time.perf_counter() - start)
                    cpu[name].append(time.process_time() - start_cpu)
                    S[name] = sum(reduced)
                    print(f"n={n} {name}: {seconds[name][-1]:.2f} s, CPU {cpu[name][-1]:.2f} s "
                          f"(load {loads[name][-1]})", flush=True)
            median = {name: statistics.median(v) for name, v in seconds.items()}
            median_cpu = {name: statistics.median(v) for name, v in cpu.items()}
            diff = float((S["fused"] - S["stock"]).abs().max() / S["stock"].abs().max())
            out["lengths"][str(n)] = {"seconds": seconds, "cpu_seconds": cpu, "loads": loads, "median": median,
                                      "median_cpu": median_cpu, "speedup": median["stock"] / median["fused"],
                                      "speedup_cpu": median_cpu["stock"] / median_cpu["fused"],
                                      "positions": int((S["stock"] != 0).sum()), "S_rel_diff": diff}
            if against:
                base = out["lengths"][str(n)]
                base["speedup_cpu_vs_against"] = median_cpu[against] / median_cpu["fused"]
                base["S_rel_diff_vs_against"] = float((S["fused"] - S[against]).abs().max() / S[against].abs().max())
                print(f"n={n}: {against} CPU {median_cpu[against]:.2f} s -> fused {median_cpu['fused']:.2f} s, "
                      f"{base['speedup_cpu_vs_against']:.2f}x; S differs by {base['S_rel_diff_vs_against']:.1e}",
                      flush=True)
            print(f"n={n}: stock {median['stock']:.2f} s, fused {median['fused']:.2f} s, "
                  f"{median['stock'] / median['fused']:.2f}x (CPU time {median_cpu['stock']:.2f} s -> "
                  f"{median_cpu['fused']:.2f} s, {median_cpu['stock'] / median_cpu['fused']:.2f}x); "
                  f"S differs by {diff:.1e} (relative)", flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_second_order",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64], help="context sizes n")
    parser.add_argument("--samples", type=int, default=10, help="m, probes per position")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--memory-budget-gib", type=float, default=None,
                        help="fixed batching budget (default: a quarter of free memory, which moves)")
    parser.add_argument("--first-batch", action="store_true", help="time the first batch of positions only")
    parser.add_argument("--against", metavar="REV", default=None,
                        help="also time the exact path of git revision REV (its exact.py, today's model code)")
    add_curated_argument(parser)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    args = parser.parse_args(argv)
    check_curated(parser, args)
    out = run(args.lengths, args.samples, args.repeats, args.threads, args.curated, first_batch=args.first_batch,
              memory_budget=None if args.memory_budget_gib is None else int(args.memory_budget_gib * 2**30),
              against=args.against)
    save_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
