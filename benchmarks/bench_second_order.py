"""The fast exact Hessian with and without the fused second-order Functions, in one process.

    python -m benchmarks.bench_second_order                  # SmolLM2, n = 64, m = 10, 3 repeats
    python -m benchmarks.bench_second_order --lengths 32 --repeats 5 --threads 1

For each length the whole fast ``S`` (``hessian.hessian_sensitivity``) runs alternately with the
model's stock modules (``hessian_sensitivity.__wrapped__``) and with ``heta_fast.second_order``'s
fused MLP and norm Functions (the decorated function, what the backend runs), ``--repeats`` times
each, interleaved so that both see the same machine load; medians, their ratio, the load
average at every run and the relative difference of the two ``S`` go to the JSON. Same prompt as
``bench_smollm`` (the curated QA text cut to ``n + 1`` tokens), the backend's heap settings.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.bench_smollm import DATA, _load, commit, machine, prompt_ids, prompt_text
from heta_fast import HETA, hessian
from heta_fast.allocator import retained_heap
from heta_fast.config import HETAConfig
from heta_fast.memory import default_budget

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO / "benchmarks" / "results" / "second_order.json"


def run(lengths: Sequence[int] = (64,), samples: int = 10, repeats: int = 3, threads: int | None = None,
        data: Path = DATA, seed: int = 0) -> dict:
    if threads:
        torch.set_num_threads(threads)
    heta = HETA.from_pretrained()
    lm = heta.lm
    text, source = prompt_text(data)
    variants = {"stock": hessian.hessian_sensitivity.__wrapped__, "fused": hessian.hessian_sensitivity}
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": machine(), "code": commit(), "prompt": source, "samples": samples, "repeats": repeats,
           "lengths": {}}
    for n in lengths:
        ids = prompt_ids(heta.tokenizer, text, n)
        E = lm.embed(ids)
        y = int(ids[-1])
        config = HETAConfig(samples=samples, seed=seed)
        budget = config.memory_budget or default_budget(lm.device)
        with torch.no_grad():
            key_values = lm.key_values(lm.hidden(E[None, :n], use_cache=True))
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        loads: dict[str, list[list[float]]] = {name: [] for name in variants}
        S = {}
        for _ in range(repeats):
            for name, fn in variants.items():
                loads[name].append(_load())
                start = time.perf_counter()
                with retained_heap(config.retain_heap, lm.device):
                    S[name] = fn(lm, E, y, key_values, config, budget)
                seconds[name].append(time.perf_counter() - start)
                print(f"n={n} {name}: {seconds[name][-1]:.2f} s (load {loads[name][-1]})", flush=True)
        median = {name: statistics.median(v) for name, v in seconds.items()}
        diff = float((S["fused"] - S["stock"]).abs().max() / S["stock"].abs().max())
        out["lengths"][str(n)] = {"seconds": seconds, "loads": loads, "median": median,
                                  "speedup": median["stock"] / median["fused"], "S_rel_diff": diff}
        print(f"n={n}: stock {median['stock']:.2f} s, fused {median['fused']:.2f} s, "
              f"{median['stock'] / median['fused']:.2f}x; S differs by {diff:.1e} (relative)", flush=True)
    return out


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_second_order",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[64], help="context sizes n")
    parser.add_argument("--samples", type=int, default=10, help="m, probes per position")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--data", type=Path, default=DATA, help="curated_qa_100.json (the prompt text)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    args = parser.parse_args(argv)
    out = run(args.lengths, args.samples, args.repeats, args.threads, args.data)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
