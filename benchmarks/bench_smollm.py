"""SmolLM2-135M: the reference and the fast backend per component, against their FLOP counts.

    python -m benchmarks.bench_smollm                       # 32, 64, 128, 256 tokens, m = 10
    python -m benchmarks.bench_smollm --lengths 32 64 --hvp-sample 0 --out /tmp/smollm.json

For each context length ``n`` both backends explain the same deterministic prompt (the shipped
prompts, or with ``--curated PATH`` the text of the paper's curated QA set, cut to exactly
``n + 1`` tokens; the last token is the target). Per component it
records seconds, the FLOPs ``heta_fast.flops`` counts for that way of working, the achieved
GFLOP/s, and the fraction of the fp32 matmul peak measured in the same run; then speedups and the
growth exponent of time in ``n``.

Exact HETA's Hessian is ``n m`` HVPs, so both backends' Hessians can be estimated by sampling:

- reference (``--hvp-sample K``): one graph is built and reused, so every HVP costs the same; ``K``
  random ``(i, k)`` probes are timed and the median scaled to ``n m`` (build time added once).
- fast (``--position-sample K``): position ``i`` costs about ``a + b (n - i)`` (it runs rows
  ``i .. p``). Position 0 is timed alone first; when ``0.5 (n + 1)`` times that exceeds
  ``--full-budget`` seconds, ``K`` stratified positions are timed, each alone (batch of one),
  ``a, b`` are fitted by least squares and summed over all ``n`` positions. Otherwise the real
  batched Hessian runs in full.

Every extrapolated figure says so in the table and the JSON. ``run()`` is the entry point for
other callers (``heta-fast bench``); ``main(argv)`` is the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from unittest import mock

import torch

from benchmarks.common import (
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
from heta_fast import kl, memory, reference
from heta_fast.allocator import retained_heap
from heta_fast.api import HETA
from heta_fast.backends import resolve
from heta_fast.config import HETAConfig
from heta_fast.flops import ModelSizes, component_flops
from heta_fast.memory import default_budget
from heta_fast.rng import rademacher
from heta_fast.sensitivity import exact

DEFAULT_OUT = RESULTS / "smollm.json"
COMPONENTS = ("forward", "semantic_flow", "hessian", "kl")
SELECTABLE = ("semantic_flow", "hessian", "kl")  # the fast path's shared forward always runs

Log = Callable[[str], None]


# -- machine ----------------------------------------------------------------------------------


def matmul_peak(size: int = 2048, repeats: int = 8) -> float:
    """Best fp32 GFLOP/s of ``repeats`` ``size x size`` matmuls (after two warm-ups)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(2):
        a @ b
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2.0 * size**3 / best / 1e9


# -- sampled Hessians --------------------------------------------------------------------------


def reference_hessian_sampled(lm, E: torch.Tensor, y: int, config: HETAConfig, count: int, seed: int = 0) -> dict:
    """Time ``count`` of the reference's ``n m`` HVPs and scale to all of them.

    Every HVP runs through the same graph, so they cost the same; the median time is used, so
    an HVP slowed by another process on the machine does not inflate the estimate.

    Mirrors ``reference.hessian_sensitivity``: one forward with full logits, one gradient with
    ``create_graph``, then one ``autograd.grad`` with ``retain_graph`` per probe, read at block
    ``i``. E: ``[t + 1, d]``. Returns seconds (``estimate``), the build time, the per-HVP times.
    """
    T, d = E.shape
    t, p = T - 1, T - 2
    pairs = [(i, k) for i in range(t) for k in range(config.samples)]
    chosen = random.Random(seed).sample(pairs, count)
    start = time.perf_counter()
    E = E.detach().clone().requires_grad_(True)
    logits = lm.logits(E[None])[0]
    g = torch.log_softmax(logits[p].float(), dim=-1)[y]
    (grad,) = torch.autograd.grad(g, E, create_graph=True)
    build = time.perf_counter() - start
    times = []
    for i, k in chosen:
        start = time.perf_counter()
        r = torch.zeros_like(E)
        r[i] = rademacher(config.seed, torch.tensor([i]), torch.tensor([k]), d, dtype=E.dtype, device=E.device)[0]
        (Hr,) = torch.autograd.grad(grad, E, grad_outputs=r, retain_graph=True)
        Hr[i].detach().float().abs().sum().item()
        times.append(time.perf_counter() - start)
    mean = sum(times) / len(times)
    median = statistics.median(times)
    estimate = build + len(pairs) * median
    std = math.sqrt(sum((x - mean) ** 2 for x in times) / len(times))
    return {"estimate": estimate, "build": build, "hvp_median": median, "hvp_mean": mean, "hvp_std": std,
            "hvp_seconds": times, "timed": len(times), "of": len(pairs),
            "label": f"extrapolated from {len(times)} of {len(pairs)} HVPs (median HVP time x n*m + build)"}


