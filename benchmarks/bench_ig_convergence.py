"""Does integrated gradients converge on SmolLM2? Completeness error by baseline and step count.

For the first ``--examples`` examples of the project's curated set under the ``predicted``
protocol, and each baseline of ``BASELINES``, Captum's IG (Gauss-Legendre) with each of
``--steps``; per run the relative completeness error ``|sum a - (g(E) - g(B))| / |g(E) - g(B)|``.
With ``--nodes`` also, per example and baseline, the derivative ``dg/dalpha`` at the
Gauss-Legendre nodes of the largest step count: its largest weighted contribution against the
median, which shows whether one node carries the error (a narrow dip of ``g`` along the path).

    python -m benchmarks.bench_ig_convergence --examples 2 --steps 64 256 --nodes
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from benchmarks.common import RESULTS, commit, load_average, machine
from heta_fast import HETA
from heta_fast.evaluation import methods
from heta_fast.evaluation.data import load_examples, prepare
from heta_fast.sink import sink_token_id

# name -> (prepend the sink token, rows of the baseline kept at their own embedding)
BASELINES = {"mean": (False, 0), "mean_first_row_kept": (False, 1), "bos_prepended_kept": (True, 1)}


def node_derivatives(heta, ids: list[int], target: int, baseline: torch.Tensor, steps: int) -> dict:
    """``dg/dalpha`` at the ``steps`` Gauss-Legendre nodes of ``[0, 1]``; the largest weighted
    contribution ``w dg/dalpha`` and where it is, the median ``|dg/dalpha|`` and the nodes' sum."""
    E = methods.embeddings(heta, ids)
    g = methods.target_log_prob(heta, target)
    x, w = np.polynomial.legendre.leggauss(steps)
    alphas = torch.tensor((x + 1) / 2, dtype=E.dtype)
    derivative = []
    for chunk in alphas.split(16):
        chunk = chunk.clone().requires_grad_(True)
        value = g(baseline + chunk[:, None, None] * (E - baseline)).sum()
        derivative.append(torch.autograd.grad(value, chunk)[0])
    d = torch.cat(derivative).double()
    contribution = d * torch.tensor(w / 2)
    top = int(contribution.abs().argmax())
    return {"alpha_of_largest": float(alphas[top]), "largest_derivative": float(d[top]),
            "largest_contribution": float(contribution[top]), "median_abs_derivative": float(d.abs().median()),
            "sum_of_contributions": float(contribution.sum())}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=2)
    parser.add_argument("--steps", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--nodes", action="store_true", help="also the node derivatives at the largest step count")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "ig_convergence.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    heta = HETA.from_pretrained(None)
    sink = sink_token_id(heta.tokenizer, heta.lm.model)
    runs = []
    for example in load_examples(None, args.examples):
        prepared = prepare(example, "predicted", heta.tokenizer, heta.lm)
        for name, (prepend, keep) in BASELINES.items():
            ids = [sink, *prepared.ids] if prepend else list(prepared.ids)
            baseline = methods.mean_embedding_baseline(heta, ids, keep)
            for steps in args.steps:
                start = time.perf_counter()
                _, delta, change = methods.integrated_gradients_with_delta(heta, ids, prepared.target, baseline, steps)
                run = {"example": example.id, "baseline": name, "steps": steps, "delta": delta, "change": change,
                       "relative": delta / max(abs(change), 1e-12), "seconds": time.perf_counter() - start}
                runs.append(run)
                print(json.dumps(run), flush=True)
            if args.nodes:
                nodes = node_derivatives(heta, ids, prepared.target, baseline, max(args.steps))
                runs.append({"example": example.id, "baseline": name, "nodes": max(args.steps), **nodes})
                print(json.dumps(runs[-1]), flush=True)
    result = {"machine": machine(), "commit": commit(), "load_average": load_average(), "runs": runs}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
