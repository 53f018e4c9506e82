"""Multi-target HETA on SmolLM2-135M: what explaining 16 tokens costs against explaining one.

    python -m benchmarks.bench_multi_target                       # 64-token prompt, 16 targets
    python -m benchmarks.bench_multi_target --prompt-tokens 64 --targets 16 --repeats 5 --out /tmp/m.json

A ``--prompt-tokens`` prompt (the shipped prompts, or the curated QA text with
``--curated PATH``) is continued greedily by the model for ``--targets`` tokens; those generated
positions are the targets (what ``explain_generation`` explains). In one process, interleaved
``--repeats`` times, it times the parts that multi-target
attribution shares - the forward, the semantic flow and the KL term - for

- all targets together (``pipeline.run``),
- the first target alone and the last target alone, through the same function,
- the first target alone through the single-target torch backend (``attribute``'s path), as a
  check that the multi-target code costs nothing extra for one target.

``S`` is left out (``sensitivity=False``; zeros for the single-target path): it is computed per
target by design, so it costs ``K`` times one target's ``S`` and would only hide the shared part.
The acceptance figure is ``(forward + flow + KL of all targets) / (the same for the first
target)``, required to be at most 2. Medians over the repeats are reported; the rows of the
multi-target run are compared with the single-target runs (``M`` and ``I``) as a sanity check.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

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
from heta_fast import HETA, HETAConfig, pipeline

DEFAULT_OUT = RESULTS / "multi_target.json"
SHARED = ("forward", "semantic_flow", "kl")


def _shared_seconds(timings: dict) -> dict:
    parts = {name: timings.get(name, 0.0) for name in SHARED}
    parts["total"] = sum(parts.values())
    return parts


def _many(heta: HETA, ids: torch.Tensor, positions: list[int], config: HETAConfig) -> tuple[dict, list]:
    """Timings and per-target components of the multi-target path, ``S`` skipped."""
    parts, timings = pipeline.run(heta.lm, ids, positions, config, sensitivity=False)
    return timings, parts


def _single_path(heta: HETA, ids: torch.Tensor, config: HETAConfig) -> tuple[dict, object]:
    """Timings and components of one target (the pipeline's ``K = 1`` case) on ids ``[t + 1]``, ``S`` skipped."""
    (c,), timings = pipeline.run(heta.lm, ids, [ids.numel() - 1], config, sensitivity=False)
    return timings, c


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def run(prompt_tokens: int = 64, targets: int = 16, repeats: int = 5, threads: int | None = None,
        curated: Path | None = None, one_at_a_time: bool = False, log=print) -> dict:
    """Time the shared parts for ``targets`` generated tokens after a ``prompt_tokens`` prompt; a dict of figures.

    curated: the curated QA set to cut the prompt from (None: the shipped prompts).
    """
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    heta = HETA.from_pretrained()
    load_seconds = time.perf_counter() - start
    config = HETAConfig.paper(samples=1, backend="torch")
    text, source = prompt_text(curated)
    prompt = prompt_ids(heta.tokenizer, text, prompt_tokens - 1)  # exactly prompt_tokens ids
    ids = torch.tensor(heta.generate(prompt, targets, stop_at_eos=False), dtype=torch.long)
    positions = list(range(prompt_tokens, prompt_tokens + targets))
    first, last = positions[0], positions[-1]
    log(f"SmolLM2-135M loaded in {load_seconds:.1f} s; prompt {prompt_tokens} tokens, targets {first}..{last} "
        f"(greedy continuation {heta.tokenizer.decode(ids[prompt_tokens:].tolist())!r})")

    cases = {
        f"{targets} targets": lambda: _many(heta, ids, positions, config),
        "first target": lambda: _many(heta, ids, [first], config),
        "last target": lambda: _many(heta, ids, [last], config),
        "first target, single-target path": lambda: _single_path(heta, ids[:first + 1], config),
    }
    cases[f"{targets} targets"]()  # warm-up: first-call allocations and lazy imports
    samples: dict[str, list[dict]] = {name: [] for name in cases}
    results: dict[str, object] = {}
    for r in range(repeats):
        order = list(cases) if r % 2 == 0 else list(cases)[::-1]  # alternate so drift hits both sides
        for name in order:
            timings, result = cases[name]()
            samples[name].append(_shared_seconds(timings))
            results[name] = result
        log(f"repeat {r + 1}/{repeats}: " + ", ".join(f"{n} {samples[n][-1]['total']:.2f} s" for n in cases)
            + f" (load {load_average()})")
    medians = {name: {part: statistics.median(s[part] for s in runs) for part in (*SHARED, "total")}
               for name, runs in samples.items()}

    many = results[f"{targets} targets"]
    one_first = results["first target"]
    one_last = results["last target"]
    single = results["first target, single-target path"]
    agreement = {
        "first row vs first target alone (M, I)": max(_rel(many[0].M, one_first[0].M), _rel(many[0].I, one_first[0].I)),
        "last row vs last target alone (M, I)": max(_rel(many[-1].M, one_last[0].M), _rel(many[-1].I, one_last[0].I)),
        "first row vs single-target path (M, I)": max(_rel(many[0].M, single.M), _rel(many[0].I, single.I)),
    }
    ratio_first = medians[f"{targets} targets"]["total"] / medians["first target"]["total"]
    ratio_last = medians[f"{targets} targets"]["total"] / medians["last target"]["total"]
    ratio_single = medians[f"{targets} targets"]["total"] / medians["first target, single-target path"]["total"]

    log("")
    log(f"median seconds over {repeats} repeats (S excluded; forward + semantic flow + KL)")
    log(f"{'case':<36} {'forward':>9} {'flow':>9} {'kl':>9} {'total':>9}")
    for name, m in medians.items():
        log(f"{name:<36} {m['forward']:>9.3f} {m['semantic_flow']:>9.3f} {m['kl']:>9.3f} {m['total']:>9.3f}")
    log(f"{targets} targets / first target alone: {ratio_first:.2f}x  (acceptance: <= 2x: "
        f"{'met' if ratio_first <= 2 else 'MISSED'})")
    log(f"{targets} targets / last target alone:  {ratio_last:.2f}x")
    log(f"{targets} targets / first target via attribute()'s single-target path: {ratio_single:.2f}x")
    one_by_one = None
    if one_at_a_time:
        one_by_one = _one_by_one(heta, ids, positions, config)
        log(f"every target alone, one after another (timed once each): {sum(one_by_one):.2f} s, "
            f"{sum(one_by_one) / medians[f'{targets} targets']['total']:.1f}x the shared run")
    for name, err in agreement.items():
        log(f"agreement, {name}: max rel err {err:.1e}")

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "git": commit(), "model": "SmolLM2-135M-Instruct (embedded, float32, CPU)",
        "prompt_source": source, "prompt_tokens": prompt_tokens, "targets": positions,
        "generated_ids": ids[prompt_tokens:].tolist(), "samples_m": config.samples, "sensitivity": "excluded",
        "repeats": repeats, "load_average_after": load_average(), "seconds": samples, "median_seconds": medians,
        "ratio_vs_first_target": ratio_first, "ratio_vs_last_target": ratio_last,
        "ratio_vs_single_target_path": ratio_single, "acceptance_max_ratio": 2.0,
        "acceptance_met": ratio_first <= 2.0, "agreement_max_rel_err": agreement,
        "one_at_a_time_seconds": one_by_one,
    }


def _one_by_one(heta: HETA, ids: torch.Tensor, positions: list[int], config: HETAConfig) -> list[float]:
    """The shared parts' seconds if every target were explained alone (one run each)."""
    return [_shared_seconds(_many(heta, ids, [t], config)[0])["total"] for t in positions]


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--targets", type=int, default=16, help="generated tokens explained together")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--one-at-a-time", action="store_true",
                        help="also time every target alone, one after another (slow: about K single runs)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    add_curated_argument(parser)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    check_curated(parser, args)
    figures = run(args.prompt_tokens, args.targets, args.repeats, args.threads, args.curated, args.one_at_a_time)
    save_json(args.out, figures)
    return figures


if __name__ == "__main__":
    main()