class _Shifted:
    """A ``CausalLM`` whose prefix cache is ``offset`` positions longer than asked for.

    ``exact.hessian_sensitivity(_Shifted(lm, i), E[i:], ...)`` then processes position ``i`` of
    the original input first, on the real cached prefix ``0 .. i - 1`` (same rows, same keys,
    same rotary positions): the fast path's own code, started at position ``i``.
    """

    def __init__(self, lm, offset: int):
        self._lm, self._offset = lm, offset

    def __getattr__(self, name):
        return getattr(self._lm, name)

    def prefix_cache(self, key_values, length: int, batch: int):
        return self._lm.prefix_cache(key_values, self._offset + length, batch)


class _Stop(Exception):
    pass


def fast_position(lm, E: torch.Tensor, y: int, key_values, config: HETAConfig, i: int) -> tuple[float, torch.Tensor]:
    """Seconds for the fast Hessian of position ``i`` alone (batch of one), and its ``S_i``: ``[]``.

    key_values: the prefix cache of rows ``0 .. p`` (``CausalLM.key_values``).
    """
    def shifted_probes(seed, positions, samples, d, dtype=None, device=None):
        return rademacher(seed, positions + i, samples, d, dtype=dtype, device=device)

    result = {}

    def stop(_stage, _done, _total):
        raise _Stop

    def reduce(hvp, positions, n, samples):
        out = exact.block_l1_mean(hvp, positions, n, samples)
        result["S"] = out[0].detach().clone()
        return out

    # as the backend's own run (heap settings of ``pipeline.run``, all m probes in one
    # batched backward when the default budget allows it), but one position per batch
    budget = config.memory_budget or default_budget(lm.device)
    start = time.perf_counter()
    with (contextlib.suppress(_Stop), retained_heap(config.retain_heap, lm.device),
          mock.patch.object(memory, "batch_size", lambda *_args, **_kwargs: 1)):
        exact.hessian_sensitivity(_Shifted(lm, i), E[i:], y, key_values, config, budget,
                                    shifted_probes, reduce, stop)
    return time.perf_counter() - start, result["S"]


def fast_hessian_sampled(lm, E: torch.Tensor, y: int, key_values, config: HETAConfig, count: int,
                         first: float | None = None) -> dict:
    """Time ``count`` stratified positions alone, fit ``a + b rows``, sum over all ``n`` positions."""
    t = E.shape[0] - 1
    count = max(2, min(count, t))
    positions = sorted({round(x * (t - 1) / (count - 1)) for x in range(count)})
    times = {}
    for i in positions:
        if i == 0 and first is not None:
            times[0] = first
        else:
            times[i], _ = fast_position(lm, E, y, key_values, config, i)
    rows = [t - i for i in positions]
    secs = [times[i] for i in positions]
    mean_r, mean_s = sum(rows) / len(rows), sum(secs) / len(secs)
    var = sum((r - mean_r) ** 2 for r in rows)
    slope = sum((r - mean_r) * (s - mean_s) for r, s in zip(rows, secs, strict=True)) / var if var else 0.0
    intercept = mean_s - slope * mean_r
    estimate = t * intercept + slope * t * (t + 1) / 2
    return {"estimate": estimate, "intercept": intercept, "per_row": slope, "timed": len(positions), "of": t,
            "positions": positions, "seconds": secs,
            "label": f"extrapolated from {len(positions)} of {t} positions (each alone, fit a + b*rows)"}


# -- one length --------------------------------------------------------------------------------


def _stub(n_positions: int):
    def zeros(*_args, **_kwargs):
        return torch.zeros(n_positions)
    return zeros


