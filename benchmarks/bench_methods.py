"""Seconds per attribution: heta_fast's presets against Captum's occlusion and integrated gradients.

    python -m benchmarks.bench_methods                                  # 32 64 128 256 tokens, m = 10
    python -m benchmarks.bench_methods --lengths 32 64 --repeats 3 --threads 2
    python -m benchmarks.bench_methods --released PATH --released-entry MODULE:FUNCTION

One process, one model (the embedded SmolLM2-135M-Instruct unless ``--model``), the prompt of
``benchmarks.common.prompt_text`` (the shipped prompts, or ``--curated PATH``, cut to ``n + 1`` tokens; the last
token is the target).
Each length runs every method ``--repeats`` times, interleaved (method A, B, ..., then again),
and records the median seconds, the ratio to Captum ``FeatureAblation`` (one masked forward per
token: the cost of occlusion), the ratio of the released code to heta_fast's exact path, and the
load average before each run. A method whose time, scaled from the previous length by
``(n / n_prev)^2``, would pass ``--budget`` seconds is skipped at that length and says so
(never the occlusion baseline itself).

Methods:

- ``heta exact``, ``heta low_rank:32``, ``heta gauss_newton:8``: ``HETA.attribute`` with the
  ``torch`` backend, m = ``--samples``.
- ``captum FeatureAblation``: each context token's embedding row set to zero, one forward each,
  target log-probability at the prediction row (Captum's ``FeatureAblation`` with a per-token
  feature mask).
- ``captum IntegratedGradients``: the same function, zero baseline, ``--ig-steps`` steps in one batch.
- ``released``: with ``--released PATH`` (a checkout of the released HETA code) and
  ``--released-entry MODULE:FUNCTION``, ``FUNCTION(model, tokenizer, input_ids [1, n + 1], t, m)``
  imported from ``PATH``; the released repository has no stable library entry point, so the
  caller names the few lines that run its pipeline on one input.

Captum's runs use the model's ``sdpa`` attention where the model has it (first-order methods need
no double backward; it is their fastest CPU kernel); heta_fast's runs use its own eager kernels.
Captum is the optional extra ``eval`` (``pip install -e ".[eval]"``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
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
from heta_fast import HETA, HETAConfig

DEFAULT_OUT = RESULTS / "methods.json"
OCCLUSION = "captum FeatureAblation"
EXACT = "heta exact"
PRESETS = {EXACT: {"hessian": "exact"}, "heta low_rank:32": {"hessian": "low_rank", "hessian_rank": 32},
           "heta gauss_newton:8": {"hessian": "gauss_newton", "hessian_topk": 8}}

Method = Callable[[torch.Tensor], torch.Tensor]  # ids [n + 1] -> attribution [n]


def _captum():
    try:
        import captum.attr
    except ImportError as error:
        raise ImportError("the Captum baselines need captum: pip install -e \".[eval]\"") from error
    return captum.attr


@contextlib.contextmanager
def attention_kernel(model, name: str) -> Iterator[None]:
    """Run ``model`` with attention implementation ``name`` inside the block, restored after."""
    previous = model.config._attn_implementation
    if not hasattr(model, "set_attn_implementation") or previous == name:
        yield
        return
    try:
        model.set_attn_implementation(name)
    except (ValueError, ImportError):  # the model does not support it: keep its own
        yield
        return
    try:
        yield
    finally:
        model.set_attn_implementation(previous)


def target_log_prob(heta: HETA, y: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``E [B, n, d] -> log P(y) [B]`` at the last row (the prediction row ``p``)."""
    lm = heta.lm

    def forward(embeddings: torch.Tensor) -> torch.Tensor:
        hidden = lm.hidden(embeddings).last_hidden_state[:, -1]
        return torch.log_softmax(lm.unembed(hidden).float(), dim=-1)[:, y]
    return forward


def captum_methods(heta: HETA, ig_steps: int = 50) -> dict[str, Method]:
    attr = _captum()

    def inputs(ids: torch.Tensor):
        E = heta.lm.embed(ids[:-1])[None]  # [1, n, d]
        mask = torch.arange(E.shape[1], device=E.device)[None, :, None].expand_as(E)
        return E, mask, target_log_prob(heta, int(ids[-1]))

    def occlusion(ids: torch.Tensor) -> torch.Tensor:
        E, mask, f = inputs(ids)
        with attention_kernel(heta.lm.model, "sdpa"), torch.no_grad():
            a = attr.FeatureAblation(f).attribute(E, baselines=0.0, feature_mask=mask)
        return a[0, :, 0].detach()  # every entry of a token's row holds that token's value

    def integrated_gradients(ids: torch.Tensor) -> torch.Tensor:
        E, _, f = inputs(ids)
        with attention_kernel(heta.lm.model, "sdpa"):
            a = attr.IntegratedGradients(f).attribute(E, baselines=torch.zeros_like(E), n_steps=ig_steps)
        return a[0].sum(-1).detach()

    return {OCCLUSION: occlusion, f"captum IntegratedGradients ({ig_steps} steps)": integrated_gradients}


def heta_methods(heta: HETA, samples: int) -> dict[str, Method]:
    def preset(options: dict) -> Method:
        def method(ids: torch.Tensor) -> torch.Tensor:
            config = HETAConfig.paper(backend="torch", samples=samples, **options)  # the definition's sink and mix
            return heta.attribute(ids, config=config).scores
        return method
    return {name: preset(options) for name, options in PRESETS.items()}


