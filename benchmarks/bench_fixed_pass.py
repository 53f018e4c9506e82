"""Fixed-pass ``I`` (issue 24): each ``I`` estimator's fidelity to exact ``I``, and what a fixed-pass preset costs.

    python -m benchmarks.bench_fixed_pass fidelity [--records eval_records/records_exact.jsonl] [--limit 20]
    python -m benchmarks.bench_fixed_pass cost [--lengths 128 256 512 1024] [--occlusion-sample 64]

``fidelity``: the embedded SmolLM2-135M-Instruct on the examples whose exact HETA parts are stored
in ``--records`` (``heta_exact_M``, ``_S``, ``_I``: the spec's options, m = 10, seed 0, the
``predicted`` protocol; eval_records/records_exact.jsonl holds 20). Each example is prepared again
(the stored target must come back), then every ``I`` candidate runs (Gauss-Newton ``S`` on the 8
most probable tokens beside it, as the ``fast`` preset) and is compared, by Spearman correlation
and top-5 overlap, three ways:

- ``I``: the candidate's ``I`` against the stored exact ``I``;
- ``exact S``: scores ``M (S / sum S + I / sum I) / 2`` from the stored exact ``M``, ``S`` and the
  candidate's ``I``, against the same from the stored exact ``I`` (the ``I`` estimator's effect on
  the library's normalised mix alone);
- ``preset``: the preset's own scores (its ``M``, Gauss-Newton ``S``, the candidate's ``I``, normalised
  mix, no sink) against the stored exact parts under the same mix and sink.

``cost``: seconds at each context length ``n`` (the shipped prompts cut to ``n + 1`` tokens), in one
process: one forward + backward of the target's log-probability (the unit the issue counts in), each
preset, and Captum's occlusion (``FeatureAblation``, one full forward per token). Occlusion and the
``fast`` preset beyond 256 tokens are timed on ``--occlusion-sample`` of their per-token passes and
scaled to ``n`` (each pass costs the same for occlusion; for ``fast``, sampled positions spread over
the context).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.common import RESULTS, SHIPPED_PROMPTS, commit, load_average, machine, prompt_ids, save_json
from heta_fast import HETA, HETAConfig
from heta_fast.components import Components
from heta_fast.evaluation.data import load_examples, prepare
from heta_fast.evaluation.metrics import spearman
from heta_fast.mix import mixed

CANDIDATES = {  # name -> HETAConfig changes on top of the Gauss-Newton preset
    "exact": {"information": "exact"},
    "linearised": {"information": "linearised"},
    "screened:8": {"information": "screened", "screened_tokens": 8},
    "screened:16": {"information": "screened", "screened_tokens": 16},
    "screened:32": {"information": "screened", "screened_tokens": 32},
}


def top_overlap(a: torch.Tensor, b: torch.Tensor, k: int = 5) -> float:
    k = min(k, a.numel())
    return len(set(a.topk(k).indices.tolist()) & set(b.topk(k).indices.tolist())) / k


def compare(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    return {"spearman": spearman(a, b), "top5": top_overlap(a, b)}


def normalised(M: torch.Tensor, S: torch.Tensor, I: torch.Tensor) -> torch.Tensor:
    return mixed(Components(M.double(), S.double(), I.double()), 0.5, 0.5, "normalised")


def stored_parts(path: Path) -> dict[str, dict]:
    """``example -> {"target", "n", "M", "S", "I"}`` from the exact parts in ``path``."""
    parts: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        part = {"heta_exact_M": "M", "heta_exact_S": "S", "heta_exact_I": "I"}.get(record["method"])
        if part is not None:
            entry = parts.setdefault(record["example"], {"target": record["target"], "n": record["n"]})
            entry[part] = torch.tensor(record["scores"], dtype=torch.float64)
    return {k: v for k, v in parts.items() if {"M", "S", "I"} <= v.keys()}


def fidelity(args: argparse.Namespace) -> dict:
    heta = HETA.from_pretrained()
    stored = stored_parts(args.records)
    examples = {e.id: e for e in load_examples(None)}
    base = HETAConfig.paper(samples=10, seed=0).replace(mix="normalised", hessian="gauss_newton", hessian_topk=8)
    rows = []
    for example_id in list(stored)[:args.limit]:
        ref = stored[example_id]
        prepared = prepare(examples[example_id], "predicted", heta.tokenizer, heta.lm)
        if prepared.target != ref["target"] or len(prepared.ids) != ref["n"]:
            raise SystemExit(f"{example_id}: prepared input differs from the stored one (target {prepared.target} "
                             f"vs {ref['target']}, n {len(prepared.ids)} vs {ref['n']})")
        exact_scores = normalised(ref["M"], ref["S"], ref["I"])
        for name, changes in CANDIDATES.items():
            config = base.replace(**changes)
            start = time.perf_counter()
            a = heta.attribute(prepared.ids, target_pos=len(prepared.ids), target_token=prepared.target, config=config)
            seconds = time.perf_counter() - start
            row = {"example": example_id, "n": len(prepared.ids), "candidate": name, "seconds": seconds,
                   "I": compare(a.I, ref["I"]),
                   "exact_S": compare(normalised(ref["M"], ref["S"], a.I), exact_scores),
                   "preset": compare(normalised(a.M, a.S, a.I), exact_scores)}
            rows.append(row)
            print(f"{example_id} n={row['n']:<4} {name:<12} {seconds:6.2f} s  I rho {row['I']['spearman']:.3f} "
                  f"top5 {row['I']['top5']:.2f} | exact S rho {row['exact_S']['spearman']:.3f} "
                  f"top5 {row['exact_S']['top5']:.2f} | preset rho {row['preset']['spearman']:.3f} "
                  f"top5 {row['preset']['top5']:.2f}", flush=True)
    summary = {}
    for name in CANDIDATES:
        mine = [r for r in rows if r["candidate"] == name]
        summary[name] = {f"{view}_{metric}_median": statistics.median(r[view][metric] for r in mine)
                         for view in ("I", "exact_S", "preset") for metric in ("spearman", "top5")}
        summary[name]["seconds_median"] = statistics.median(r["seconds"] for r in mine)
        print(name, {k: round(v, 3) for k, v in summary[name].items()})
    return {"rows": rows, "summary": summary, "examples": len(rows) // len(CANDIDATES)}


# --- cost ------------------------------------------------------------------------------------------


def target_log_prob(heta: HETA, ids: torch.Tensor):
    """``E [n, d] -> log P[y]`` at the last context row (the function Captum and the unit time use)."""
    lm, y = heta.lm, int(ids[-1])

    def f(E: torch.Tensor) -> torch.Tensor:
        hidden = lm.hidden(E).last_hidden_state[:, -1]
        return torch.log_softmax(lm.unembed(hidden).float(), dim=-1)[:, y]

    return f


def forward_backward(heta: HETA, ids: torch.Tensor) -> None:
    E = heta.lm.embed(ids[:-1])[None].detach().requires_grad_(True)
    target_log_prob(heta, ids)(E).sum().backward()


def occlusion(heta: HETA, ids: torch.Tensor, sample: int | None) -> float:
    """Seconds of Captum's FeatureAblation over every context token, or over ``sample`` of them scaled to ``n``."""
    from captum.attr import FeatureAblation

    n = ids.numel() - 1
    keep = n if sample is None else min(sample, n)
    E = heta.lm.embed(ids[:-1])[None, :keep].detach() if keep < n else heta.lm.embed(ids[:-1])[None].detach()
    rest = heta.lm.embed(ids[:-1])[None, keep:].detach()
    f = target_log_prob(heta, ids)

    def forward(part: torch.Tensor) -> torch.Tensor:  # the whole context every time: rows past keep unmasked
        return f(torch.cat([part, rest.expand(part.shape[0], -1, -1)], dim=1))

    mask = torch.arange(keep)[None, :, None].expand(1, keep, E.shape[-1])
    start = time.perf_counter()
    with torch.no_grad():
        FeatureAblation(forward).attribute(E, feature_mask=mask, perturbations_per_eval=1)
    return (time.perf_counter() - start) * n / keep


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