def measure_reference(lm, ids: torch.Tensor, config: HETAConfig, components: Sequence[str], hvp_sample: int,
                      seed: int) -> dict:
    """Seconds per component of the reference backend (its own functions, one after another)."""
    E, y = lm.embed(ids), int(ids[-1])
    n = ids.numel() - 1
    seconds, notes = {"forward": 0.0}, {}
    if "semantic_flow" in components:
        start = time.perf_counter()
        reference.semantic_flow(lm, E, config)
        seconds["semantic_flow"] = time.perf_counter() - start
    if "hessian" in components:
        if hvp_sample and hvp_sample < n * config.samples:
            sampled = reference_hessian_sampled(lm, E, y, config, hvp_sample, seed)
            seconds["hessian"], notes["hessian"] = sampled["estimate"], sampled
        else:
            marks = []
            start = time.perf_counter()
            reference.hessian_sensitivity(lm, E, y, config, lambda _s, _d, _t: marks.append(time.perf_counter()))
            seconds["hessian"] = time.perf_counter() - start
            per = [b - a for a, b in zip(marks, marks[1:], strict=False)]  # m HVPs each (the first has the build)
            if per:
                mean = sum(per) / len(per)
                notes["hessian_full"] = {"per_position_mean": mean, "per_position_std": math.sqrt(
                    sum((x - mean) ** 2 for x in per) / len(per))}
    if "kl" in components:
        start = time.perf_counter()
        reference.kl_information(lm, E, config)
        seconds["kl"] = time.perf_counter() - start
    return {"seconds": seconds, "notes": notes}


def measure_fast(lm, ids: torch.Tensor, config: HETAConfig, components: Sequence[str], backend: str,
                 position_sample: int, full_budget: float, log: Log, check_sampling: bool = True) -> dict:
    """Seconds per component of a fast backend: its own ``components`` run, timings as it reports them.

    Components not asked for (and a Hessian that is sampled instead) are replaced by zeros for
    that run; a sampled Hessian is then estimated with ``fast_hessian_sampled``. With
    ``check_sampling`` a Hessian that runs in full is also estimated by sampling, so the
    extrapolation can be compared with the real run (``notes["hessian_sampling_check"]``).
    """
    E, y = lm.embed(ids), int(ids[-1])
    n = ids.numel() - 1
    notes: dict = {}
    sample_hessian = False
    key_values = None
    if "hessian" in components and position_sample:
        with torch.no_grad():
            key_values = lm.key_values(lm.hidden(E[None, :n], use_cache=True))
        first, _ = fast_position(lm, E, y, key_values, config, 0)
        predicted = first * (n + 1) / 2
        notes["hessian_predicted_full"] = predicted
        sample_hessian = predicted > full_budget and position_sample < n
        log(f"    fast Hessian: position 0 alone {first:.2f} s, all positions alone ~{predicted:.0f} s -> "
            + ("sampled" if sample_hessian else "full run"))
    patches = []
    if "hessian" not in components or sample_hessian:
        patches.append(mock.patch.object(exact, "hessian_sensitivity", _stub(n)))
    if "kl" not in components:
        patches.append(mock.patch.object(kl, "kl_information", _stub(n)))
    with contextlib.ExitStack() as stack:
        for patch in patches:
            stack.enter_context(patch)
        result = resolve(backend, lm).components(lm, ids, config)
    seconds = {name: float(result.timings.get(name, 0.0)) for name in COMPONENTS}
    for name in ("hessian", "kl"):
        if name not in components:
            seconds.pop(name)
    if sample_hessian:
        sampled = fast_hessian_sampled(lm, E, y, key_values, config, position_sample, first)
        seconds["hessian"], notes["hessian"] = sampled["estimate"], sampled
    elif check_sampling and key_values is not None and position_sample < n:
        sampled = fast_hessian_sampled(lm, E, y, key_values, config, position_sample, first)
        sampled["full_seconds"] = seconds["hessian"]
        sampled["estimate_over_full"] = sampled["estimate"] / seconds["hessian"]
        notes["hessian_sampling_check"] = sampled
        log(f"    sampling check: estimate {sampled['estimate']:.1f} s, full run {seconds['hessian']:.1f} s")
    if "semantic_flow" not in components:
        seconds.pop("semantic_flow")
    return {"seconds": seconds, "notes": notes}


# -- the whole run -----------------------------------------------------------------------------


def growth_exponent(lengths: Sequence[int], seconds: Sequence[float]) -> float | None:
    """Least-squares slope of ``log t`` against ``log n`` (None with fewer than two points)."""
    points = [(math.log(n), math.log(s)) for n, s in zip(lengths, seconds, strict=True) if s and s > 0]
    if len(points) < 2:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    var = sum((x - mx) ** 2 for x, _ in points)
    return sum((x - mx) * (y - my) for x, y in points) / var if var else None