def released_method(heta: HETA, path: Path, entry: str, samples: int) -> dict[str, Method]:
    """The released code's pipeline, ``entry`` = ``MODULE:FUNCTION`` importable from ``path``."""
    module_name, _, function_name = entry.partition(":")
    if not module_name or not function_name:
        raise ValueError(f"--released-entry must be MODULE:FUNCTION, got {entry!r}")
    sys.path.insert(0, str(Path(path).resolve()))
    function = getattr(importlib.import_module(module_name), function_name)

    def method(ids: torch.Tensor) -> torch.Tensor:
        with attention_kernel(heta.lm.model, "eager"):
            return function(heta.lm.model, heta.tokenizer, ids[None].to(heta.lm.device), len(ids) - 1, samples)
    return {"released": method}


def time_methods(methods: dict[str, Method], ids: torch.Tensor, repeats: int, skip: Sequence[str] = (),
                 log: Callable[[str], None] = print) -> dict:
    """Interleaved timings: ``{name: {"seconds": [...], "loads": [...], "median": s}}``; ``skip`` names are left out."""
    out = {name: {"seconds": [], "loads": []} for name in methods if name not in skip}
    for _ in range(repeats):
        for name in out:
            out[name]["loads"].append(load_average())
            start = time.perf_counter()
            methods[name](ids)
            out[name]["seconds"].append(time.perf_counter() - start)
            log(f"  {name}: {out[name]['seconds'][-1]:.2f} s (load {out[name]['loads'][-1]})")
    for row in out.values():
        row["median"] = statistics.median(row["seconds"])
    return out


def run(lengths: Sequence[int] = (32, 64, 128, 256), samples: int = 10, repeats: int = 1, budget: float = 900.0,
        ig_steps: int = 50, threads: int | None = None, model: str | None = None, data: Path | None = None,
        released: Path | None = None, released_entry: str | None = None) -> dict:
    if threads:
        torch.set_num_threads(threads)
    heta = HETA.from_pretrained(model)
    methods = {**heta_methods(heta, samples), **captum_methods(heta, ig_steps)}
    if released is not None:
        methods.update(released_method(heta, released, released_entry or "", samples))
    text, source = prompt_text(data)
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
           "code": commit(), "prompt": source, "samples": samples, "repeats": repeats, "budget": budget,
           "lengths": {}}
    previous: dict[str, tuple[int, float]] = {}
    for n in lengths:
        ids = prompt_ids(heta.tokenizer, text, n)
        # the occlusion baseline always runs: every ratio is taken against it
        skip = {name: last * (n / n_last) ** 2 for name, (n_last, last) in previous.items()
                if last * (n / n_last) ** 2 > budget and name != OCCLUSION}
        print(f"n = {n}" + (f" (skipping {', '.join(skip)})" if skip else ""), flush=True)
        rows = time_methods(methods, ids, repeats, skip)
        occlusion = rows.get(OCCLUSION, {}).get("median")
        for name, row in rows.items():
            previous[name] = (n, row["median"])
            if occlusion:
                row["vs_occlusion"] = row["median"] / occlusion
        if "released" in rows and EXACT in rows:
            rows["released"]["vs_exact"] = rows["released"]["median"] / rows[EXACT]["median"]
        for name, predicted in skip.items():
            rows[name] = {"skipped": f"predicted {predicted:.0f} s > budget {budget:.0f} s"}
        out["lengths"][str(n)] = rows
    return out


def format_table(out: dict) -> str:
    names = list(dict.fromkeys(name for rows in out["lengths"].values() for name in rows))
    lines = ["| method | " + " | ".join(f"n = {n}" for n in out["lengths"]) + " |",
             "|---|" + "---:|" * len(out["lengths"])]
    for name in names:
        cells = []
        for rows in out["lengths"].values():
            row = rows.get(name, {})
            if "median" in row:
                ratio = f" ({row['vs_occlusion']:.2f}x occl.)" if "vs_occlusion" in row else ""
                cells.append(f"{row['median']:.2f}{ratio}")
            else:
                cells.append("skipped" if "skipped" in row else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_methods", description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[32, 64, 128, 256], help="context sizes n")
    parser.add_argument("--samples", type=int, default=10, help="m, probes per position (heta_fast)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per method and length (median)")
    parser.add_argument("--budget", type=float, default=900.0,
                        help="skip a method at a length where its n^2-scaled time would pass this many seconds")
    parser.add_argument("--ig-steps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--model", default=None, help="model name or path (default: the embedded SmolLM2)")
    add_curated_argument(parser)
    parser.add_argument("--released", type=Path, default=None, help="a checkout of the released HETA code")
    parser.add_argument("--released-entry", default=None,
                        help="MODULE:FUNCTION in --released called as FUNCTION(model, tokenizer, ids [1, L], t, m)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="JSON output path")
    args = parser.parse_args(argv)
    check_curated(parser, args)
    if args.released is not None and not args.released_entry:
        parser.error("--released needs --released-entry MODULE:FUNCTION")
    out = run(args.lengths, args.samples, args.repeats, args.budget, args.ig_steps, args.threads, args.model,
              args.curated, args.released, args.released_entry)
    print(format_table(out))
    save_json(args.out, out)
    return out


if __name__ == "__main__":
    main()
