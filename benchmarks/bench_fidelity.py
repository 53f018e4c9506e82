"""Fidelity of the curvature estimators against exact ``S`` on SmolLM2-135M (torch backend).

    python -m benchmarks.bench_fidelity --curated PATH                   # the full report
    python -m benchmarks.bench_fidelity --lengths 64 --prompts 1         # a quick run, shipped prompts
    python -m benchmarks.bench_fidelity --estimators low_rank:64 gauss_newton:32 layer_subset:8
    python -m benchmarks.bench_fidelity --memory 1024                    # peak memory, 1,024 tokens

Inputs:

- curated (only with ``--curated PATH``, the paper's ``curated_qa_100.json``, not shipped):
  ``--examples`` examples (20 by default), evenly spaced over the file, under the protocol of
  docs/method.md §8 (prompt = ``input_text + "\\nAnswer:"``, target = the first token of
  ``" " + answer`` appended after it), with ``m = --samples``;
- random: ``--prompts`` windows per length of one long text (the curated text joined as one
  with ``--curated``, else the shipped prompts; as in ``bench_smollm``), each starting at a
  random token offset (seeded), cut to exactly ``n + 1`` tokens, the last one the target;
  ``m = --random-samples`` (2 by default, so that the exact ``S`` at 256 tokens runs in full in
  minutes; the estimators use the same ``m``).

On every input ``M``, ``I`` and exact ``S`` come from the torch backend's own ``components`` (its
timing of ``S`` is the exact time); each estimator then computes ``S`` alone on the same prefix
cache, timed, and its scores are ``M (beta S + gamma I)`` with the same ``M`` and ``I``. Per
estimator: Spearman correlation of the scores with exact's (median, 10th percentile), mean top-5
overlap, Spearman of ``S`` alone, the scale of ``S`` against exact (geometric mean of
``sum S / sum S_exact``), seconds for ``S``, speedup (exact seconds / estimator seconds, summed over
the same inputs) and the growth exponent of seconds in ``n`` over the random lengths. The row
``none`` is a baseline, ``S = 0`` (scores ``gamma M I``): an estimator that does not beat it adds
nothing to the ranking.

``--memory N``: one full attribution of ``N`` context tokens with ``hessian = --memory-estimator``
(default ``gauss_newton``) and ``memory_budget = --budget``; reports the process's peak resident
memory (``VmHWM`` after resetting it through ``/proc/self/clear_refs``) for the whole call and for
its stages run separately.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import random
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from benchmarks.bench_smollm import fast_hessian_sampled, growth_exponent
from benchmarks.common import (
    RESULTS,
    add_curated_argument,
    check_curated,
    commit,
    curated_examples,
    load_average,
    machine,
    prompt_ids,
    prompt_text,
)
from heta_fast import influence, pipeline
from heta_fast.api import HETA
from heta_fast.config import HETAConfig
from heta_fast.memory import MemoryBudgetWarning
from heta_fast.semantic_flow import semantic_flow
from heta_fast.sensitivity import estimate_sensitivity

DEFAULT_OUT = RESULTS / "fidelity.json"
DEFAULT_ESTIMATORS = ("low_rank:32", "gauss_newton:8", "layer_subset:4")
PARAMETER = {"low_rank": "hessian_rank", "gauss_newton": "hessian_topk", "layer_subset": "hessian_layers"}
GiB = 1 << 30

Log = Callable[[str], None]


# -- statistics ----------------------------------------------------------------------------------


def ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 1..n of ``x`` ``[n]``, ties sharing their mean rank (float64 ``[n]``)."""
    x = x.double()
    order = torch.argsort(x, stable=True)
    sorted_x = x[order]
    r = torch.empty_like(x)
    i, n = 0, x.numel()
    while i < n:
        j = i
        while j + 1 < n and sorted_x[j + 1] == sorted_x[i]:
            j += 1
        r[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return r


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of ``a`` and ``b`` ``[n]`` (Pearson of the tie-averaged ranks)."""
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denominator if denominator else float("nan")


def top_overlap(a: torch.Tensor, b: torch.Tensor, k: int = 5) -> float:
    """``|top_k(a) & top_k(b)| / k`` (``k`` capped at ``n``)."""
    k = min(k, a.numel())
    return len(set(torch.topk(a, k).indices.tolist()) & set(torch.topk(b, k).indices.tolist())) / k


def quantile(values: Sequence[float], q: float) -> float:
    return float(torch.quantile(torch.tensor(values, dtype=torch.float64), q)) if values else float("nan")


# -- inputs --------------------------------------------------------------------------------------


def curated_inputs(tokenizer, count: int, curated: Path) -> list[tuple[str, torch.Tensor]]:
    """``count`` examples of the curated set at ``curated``, evenly spaced over it: ``(id, ids [t + 1])`` each."""
    examples = curated_examples(curated)
    count = min(count, len(examples))
    picked = [examples[round(j * len(examples) / count)] for j in range(count)] if count else []
    out = []
    for e in picked:
        prompt = tokenizer(e["input_text"] + "\nAnswer:", add_special_tokens=False)["input_ids"]
        target = tokenizer(" " + e["answer"], add_special_tokens=False)["input_ids"][0]
        out.append((e["id"], torch.tensor([*prompt, target], dtype=torch.long)))
    return out


def random_inputs(tokenizer, text: str, n: int, count: int, seed: int) -> list[tuple[str, torch.Tensor]]:
    """``count`` windows of ``n + 1`` tokens of ``text`` at random offsets (seeded by ``seed`` and ``n``)."""
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    rng = random.Random(seed * 100003 + n)
    out = []
    for _ in range(count):
        start = rng.randrange(0, ids.numel() - n)
        out.append((f"random n={n} @{start}", ids[start:start + n + 1].clone()))
    return out


# -- one input -----------------------------------------------------------------------------------


def parse_estimator(spec: str) -> tuple[str, dict]:
    """``"low_rank:64"`` -> ``("low_rank", {"hessian": "low_rank", "hessian_rank": 64})``."""
    name, _, value = spec.partition(":")
    if name not in PARAMETER:
        raise ValueError(f"unknown estimator {name!r}; choose from {', '.join(PARAMETER)}")
    fields = {"hessian": name}
    if value:
        fields[PARAMETER[name]] = int(value)
    return spec, fields


def evaluate(lm, ids: torch.Tensor, config: HETAConfig, estimators: Sequence[str], budget: int) -> dict:
    """Exact components, then each estimator's ``S`` on the same inputs; metrics against exact.

    ids: ``[t + 1]``. Returns per-estimator seconds, Spearman, top-5 and scale, and exact's seconds.
    """
    exact = pipeline.components(lm, ids, config.replace(hessian="exact"))
    M, S0, I = exact.M.double(), exact.S.double(), exact.I.double()
    scores0 = M * (config.beta * S0 + config.gamma * I)
    E, y, t = lm.embed(ids), int(ids[-1]), ids.numel() - 1
    with torch.no_grad():
        key_values = lm.key_values(lm.hidden(E[None, :t], use_cache=True))
    row = {"n": t, "exact_seconds": exact.timings["hessian"], "kl_seconds": exact.timings["kl"],
           "S_exact_top": S0.topk(min(3, t)).values.tolist(), "S_exact_median": float(S0.median()),
           "I_median": float(I.median()), "estimators": {}}
    for spec in ("none", *estimators):
        if spec == "none":
            S, seconds = torch.zeros_like(S0), 0.0
        else:
            _, fields = parse_estimator(spec)
            start = time.perf_counter()
            S = estimate_sensitivity(lm, E, y, key_values, config.replace(**fields), budget).double().cpu()
            seconds = time.perf_counter() - start
        scores = M * (config.beta * S + config.gamma * I)
        row["estimators"][spec] = {
            "seconds": seconds, "spearman": spearman(scores, scores0), "top5": top_overlap(scores, scores0),
            "spearman_S": spearman(S, S0) if spec != "none" else float("nan"),
            "scale": float(S.sum() / S0.sum()) if spec != "none" else 0.0, "S_median": float(S.median())}
    return row


# -- the whole run -------------------------------------------------------------------------------


def summarise(rows: list[dict], estimators: Sequence[str]) -> dict:
    """Per estimator: the metrics over ``rows`` (one input each)."""
    out = {}
    exact_seconds = sum(r["exact_seconds"] for r in rows)
    for spec in ("none", *estimators):
        cells = [r["estimators"][spec] for r in rows]
        rho = [c["spearman"] for c in cells if not math.isnan(c["spearman"])]
        seconds = sum(c["seconds"] for c in cells)
        scales = [c["scale"] for c in cells if c["scale"] > 0]
        out[spec] = {
            "inputs": len(cells), "spearman_median": quantile(rho, 0.5), "spearman_p10": quantile(rho, 0.1),
            "top5_mean": sum(c["top5"] for c in cells) / len(cells),
            "spearman_S_median": quantile([c["spearman_S"] for c in cells if not math.isnan(c["spearman_S"])], 0.5),
            "scale_geomean": math.exp(sum(math.log(s) for s in scales) / len(scales)) if scales else 0.0,
            "seconds_mean": seconds / len(cells), "speedup": exact_seconds / seconds if seconds else None}
    out["exact"] = {"inputs": len(rows), "seconds_mean": exact_seconds / len(rows)}
    return out


def sampled_exact_seconds(lm, ids: torch.Tensor, samples: int, seed: int, positions: int = 16) -> dict:
    """Exact ``S`` seconds at ``m = samples`` estimated by timing ``positions`` positions alone.

    ``bench_smollm.fast_hessian_sampled``: each sampled position runs the fast path's own code
    alone; ``a + b rows`` is fitted and summed over all ``n`` positions (it ran within a few
    percent of, and above, the real batched run where both were measured).
    """
    E, y, t = lm.embed(ids), int(ids[-1]), ids.numel() - 1
    with torch.no_grad():
        key_values = lm.key_values(lm.hidden(E[None, :t], use_cache=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MemoryBudgetWarning)  # it runs positions one by one on purpose
        out = fast_hessian_sampled(lm, E, y, key_values, HETAConfig.paper(samples=samples, seed=seed), positions)
    return {"estimate": out["estimate"], "samples": samples, "label": out["label"]}


def run(examples: int = 20, lengths: Sequence[int] = (64, 128, 256), prompts: int = 3, samples: int = 10,
        random_samples: int = 2, estimators: Sequence[str] = DEFAULT_ESTIMATORS, seed: int = 0,
        budget: int = 4 * GiB, curated: Path | None = None, threads: int | None = None, heta=None,
        log: Log | None = None, full_m: int | None = 10) -> dict:
    """Run the fidelity comparison and return everything as a dict (see ``format_table``).

    full_m: also estimate exact ``S`` seconds at ``m = full_m`` on the first random prompt of each
    length (by sampling positions), as the method's default baseline for the speedups (None: skip).
    curated: the curated QA set; without it ``examples`` must be 0 and the random prompts are
    cut from the shipped prompts (``benchmarks.common.prompt_text``).
    """
    if examples and curated is None:
        raise ValueError(f"{examples} curated examples asked for, but no curated set given: pass --curated PATH "
                         "(curated_qa_100.json, not shipped) or --examples 0")
    if threads:
        torch.set_num_threads(threads)
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    for spec in estimators:
        parse_estimator(spec)
    if heta is None:
        log("loading SmolLM2-135M-Instruct ...")
        heta = HETA.from_pretrained()
    lm = heta.lm
    out: dict = {"benchmark": "heta_fast curvature estimators: fidelity against exact S",
                 "date": datetime.datetime.now().astimezone().isoformat(), "argv": sys.argv, **commit(),
                 "machine": machine(), "model": getattr(lm.config, "_name_or_path", ""),
                 "estimators": list(estimators), "samples_curated": samples, "samples_random": random_samples,
                 "budget": budget, "seed": seed, "lengths": list(lengths), "prompts": prompts,
                 "load_average_start": load_average(), "sets": {}}
    started = time.perf_counter()
    warm = torch.tensor(heta.tokenizer("Warm up the kernels once.", add_special_tokens=False)["input_ids"])
    evaluate(lm, warm, HETAConfig.paper(samples=1, seed=seed), estimators, budget)
    text, source = prompt_text(curated)
    out["prompt_source"] = source
    sets = [("curated", curated_inputs(heta.tokenizer, examples, curated), samples)] if examples else []
    sets += [(f"random n={n}", random_inputs(heta.tokenizer, text, n, prompts, seed), random_samples)
             for n in lengths if prompts]
    for name, inputs, m in sets:
        config = HETAConfig.paper(samples=m, seed=seed)
        rows = []
        for label, ids in inputs:
            load = load_average()
            row = evaluate(lm, ids, config, estimators, budget)
            row.update(label=label, samples=m, load_average=[load, load_average()])
            rows.append(row)
            log(f"{name} {label} (n={row['n']}, m={m}): exact S {row['exact_seconds']:.1f} s; "
                + ", ".join(f"{spec} {c['seconds']:.1f} s rho {c['spearman']:.3f} top5 {c['top5']:.1f}"
                            for spec, c in row["estimators"].items()) + f"; load {row['load_average'][1]}")
        out["sets"][name] = {"samples": m, "rows": rows, "summary": summarise(rows, estimators)}
        if full_m and name.startswith("random") and full_m != m:
            sampled = sampled_exact_seconds(lm, inputs[0][1], full_m, seed)
            sampled["input"] = inputs[0][0]
            out["sets"][name]["exact_full_m"] = sampled
            log(f"{name}: exact S at m={full_m} ~{sampled['estimate']:.1f} s ({sampled['label']})")
    randoms = [(n, out["sets"][f"random n={n}"]["summary"]) for n in lengths if f"random n={n}" in out["sets"]]
    out["growth_exponent"] = {
        spec: growth_exponent([n for n, _ in randoms], [s[spec]["seconds_mean"] for _, s in randoms])
        for spec in ("exact", *estimators)} if len(randoms) > 1 else {}
    out["load_average_end"] = load_average()
    out["wall_seconds"] = time.perf_counter() - started
    return out


def format_table(out: dict) -> str:
    """The summary as Markdown: one table per input set, then the growth exponents."""
    lines = [f"commit {out['commit'][:10]}{' (dirty)' if out.get('dirty') else ''}, "
             f"budget {out['budget'] / GiB:.1f} GiB, seed {out['seed']}"]
    for name, block in out["sets"].items():
        s = block["summary"]
        lines += ["", f"**{name}** ({s['exact']['inputs']} inputs, m = {block['samples']}; exact S "
                      f"{s['exact']['seconds_mean']:.2f} s mean)", "",
                  "| estimator | Spearman median | Spearman p10 | top-5 | Spearman of S | scale of S | "
                  "S seconds | speedup |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        full = block.get("exact_full_m")
        if full:
            lines[-2] += f" speedup vs exact m = {full['samples']} |"
            lines[-1] += "---:|"
            first = block["rows"][0]
        for spec, c in s.items():
            if spec == "exact":
                continue
            label = "none (S = 0)" if spec == "none" else spec
            speed = "-" if c["speedup"] is None else f"{c['speedup']:.1f}x"
            rho_s = "-" if math.isnan(c["spearman_S_median"]) else f"{c['spearman_S_median']:.3f}"
            lines.append(f"| {label} | {c['spearman_median']:.3f} | {c['spearman_p10']:.3f} | {c['top5_mean']:.2f} | "
                         f"{rho_s} | {c['scale_geomean']:.3g} | {c['seconds_mean']:.2f} | {speed} |"
                         + (_full_speedup(full, first["estimators"][spec]["seconds"]) if full else ""))
        if full:
            lines.append(f"\nexact S at m = {full['samples']}: ~{full['estimate']:.0f} s on {full['input']} "
                         f"({full['label']}); its speedups use the estimators' seconds on that same prompt.")
    growth = out.get("growth_exponent") or {}
    if growth:
        lines += ["", "Growth exponent of S seconds in n (random prompts, mean seconds per length):", "",
                  "| " + " | ".join(growth) + " |", "|" + "---:|" * len(growth),
                  "| " + " | ".join("-" if v is None else f"{v:.2f}" for v in growth.values()) + " |"]
    return "\n".join(lines)


def _full_speedup(full: dict, seconds: float) -> str:
    return f" {full['estimate'] / seconds:.0f}x |" if seconds else " - |"


# -- peak memory ---------------------------------------------------------------------------------


def reset_peak() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (Linux ``clear_refs``); False where refused."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_status() -> dict:
    """``VmRSS`` and ``VmHWM`` of this process, bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def peak_of(fn) -> dict:
    """Run ``fn()``; its seconds, RSS before, peak RSS during (``VmHWM``) and the rise."""
    gc.collect()
    reset = reset_peak()
    before = rss_status()["VmRSS"]
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    peak = rss_status()["VmHWM"]
    return {"seconds": seconds, "rss_before": before, "peak_rss": peak, "rise": peak - before, "reset": reset}


def memory_run(n: int = 1024, estimator: str = "gauss_newton", budget: int = 4 * GiB, samples: int = 10,
               seed: int = 0, curated: Path | None = None, heta=None, log: Log | None = None,
               kl_stage: bool = False) -> dict:
    """Peak RSS of one ``n``-token attribution (and of its stages alone) under ``memory_budget = budget``.

    Stages alone: the shared forward with the semantic flow, ``S``, and (``kl_stage``) ``I``.
    """
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    if heta is None:
        log("loading SmolLM2-135M-Instruct ...")
        heta = HETA.from_pretrained()
    lm = heta.lm
    _, fields = parse_estimator(estimator)
    config = HETAConfig.paper(samples=samples, seed=seed, memory_budget=budget, backend="torch", **fields)
    text, _ = prompt_text(curated)
    ids = prompt_ids(heta.tokenizer, text, n)
    E, y = lm.embed(ids), int(ids[-1])
    stages: dict = {}
    shared: dict = {}

    def forward():
        with torch.no_grad(), lm.capture_values(config.value_source) as values:
            o = lm.hidden(E[None, :n], output_attentions=True, use_cache=True)
            shared["log_P"] = torch.log_softmax(lm.unembed(o.last_hidden_state[0, -1]).double(), dim=-1)
            shared["kv"] = lm.key_values(o)
            semantic_flow(lm, o.attentions, values, config.flow_layers)

    log(f"n={n}: shared forward (attentions kept) + semantic flow ...")
    stages["forward_and_flow"] = peak_of(forward)
    log(f"n={n}: S ({estimator}) ...")
    stages["hessian"] = peak_of(lambda: estimate_sensitivity(lm, E, y, shared["kv"], config, budget))
    if kl_stage:  # as long as the whole call at 1,024 tokens (~15 min here), and inside it anyway
        log(f"n={n}: KL ...")
        stages["kl"] = peak_of(lambda: influence.kl_information(lm, E, shared["log_P"], shared["kv"], config, budget))
    shared.clear()
    log(f"n={n}: whole attribution ...")
    whole = peak_of(lambda: heta.attribute(ids, config=config))
    attention_bytes = lm.num_layers * lm.num_heads * n * n * 4
    return {"n": n, "estimator": estimator, "budget": budget, "samples": samples, **commit(), "machine": machine(),
            "date": datetime.datetime.now().astimezone().isoformat(), "whole": whole, "stages": stages,
            "attention_probabilities_bytes": attention_bytes, "load_average": load_average()}


def format_memory(out: dict) -> str:
    mib = 1 << 20
    lines = [f"n = {out['n']}, hessian = {out['estimator']}, memory_budget = {out['budget'] / GiB:.1f} GiB, "
             f"m = {out['samples']}, commit {out['commit'][:10]}{' (dirty)' if out.get('dirty') else ''}", "",
             "| part | seconds | RSS before (MiB) | peak RSS (MiB) | rise (MiB) |", "|---|---:|---:|---:|---:|"]
    for name, p in [("whole attribution", out["whole"]), *out["stages"].items()]:
        lines.append(f"| {name} | {p['seconds']:.1f} | {p['rss_before'] / mib:.0f} | {p['peak_rss'] / mib:.0f} | "
                     f"{p['rise'] / mib:.0f} |")
    lines.append(f"\nAttention probabilities of the shared forward (N H T^2 fp32): "
                 f"{out['attention_probabilities_bytes'] / mib:.0f} MiB")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_fidelity", description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=None,
                        help="curated examples, evenly spaced (default: 20 with --curated, else none)")
    parser.add_argument("--lengths", type=int, nargs="*", default=[64, 128, 256], help="random-prompt lengths n")
    parser.add_argument("--prompts", type=int, default=3, help="random prompts per length (0: none)")
    parser.add_argument("--samples", type=int, default=10, help="m on the curated examples")
    parser.add_argument("--random-samples", type=int, default=2, help="m on the random prompts")
    parser.add_argument("--estimators", nargs="+", default=list(DEFAULT_ESTIMATORS),
                        help="name[:k] with k the rank / top-K / layers (e.g. low_rank:64)")
    parser.add_argument("--budget", type=float, default=4.0, help="memory_budget in GiB")
    parser.add_argument("--full-samples", type=int, default=10,
                        help="also estimate exact S seconds at this m on one random prompt per length (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    add_curated_argument(parser)
    parser.add_argument("--memory", type=int, default=None, metavar="N",
                        help="instead: peak memory of one N-token attribution")
    parser.add_argument("--memory-estimator", default="gauss_newton", help="estimator for --memory")
    parser.add_argument("--memory-kl-stage", action="store_true", help="with --memory: also time I alone")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default benchmarks/results/...)")
    args = parser.parse_args(argv)
    check_curated(parser, args)
    budget = int(args.budget * GiB)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory:
        out = memory_run(args.memory, args.memory_estimator, budget, args.samples, args.seed, args.curated,
                         kl_stage=args.memory_kl_stage)
        print(format_memory(out))
        path = args.out or DEFAULT_OUT.with_name(f"memory_{args.memory}.json")
    else:
        examples = args.examples if args.examples is not None else (20 if args.curated else 0)
        if examples and args.curated is None:
            parser.error(f"--examples {examples} needs the curated set: pass --curated PATH (curated_qa_100.json, "
                         "not shipped) or leave --examples out")
        out = run(examples, args.lengths, args.prompts, args.samples, args.random_samples, args.estimators,
                  args.seed, budget, args.curated, full_m=args.full_samples or None)
        print(format_table(out))
        path = args.out or DEFAULT_OUT
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, default=float) + "\n")
    print(f"\nwrote {path}")
    return out


if __name__ == "__main__":
    main()