def run(lengths: Sequence[int] = (32, 64, 128, 256), samples: int = 10,
        backends: Sequence[str] = ("reference", "torch"), hvp_sample: int = 320, position_sample: int = 16,
        full_budget: float = 600.0, components: Sequence[str] = SELECTABLE, seed: int = 0, heta=None,
        curated: Path | None = None, check_sampling: bool = True, threads: int | None = None,
        log: Log | None = None) -> dict:
    """Benchmark the backends on SmolLM2-135M (or ``heta``'s model) and return the results as a dict.

    lengths: context sizes ``n``; samples: ``m``; backends: ``reference`` and/or fast ones
    (``torch``, ``triton`` when registered); hvp_sample: reference HVPs timed when ``n m`` exceeds
    it (0: all); position_sample: fast-Hessian positions timed when the full run is predicted to
    take more than ``full_budget`` seconds (0: always run all); components: any of
    ``semantic_flow``, ``hessian``, ``kl``; check_sampling: also estimate a fast Hessian that ran
    in full by sampling, to test the extrapolation; curated: the curated QA set to cut the
    prompts from (None: the shipped prompts, ``benchmarks.common.prompt_text``); threads:
    ``torch.set_num_threads`` (None: leave as is). See ``format_table`` for printing.
    """
    if threads:
        torch.set_num_threads(threads)
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    unknown = set(components) - set(SELECTABLE)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}; choose from {', '.join(SELECTABLE)}")
    if heta is None:
        log("loading SmolLM2-135M-Instruct ...")
        heta = HETA.from_pretrained()
    lm = heta.lm
    config = HETAConfig.paper(samples=samples, seed=seed)
    text, source = prompt_text(curated)
    sizes = ModelSizes.of(lm)
    out: dict = {
        "benchmark": "heta_fast SmolLM2 components", "date": datetime.datetime.now().astimezone().isoformat(),
        "argv": sys.argv, **commit(), "machine": machine(), "model": getattr(lm.config, "_name_or_path", ""),
        "sizes": sizes.__dict__, "samples": samples, "seed": seed, "prompt_source": source,
        "lengths": list(lengths), "backends": list(backends), "components": list(components),
        "hvp_sample": hvp_sample, "position_sample": position_sample, "full_budget": full_budget,
        "load_average_start": load_average(), "results": [],
    }
    started = time.perf_counter()
    log("warming up ...")
    warm = prompt_ids(heta.tokenizer, text, 8)
    for backend in backends:
        resolve(backend, lm).components(lm, warm, HETAConfig.paper(samples=1))
    out["peak_gflops_start"] = matmul_peak()
    log(f"fp32 matmul peak (2048^3): {out['peak_gflops_start']:.1f} GFLOP/s")
    for n in lengths:
        ids = prompt_ids(heta.tokenizer, text, n)
        for backend in backends:
            log(f"n={n} {backend} ...")
            load = load_average()
            if backend == "reference":
                measured = measure_reference(lm, ids, config, components, hvp_sample, seed)
            else:
                measured = measure_fast(lm, ids, config, components, backend, position_sample, full_budget, log,
                                        check_sampling)
            flops = component_flops(sizes, n, samples, backend=backend)
            seconds = measured["seconds"]
            if set(components) == set(SELECTABLE):
                seconds["end_to_end"] = sum(seconds[name] for name in COMPONENTS)
                flops["end_to_end"] = sum(flops[name] for name in COMPONENTS)
            flops = {name: flops[name] for name in seconds}
            rate = {name: flops[name] / seconds[name] / 1e9 for name in seconds if seconds[name] > 0 and flops[name]}
            row = {"n": n, "backend": backend, "seconds": seconds, "flops": flops, "gflops": rate,
                   "extrapolated": {name: note["label"] for name, note in measured["notes"].items()
                                    if name in COMPONENTS and isinstance(note, dict) and "label" in note},
                   "notes": measured["notes"], "load_average": [load, load_average()]}
            out["results"].append(row)
            log("    " + ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items()))
    out["peak_gflops_end"] = matmul_peak()
    out["peak_gflops"] = max(out["peak_gflops_start"], out["peak_gflops_end"])
    out["load_average_end"] = load_average()
    out["wall_seconds"] = time.perf_counter() - started
    for row in out["results"]:
        row["fraction_of_peak"] = {k: v / out["peak_gflops"] for k, v in row["gflops"].items()}
    out["speedups"] = speedups(out)
    out["growth_exponent"] = {
        backend: {name: growth_exponent(*zip(*[(r["n"], r["seconds"][name]) for r in out["results"]
                                                 if r["backend"] == backend], strict=True))
                  for name in _names(out)}
        for backend in backends}
    return out