PRESETS = {  # name -> config; all with the library's defaults (sink bos, normalised mix), m = 10
    "fast": HETAConfig.preset("fast"),
    "fixed": HETAConfig.preset("fixed"),
    "fixed, linearised I": HETAConfig.preset("fixed", information="linearised"),
}


def cost(args: argparse.Namespace) -> dict:
    heta = HETA.from_pretrained()
    text = SHIPPED_PROMPTS.read_text()
    rows = []
    for n in args.lengths:
        ids = prompt_ids(heta.tokenizer, text, n)
        forward_backward(heta, ids)  # warm-up
        unit = statistics.median(timed(lambda: forward_backward(heta, ids)) for _ in range(max(3, args.repeats)))
        row = {"n": n, "forward_backward_s": unit, "load_before": load_average()}
        for name, config in PRESETS.items():
            if name == "fast" and n > args.full_fast:
                continue  # its n masked forwards: see the occlusion column for that growth
            row[name] = statistics.median(timed(lambda c=config: heta.attribute(ids, config=c))
                                          for _ in range(args.repeats))
        sample = None if n <= args.full_occlusion else args.occlusion_sample
        row["occlusion_s"] = occlusion(heta, ids, sample)
        row["occlusion_sampled"] = sample
        rows.append(row)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    return {"rows": rows}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fid = sub.add_parser("fidelity", help="each I candidate against stored exact parts")
    fid.add_argument("--records", type=Path, default=Path("eval_records/records_exact.jsonl"))
    fid.add_argument("--limit", type=int, default=20)
    cst = sub.add_parser("cost", help="seconds per attribution against one forward + backward and occlusion")
    cst.add_argument("--lengths", type=int, nargs="+", default=[128, 256, 512, 1024])
    cst.add_argument("--repeats", type=int, default=3)
    cst.add_argument("--full-fast", type=int, default=256, help="time the fast preset up to this length")
    cst.add_argument("--full-occlusion", type=int, default=256, help="run occlusion in full up to this length")
    cst.add_argument("--occlusion-sample", type=int, default=64)
    for p in (fid, cst):
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    figures = {"command": " ".join(sys.argv), **commit(), "machine": machine(), "threads": args.threads,
               "load_start": load_average()}
    figures.update(fidelity(args) if args.command == "fidelity" else cost(args))
    figures["load_end"] = load_average()
    save_json(args.out or RESULTS / f"fixed_pass_{args.command}.json", figures)
    return figures


if __name__ == "__main__":
    main()
