"""``heta-fast eval``: faithfulness of HETA and baselines on curated QA and known facts.

    heta-fast eval --protocol predicted --out eval-run
    heta-fast eval --protocol facts_distractor --methods heta_gn_sink_mix,saliency --out eval-facts
    heta-fast eval --data PATH/TO/curated_qa_100.json --protocol answer --methods heta_gauss_newton,saliency

``curated_qa_100.json`` is the paper's curated QA set (Apache-2.0), published with the HETA paper's
code release and not shipped here; pass the path of your copy.
"""

from __future__ import annotations

import argparse
import sys

from heta_fast.api import HETA
from heta_fast.config import MASKS
from heta_fast.evaluation import data as data_module
from heta_fast.evaluation import methods as methods_module
from heta_fast.evaluation import runner
from heta_fast.evaluation.data import PROTOCOLS


def add_eval_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="measure faithfulness of HETA and baselines on curated QA and known facts",
        description="Run HETA variants and baselines (Captum's integrated gradients, saliency, input x gradient, "
                    "occlusion; attention rollout, last-layer attention, random) on curated QA examples or "
                    "known facts and score them: Soft-NC/Soft-NS, comprehensiveness/sufficiency (AOPC), the "
                    "first token's share; DSA and F1 on curated QA; on facts the subject's share and top-1 "
                    "(and against a distractor subject). Writes records.jsonl (resumable), "
                    "summary_PROTOCOL.{json,md} and figure_PROTOCOL.png to --out. "
                    "Needs: pip install 'heta_fast[eval]'.")
    parser.add_argument("--data", metavar="PATH", default=None,
                        help="JSON/JSONL examples in the curated schema or the paper's (its curated_qa_100.json), "
                             "or, for the fact protocols, in the known-facts schema; default: the project's own "
                             "set (heta_fast/data/curated_qa.jsonl or known_facts.jsonl)")
    parser.add_argument("--protocol", choices=PROTOCOLS, default="predicted",
                        help="answer: the answer's first token after '\\nAnswer:'; predicted: the model's own "
                             "next token; chat: through the chat template; facts: a fact's completion prompt, "
                             "the model's own next token, rows it answers wrong skipped; facts_distractor: the "
                             "same after a sentence about another subject (default predicted)")
    parser.add_argument("--methods", default=None, metavar="A,B,...",
                        help="comma-separated method names (default: all; 'list' prints them)")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="the first N examples only (for facts: N rows read, before the filter)")
    parser.add_argument("--slow-limit", type=int, default=20, metavar="N",
                        help="slow methods (exact-Hessian HETA, the low_rank and layer_subset estimators, "
                             "integrated gradients) on the first N examples only (default 20)")
    parser.add_argument("--samples", "-m", type=int, default=10, metavar="M", help="HETA probes per token (10)")
    parser.add_argument("--mask", choices=MASKS, default="zero", help="mask of the faithfulness metrics (zero)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the soft masks (0)")
    parser.add_argument("--sensitivity", type=int, default=0, metavar="N",
                        help="also the sensitivity metric on the first N examples (3 noisy runs each; default 0)")
    parser.add_argument("--model", metavar="NAME_OR_PATH", default=None,
                        help="a transformers causal LM with its tokenizer (default: the embedded model, as for "
                             "'attribute')")
    parser.add_argument("--out", default="heta-eval", metavar="DIR", help="output folder (default heta-eval)")
    parser.add_argument("--no-figure", action="store_true", help="skip the PNG")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress lines on stderr")
    parser.set_defaults(handler=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    if args.methods == "list":
        print("\n".join(methods_module.available()))
        return 0
    names = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    if names is not None:
        methods_module.resolve(names, args.samples)
    for flag in ("limit", "slow_limit", "samples", "sensitivity"):
        value = getattr(args, flag)
        if value is not None and value < (1 if flag in ("limit", "samples") else 0):
            raise ValueError(f"--{flag.replace('_', '-')} must be >= {1 if flag in ('limit', 'samples') else 0}, "
                             f"got {value}")
    data_module.load(args.protocol, args.data, args.limit)  # bad data fails before the model loads
    log = None if args.quiet else (lambda line: print(f"heta-fast: {line}", file=sys.stderr, flush=True))
    heta = HETA.from_pretrained(args.model)
    summary = runner.evaluate(heta, args.data, protocol=args.protocol, methods=names, out=args.out, limit=args.limit,
                              slow_limit=args.slow_limit, mask=args.mask, seed=args.seed, samples=args.samples,
                              sensitivity_examples=args.sensitivity, plot=not args.no_figure, log=log)
    print(runner.markdown(summary, f"{args.protocol} protocol"))
    return 0