def _names(out: dict) -> list[str]:
    names = [name for name in (*COMPONENTS, "end_to_end") if all(name in r["seconds"] for r in out["results"])]
    return names


def speedups(out: dict) -> dict:
    """``{fast backend: {n: {component: reference seconds / fast seconds}}}``."""
    rows = {(r["backend"], r["n"]): r for r in out["results"]}
    result: dict = {}
    for backend in out["backends"]:
        if backend == "reference":
            continue
        for n in out["lengths"]:
            ref, fast = rows.get(("reference", n)), rows.get((backend, n))
            if ref is None or fast is None:
                continue
            result.setdefault(backend, {})[str(n)] = {
                name: ref["seconds"][name] / fast["seconds"][name] for name in fast["seconds"]
                if name in ref["seconds"] and fast["seconds"][name] > 0 and ref["seconds"][name] > 0}
    return result


def format_table(out: dict) -> str:
    """The results as a Markdown table (``*`` marks extrapolated figures)."""
    peak = out["peak_gflops"]
    lines = [f"m = {out['samples']}, fp32 matmul peak {peak:.0f} GFLOP/s (best 2048^3 matmul in this run), "
             f"commit {out['commit'][:10]}{' (dirty)' if out.get('dirty') else ''}", "",
             "| n | backend | component | seconds | GFLOP | GFLOP/s | % of peak | speedup |",
             "|---:|---|---|---:|---:|---:|---:|---:|"]
    ups = out.get("speedups", {})
    notes = []
    for row in out["results"]:
        for name, secs in row["seconds"].items():
            if secs == 0 and name == "forward":
                continue  # the reference has no shared forward
            mark = ""
            label = row["extrapolated"].get(name) or (
                next(iter(row["extrapolated"].values())) if name == "end_to_end" and row["extrapolated"] else None)
            if label:
                mark = "*"
                note = f"n={row['n']} {row['backend']} {name}: {label}"
                if note not in notes:
                    notes.append(note)
            rate = row["gflops"].get(name)
            up = ups.get(row["backend"], {}).get(str(row["n"]), {}).get(name)
            gflop = row["flops"][name] / 1e9
            lines.append(f"| {row['n']} | {row['backend']} | {name} | {secs:.3f}{mark} | {gflop:.1f} | "
                         + (f"{rate:.1f} | {100 * rate / peak:.0f}% |" if rate else "- | - |")
                         + (f" {up:.1f}x |" if up else " |"))
    growth = out.get("growth_exponent", {})
    if growth:
        lines += ["", "Growth exponent of time in n (least squares on log t vs log n):", "",
                  "| backend | " + " | ".join(_names(out)) + " |", "|---|" + "---:|" * len(_names(out))]
        for backend, values in growth.items():
            cells = [("-" if values.get(name) is None else f"{values[name]:.2f}") for name in _names(out)]
            lines.append(f"| {backend} | " + " | ".join(cells) + " |")
    if notes:
        lines += ["", "\\* extrapolated (end-to-end includes the extrapolated Hessian):", ""]
        lines += [f"- {note}" for note in notes]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_smollm", description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 128, 256], help="context sizes n")
    parser.add_argument("--samples", type=int, default=10, help="m, probes per position")
    parser.add_argument("--backends", nargs="+", default=["reference", "torch"])
    parser.add_argument("--components", nargs="+", default=list(SELECTABLE), choices=SELECTABLE)
    parser.add_argument("--hvp-sample", type=int, default=320,
                        help="reference: time K random HVPs of n*m and extrapolate when n*m > K (0: run all)")
    parser.add_argument("--position-sample", type=int, default=16,
                        help="fast path: time K stratified positions and extrapolate when the full Hessian is "
                             "predicted to exceed --full-budget (0: always run all)")
    parser.add_argument("--full-budget", type=float, default=600.0, help="seconds; see --position-sample")
    parser.add_argument("--no-check-sampling", action="store_true",
                        help="do not also estimate a fully run fast Hessian by sampling")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    add_curated_argument(parser)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    args = parser.parse_args(argv)
    check_curated(parser, args)
    out = run(lengths=args.lengths, samples=args.samples, backends=args.backends, hvp_sample=args.hvp_sample,
              position_sample=args.position_sample, full_budget=args.full_budget, components=args.components,
              seed=args.seed, curated=args.curated, check_sampling=not args.no_check_sampling, threads=args.threads)
    print(format_table(out))
    save_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
