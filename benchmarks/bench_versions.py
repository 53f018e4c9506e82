"""Two versions of heta_fast on the same attributions, alternated, to tell a slowdown from noise.

    python -m benchmarks.bench_versions --baseline 5c7f428 --lengths 32 64 --repeats 3

Timings are never compared across runs on a shared machine. This script checks ``--baseline`` out
into a temporary git worktree and times one attribution per (version, length) in a fresh
subprocess each, alternating baseline and current (B, C, B, C, ...) so that both see the same
load; it reports the median of each and the run-to-run spread (max/min over the repeats of one
version), with the load average before and after. Each subprocess loads SmolLM2-135M-Instruct,
warms up with one short attribution, then times ``HETA.attribute`` on the first ``n`` tokens of
the benchmark prompt (torch backend, exact Hessian, ``m = --samples``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TEXT = ("The river that runs past the old mill carried the last of the spring floods down to the sea, and the "
        "miller's daughter, who had watched it every morning since she was a child, knew from its colour that "
        "the snow on the mountains had finally melted. She walked along the bank to the bridge, counted the boats "
        "tied up at the quay, and wondered whether her brother would come home with the fishing fleet before the "
        "autumn storms began, as he had promised in the letter he sent from the northern harbour in the summer.")

_CHILD = r"""
import json, os, sys, time
import torch
torch.set_num_threads(int(sys.argv[4]))
from heta_fast import HETA, HETAConfig
spec = {"sink": "none", "mix": "raw"} if hasattr(HETAConfig(), "sink") else {}  # the definition in every version
heta = HETA.from_pretrained()
ids = heta.tokenizer(sys.argv[2])["input_ids"][: int(sys.argv[3]) + 1]
heta.attribute(ids[:9], samples=1, backend="torch", **spec)
start = time.perf_counter()
heta.attribute(ids, samples=int(sys.argv[5]), backend="torch", seed=0, **spec)
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def _time(tree: Path, n: int, threads: int, samples: int) -> float:
    """One attribution timed in a fresh process running the package in ``tree`` (this one: as installed)."""
    env = dict(os.environ) if tree == REPO else {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", _CHILD, str(tree), TEXT, str(n), str(threads), str(samples)],
                         capture_output=True, text=True, env=env, cwd=tree, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["seconds"]


def run(baseline: str, lengths: list[int], repeats: int, threads: int, samples: int) -> dict:
    load_before = os.getloadavg()
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory() as scratch:
        old = Path(scratch) / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(old), baseline], cwd=REPO, check=True)
        try:
            times: dict = {n: {"baseline": [], "current": []} for n in lengths}
            for _ in range(repeats):
                for n in lengths:
                    times[n]["baseline"].append(_time(old, n, threads, samples))
                    times[n]["current"].append(_time(REPO, n, threads, samples))
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(old)], cwd=REPO, check=False)
    rows = {}
    for n, pair in times.items():
        b, c = statistics.median(pair["baseline"]), statistics.median(pair["current"])
        rows[n] = {"baseline_s": pair["baseline"], "current_s": pair["current"], "baseline_median": b,
                   "current_median": c, "current_over_baseline": c / b,
                   "spread_baseline": max(pair["baseline"]) / min(pair["baseline"]),
                   "spread_current": max(pair["current"]) / min(pair["current"])}
    return {"baseline": baseline, "current": head.strip(), "threads": threads, "samples": samples,
            "repeats": repeats, "load_before": load_before, "load_after": os.getloadavg(), "lengths": rows}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, help="commit to compare against (any git revision)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--samples", type=int, default=10)
    args = parser.parse_args(argv)
    out = run(args.baseline, args.lengths, args.repeats, args.threads, args.samples)
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
