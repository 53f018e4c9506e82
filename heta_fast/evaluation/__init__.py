"""Faithfulness evaluation of HETA against baselines on curated QA (issue 11) and known facts (issue 25).

    from heta_fast import HETA, evaluate
    summary = evaluate(HETA.from_pretrained(), protocol="predicted", out="eval-run")
    summary = evaluate(HETA.from_pretrained(), protocol="facts_distractor", methods=["saliency"], out="eval-facts")

Modules: ``data`` (examples, facts, protocols), ``metrics`` (one function per metric), ``methods``
(HETA variants and baselines, ``(heta, prompt_ids, target) -> scores [n]``), ``runner`` (the
loop, resumable JSONL, bootstrap summary, figure), ``cli`` (``heta-fast eval``).
"""

from heta_fast.evaluation.runner import evaluate

__all__ = ["evaluate"]
