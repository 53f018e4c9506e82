"""The evaluation loop: examples x methods -> per-example JSONL, a bootstrap summary, a figure.

Each (example, method) pair is one JSON line in ``records.jsonl``, written as soon as it is
done; a run started again with the same output folder skips the pairs already there, so a
stopped run resumes. ``summary.json``/``summary.md`` hold per method and metric the mean over
examples and a 95% percentile-bootstrap interval (``BOOTSTRAP`` resamples of the examples,
seeded); ``figure.png`` plots the main metrics with those intervals.

Under a fact protocol (``data.FACT_PROTOCOLS``) each row also gets one filter record,
``{"example", "protocol", "method": None, "relation", "kept", "target", "target_token", "answer"}``
(and ``plain_token``, the greedy token without the distractor, under ``facts_distractor``),
written when the row is first prepared: a row the model answers wrong is skipped (no method
runs on it) and, on a resumed run, not prepared again; the summary counts kept rows of all rows
from these records. Alignment metrics are per kind of row: DSA and F1 for curated examples,
the subject metrics for facts; a record carries only its kind's.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import transformers

from heta_fast.evaluation import metrics
from heta_fast.evaluation.data import FACT_PROTOCOLS, Example, Fact, load, piece, prepare
from heta_fast.evaluation.methods import BASELINES, LAST_IG_DELTA, available, is_slow, resolve

BOOTSTRAP = 1000
CURATED_METRICS = ("dsa", "f1")  # need a curated example's segments and important words
FACT_METRICS = ("subject_mass", "subject_top1", "subject_over_distractor",  # need a fact's subjects
                "subject_beats_distractor")
METRICS = ("soft_nc", "soft_ns", "soft_c_za", "soft_s_za", "comprehensiveness", "sufficiency", "lds", *CURATED_METRICS,
           "first_share", *FACT_METRICS)
LOWER_IS_BETTER = frozenset({"sufficiency", "sensitivity", "first_share", "seconds"})
FIGURE_METRICS = ("dsa", "subject_mass", "subject_over_distractor", "comprehensiveness", "sufficiency", "soft_nc",
                  "soft_ns", "f1", "subject_top1", "lds")  # those the summary has
SEED_PAIR = ("heta_exact", "heta_exact_seed1")
FIDELITY_REFERENCE = "heta_exact"
# Metrics on which an estimator is read against exact HETA's own seed-to-seed spread (issue 14).
GAP_METRICS = ("comprehensiveness", "sufficiency", "dsa", "subject_mass", "soft_nc", "soft_ns")  # those both have
RECORDS = "records.jsonl"


def score_example(heta, prepared, scores: torch.Tensor, scorer: metrics.Scorer, seed: int) -> dict:
    """Every metric of one method's ``scores`` ``[n]`` on one prepared example: the faithfulness
    metrics always; DSA and F1 where it has curated segments; the subject metrics where it is a
    fact (the two distractor ones under ``facts_distractor`` only)."""
    c = prepared.context
    out = {
        "soft_nc": metrics.soft_nc(scorer, scores, c),
        "soft_ns": metrics.soft_ns(scorer, scores, c),
        "soft_c_za": metrics.soft_comprehensiveness_za(scorer, scores, c, seed=seed),
        "soft_s_za": metrics.soft_sufficiency_za(scorer, scores, c, seed=seed),
        "comprehensiveness": metrics.comprehensiveness(scorer, scores, c),
        "sufficiency": metrics.sufficiency(scorer, scores, c),
        "first_share": metrics.first_token_share(scores, c),
        "lds": metrics.lds(scorer, scores, metrics.word_sources(prepared.tokens, c), seed=seed),
        "context_share": float(metrics.shares(scores, range(len(prepared.ids)))[c].sum()),
    }
    if prepared.support is not None:
        out["dsa"] = metrics.dsa(scores, c, prepared.support, prepared.distractor)
        out["f1"] = metrics.f1(scores, c, prepared.important)
    if prepared.subject is not None:
        out["subject_mass"] = metrics.subject_mass(scores, c, prepared.subject)
        out["subject_top1"] = metrics.subject_top1(scores, c, prepared.subject)
    if prepared.distractor_subject is not None:
        other = prepared.distractor_subject
        out["subject_over_distractor"] = metrics.subject_over_distractor(scores, c, prepared.subject, other)
        out["subject_beats_distractor"] = metrics.subject_beats_distractor(scores, c, prepared.subject, other)
    return out


def filter_record(row: Fact, prepared, tokenizer) -> dict:
    """A fact row's filter record (``method`` None): kept or not, the model's greedy token and,
    under ``facts_distractor``, its greedy token without the distractor (``plain_token``)."""
    record = {"example": row.id, "protocol": prepared.protocol, "method": None, "relation": row.relation,
              "kept": prepared.kept, "target": prepared.target, "target_token": piece(tokenizer, prepared.target),
              "answer": row.answer}
    if prepared.plain_target is not None:
        record["plain_token"] = piece(tokenizer, prepared.plain_target)
    return record


def _read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut short when a run was killed: redone
                continue
    return out


def _drop_cut_line(path: Path) -> None:
    """Truncate a records file after its last newline (a killed run may leave half a line)."""
    if not path.is_file():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def run(heta, examples: Sequence[Example | Fact], protocol: str, method_names: Sequence[str], out: str | Path, *,
        slow_limit: int = 20, mask: str = "zero", seed: int = 0, samples: int = 10, sensitivity_examples: int = 0,
        log: Callable[[str], None] | None = None) -> list[dict]:
    """Evaluate ``method_names`` on ``examples`` (facts under a fact protocol) under ``protocol``;
    append to ``out/records.jsonl``.

    Under a fact protocol a row the model answers wrong is skipped (its filter record says so)
    and the counts below are over kept rows. Slow methods (``methods.is_slow``: exact HETA, the
    other estimators, integrated gradients) run on the first ``slow_limit`` examples only.
    ``sensitivity_examples``: on that many first examples, also the sensitivity metric
    (3 noisy repeats, sigma 0.01). Returns all records of the folder under ``protocol``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / RECORDS
    _drop_cut_line(path)
    existing = [r for r in _read_records(path) if r.get("protocol") == protocol]
    done = {(r["example"], r["method"]) for r in existing}
    verdicts = {r["example"]: r["kept"] for r in existing if r["method"] is None}
    methods = resolve(method_names, samples)
    filtered = protocol in FACT_PROTOCOLS
    k = -1  # the index among kept examples
    with path.open("a") as sink:
        def write(record: dict) -> None:
            sink.write(json.dumps(record) + "\n")
            sink.flush()

        for number, example in enumerate(examples, 1):
            prepared = None
            if filtered and example.id not in verdicts:
                prepared = prepare(example, protocol, heta.tokenizer, heta.lm)
                verdicts[example.id] = prepared.kept
                write(filter_record(example, prepared, heta.tokenizer))
            if filtered and not verdicts[example.id]:
                if log and prepared is not None:
                    said = repr(piece(heta.tokenizer, prepared.target))
                    if prepared.plain_target is not None:
                        said += f" ({piece(heta.tokenizer, prepared.plain_target)!r} without the distractor)"
                    log(f"{protocol} {number}/{len(examples)} {example.id}: skipped, the model says {said}, "
                        f"the answer is {example.answer!r}")
                continue
            k += 1
            todo = [name for name in methods if (example.id, name) not in done
                    and not (is_slow(name) and k >= slow_limit)]
            if not todo:
                continue
            prepared = prepared or prepare(example, protocol, heta.tokenizer, heta.lm)
            scorer = metrics.Scorer(heta.lm, prepared.ids, prepared.target, mask=mask, seed=seed)
            for name in todo:
                method = methods[name]
                start = time.perf_counter()
                scores = method(heta, prepared.ids, prepared.target).detach().float().cpu()
                seconds = time.perf_counter() - start
                record = {"example": example.id, "protocol": protocol, "method": name, "n": len(prepared.ids),
                          "context": len(prepared.context), "target": prepared.target,
                          "target_token": heta.tokenizer.decode([prepared.target]),
                          "target_prob": scorer.p,
                          "target_rank": int((scorer.log_P > scorer.log_P[prepared.target]).sum()) + 1,
                          "seconds": seconds, **score_example(heta, prepared, scores, scorer, seed),
                          "scores": [round(float(x), 7) for x in scores]}
                if name == "integrated_gradients":
                    record.update(ig_delta=LAST_IG_DELTA["delta"], ig_change=LAST_IG_DELTA["change"])
                share = getattr(method, "sink_share", None)
                if share is not None:
                    record["sink_share"] = share(heta, prepared.ids, prepared.target)
                if k < sensitivity_examples:
                    record["sensitivity"] = metrics.sensitivity(method, heta, prepared.ids, prepared.target,
                                                                prepared.context, seed=seed)
                write(record)
            if log:
                log(f"{protocol} {number}/{len(examples)} {example.id}: {len(todo)} methods, n={len(prepared.ids)}")
    return [r for r in _read_records(path) if r.get("protocol") == protocol]


def bootstrap(values: Sequence[float], resamples: int = BOOTSTRAP, seed: int = 0) -> tuple[float, float, float]:
    """``(mean, lo, hi)``: the mean and its 95% percentile-bootstrap interval (NaN values dropped)."""
    x = torch.tensor([v for v in values if v == v], dtype=torch.float64)
    if x.numel() == 0:
        return float("nan"), float("nan"), float("nan")
    index = torch.randint(0, x.numel(), (resamples, x.numel()), generator=torch.Generator().manual_seed(seed))
    means = x[index].mean(dim=1)
    return float(x.mean()), float(means.quantile(0.025)), float(means.quantile(0.975))


def summarise(records: Sequence[dict]) -> dict:
    """Per method: count, each metric's ``(mean, lo, hi)``, IG's completeness error, the sink's
    share, seed stability and fidelity to exact HETA: the Spearman of the scores per example and,
    per metric of ``GAP_METRICS``, ``|metric(method) - metric(heta_exact)|`` per example
    (``gap_vs_exact``). The seed pair's gap is the seed floor: an estimator whose gap is no larger
    is as faithful as exact HETA is to itself under another seed.

    Filter records (a fact protocol's, ``method`` None) give ``rows``: ``{"kept": K, "of": N}``
    and the same per relation (``rows_by_relation``)."""
    verdicts = [r for r in records if r["method"] is None]
    records = [r for r in records if r["method"] is not None]
    by_method: dict[str, list[dict]] = {}
    for r in records:
        by_method.setdefault(r["method"], []).append(r)
    by_key = {(r["method"], r["example"]): r for r in records}
    table = {}
    for name, rows in by_method.items():
        entry = {"examples": len(rows)}
        for metric in (*METRICS, "sensitivity", "seconds", "target_prob", "sink_share", "context_share"):
            values = [r[metric] for r in rows if r.get(metric) is not None]
            if values:
                entry[metric] = bootstrap(values)
        if name == "integrated_gradients":
            relative = [r["ig_delta"] / max(abs(r["ig_change"]), 1e-12) for r in rows]
            entry["ig_delta"] = bootstrap([r["ig_delta"] for r in rows])
            entry["ig_relative_delta_median"] = float(torch.tensor(relative).median())
        if name.startswith("heta_") and name != FIDELITY_REFERENCE:
            pairs = [(r, by_key[(FIDELITY_REFERENCE, r["example"])]) for r in rows
                     if (FIDELITY_REFERENCE, r["example"]) in by_key]
            if pairs:
                entry["spearman_vs_exact"] = bootstrap([metrics.spearman(torch.tensor(r["scores"]),
                                                                         torch.tensor(e["scores"])) for r, e in pairs])
                entry["gap_vs_exact"] = {m: bootstrap([abs(r[m] - e[m]) for r, e in pairs]) for m in GAP_METRICS
                                         if all(r.get(m) is not None and e.get(m) is not None for r, e in pairs)}
                entry["gap_examples"] = len(pairs)
        table[name] = entry
    out = {"methods": table}
    if SEED_PAIR[1] in table:
        out["seed_stability"] = table[SEED_PAIR[1]].get("spearman_vs_exact")
        out["seed_floor"] = table[SEED_PAIR[1]].get("gap_vs_exact")
    probs = [r["target_prob"] for r in by_method.get(next(iter(by_method), ""), [])]
    if probs:
        p = torch.tensor(probs)
        out["target_prob_median"] = float(p.median())
        ranks = [r["target_rank"] for r in by_method[next(iter(by_method))]]
        out["target_rank_median"] = float(torch.tensor(ranks, dtype=torch.float64).median())
        out["target_top1"] = sum(1 for x in ranks if x == 1)
        out["examples"] = len(probs)
    if verdicts:
        out["rows"] = {"kept": sum(1 for r in verdicts if r["kept"]), "of": len(verdicts)}
        relations: dict[str, dict[str, int]] = {}
        for r in verdicts:
            counts = relations.setdefault(r.get("relation", ""), {"kept": 0, "of": 0})
            counts["kept"] += bool(r["kept"])
            counts["of"] += 1
        out["rows_by_relation"] = dict(sorted(relations.items()))
    return out


def _present(names: Sequence[str], entries) -> list[str]:
    """``names`` without the per-kind metrics (``CURATED_METRICS``, ``FACT_METRICS``, ``subject_mass``
    in a gap table) that none of ``entries`` has: a table of facts shows no DSA column, and back."""
    entries = list(entries)
    optional = {*CURATED_METRICS, *FACT_METRICS}
    return [m for m in names if m not in optional or any(e.get(m) for e in entries)]


GOAL_METRICS = ("dsa", "comprehensiveness")


def goal(summary: dict, metrics_: Sequence[str] = GOAL_METRICS) -> dict[str, list[str]]:
    """The team's goal, per HETA method: the baselines it does not beat on every metric of
    ``metrics_`` with intervals that do not overlap (its lower bound above their upper bound;
    for lower-is-better metrics the other way round). An empty list means the goal is met."""
    table = summary["methods"]
    out = {}
    for name, entry in table.items():
        if not name.startswith("heta_"):
            continue
        short = []
        for baseline in (b for b in table if b in BASELINES):
            for metric in metrics_:
                mine, theirs = entry.get(metric), table[baseline].get(metric)
                if not mine or not theirs:
                    continue
                better = mine[2] < theirs[1] if metric in LOWER_IS_BETTER else mine[1] > theirs[2]
                if not better:
                    short.append(baseline)
                    break
        out[name] = short
    return out


def _cell(value) -> str:
    if not value:
        return ""
    mean, lo, hi = value
    return f"{mean:.3g} [{lo:.3g}, {hi:.3g}]"


def markdown(summary: dict, title: str) -> str:
    """The summary as a markdown table, one row per method (mean [95% interval])."""
    columns = _present(("examples", "dsa", "subject_mass", "subject_top1", "subject_over_distractor",
                        "subject_beats_distractor", "comprehensiveness", "sufficiency", "soft_nc", "soft_ns",
                        "soft_c_za", "soft_s_za", "f1", "first_share", "sensitivity", "spearman_vs_exact", "seconds"),
                       summary["methods"].values())
    lines = [f"#### {title}", ""]
    if "rows" in summary:
        rows = summary["rows"]
        lines.append(f"Rows kept: {rows['kept']} of {rows['of']} (the model's greedy next token starts the answer); "
                     "per relation: " + ", ".join(f"{rel} {c['kept']}/{c['of']}"
                                                  for rel, c in summary["rows_by_relation"].items()) + ".")
        lines.append("")
    if "examples" in summary:
        lines.append(f"Target: median probability {summary['target_prob_median']:.3g}, median rank "
                     f"{summary['target_rank_median']:.0f}, top choice in {summary['target_top1']} of "
                     f"{summary['examples']} examples.")
        lines.append("")
    lines.append("| method | " + " | ".join(columns) + " |")
    lines.append("|---" * (len(columns) + 1) + "|")
    for name, entry in summary["methods"].items():
        cells = [str(entry["examples"])] + [_cell(entry.get(c)) for c in columns[1:]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    gaps = {n: e for n, e in summary["methods"].items() if "gap_vs_exact" in e}
    if gaps:
        gap_columns = _present(GAP_METRICS, [e["gap_vs_exact"] for e in gaps.values()])
        lines += ["", "Distance to exact HETA per metric, on the examples both ran: mean over examples of "
                      f"|metric(method) - metric({FIDELITY_REFERENCE})| [95% interval]. The row "
                      f"`{SEED_PAIR[1]}` is the seed floor (exact HETA against itself under another seed).", "",
                  "| method | examples | " + " | ".join(gap_columns) + " |", "|---" * (len(gap_columns) + 2) + "|"]
        for name, entry in gaps.items():
            cells = [_cell(entry["gap_vs_exact"].get(m)) for m in gap_columns]
            lines.append(f"| {name} | {entry['gap_examples']} | " + " | ".join(cells) + " |")
    goal_metrics = _present(GOAL_METRICS, summary["methods"].values())
    verdict = goal(summary, goal_metrics)
    if verdict and any(n in BASELINES for n in summary["methods"]):
        met = [n for n, short in verdict.items() if not short]
        lines += ["", f"Goal (a HETA method above every baseline on {' and '.join(goal_metrics)}, intervals not "
                      f"overlapping): " + (f"met by {', '.join(met)}." if met else "met by none. Closest: "
                      + "; ".join(f"{n} (not above {', '.join(short)})" for n, short in
                                  sorted(verdict.items(), key=lambda kv: len(kv[1]))[:3]) + ".")]
    ig = summary["methods"].get("integrated_gradients")
    if ig:
        lines += ["", f"Integrated gradients ({ig['examples']} examples): completeness error "
                      f"|sum a - (g(E) - g(B))| (B the baseline) mean {_cell(ig['ig_delta'])}, median relative to "
                      f"|g(E) - g(B)|: {ig['ig_relative_delta_median']:.3g}."]
    shares = {n: e["sink_share"] for n, e in summary["methods"].items() if "sink_share" in e}
    if shares:
        lines += ["", "Sink token's share of the score before it is dropped: "
                  + "; ".join(f"{n} {_cell(v)}" for n, v in shares.items()) + "."]
    return "\n".join(lines)


def figure(summary: dict, path: str | Path, title: str) -> None:
    """A PNG of the main metrics per method, with 95% intervals (matplotlib, the ``[eval]`` extra)."""
    try:
        import matplotlib
    except ImportError:
        raise ModuleNotFoundError("the figure needs matplotlib: pip install 'heta_fast[eval]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["methods"])
    shown = _present(FIGURE_METRICS, summary["methods"].values())
    fig, axes = plt.subplots(1, len(shown), figsize=(4 * len(shown), 0.3 * len(names) + 2), sharey=True)
    for ax, metric in zip(axes, shown, strict=True):
        values = [summary["methods"][n].get(metric) or (float("nan"),) * 3 for n in names]
        mean = [v[0] for v in values]
        err = [[v[0] - v[1] for v in values], [v[2] - v[0] for v in values]]
        colours = ["tab:blue" if n.startswith("heta") else "tab:gray" for n in names]
        ax.barh(range(len(names)), mean, xerr=err, color=colours)
        ax.set_title(metric + (" (lower better)" if metric in LOWER_IS_BETTER else ""))
        ax.axvline(0, color="black", linewidth=0.5)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def environment() -> dict:
    """Machine, date and versions, for the record of a run."""
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.platform(),
            "processor": platform.processor() or platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "threads": torch.get_num_threads()}


def evaluate(heta, data: str | Path | None = None, *, protocol: str = "predicted", methods: Sequence[str] | None = None,
             out: str | Path = "heta-eval", limit: int | None = None, slow_limit: int = 20, mask: str = "zero",
             seed: int = 0, samples: int = 10, sensitivity_examples: int = 0, plot: bool = True,
             log: Callable[[str], None] | None = None) -> dict:
    """Evaluate attribution methods on curated QA examples or known facts; returns the summary
    (also written to ``out``).

    heta: a ``HETA`` with a tokenizer; protocol: ``answer``, ``predicted`` or ``chat`` (curated
    examples) or ``facts`` or ``facts_distractor`` (known facts; only rows the model answers
    right are kept); data: a JSON/JSONL path in the protocol's schema (None: the project's set,
    heta_fast/data/curated_qa.jsonl or known_facts.jsonl); limit: the first rows of ``data``
    (before the fact filter); methods: names from ``heta_fast.evaluation.methods.available()``
    (None: all). See ``run`` for the rest.
    """
    if heta.tokenizer is None:
        raise ValueError("evaluation needs a HETA with a tokenizer")
    names = list(methods) if methods is not None else None
    names = names or available()
    resolve(names, samples)  # unknown names fail before any model work
    examples = load(protocol, data, limit)
    records = run(heta, examples, protocol, names, out, slow_limit=slow_limit, mask=mask, seed=seed,
                  samples=samples, sensitivity_examples=sensitivity_examples, log=log)
    return report(records, protocol, out, data=str(data) if data is not None else "builtin", plot=plot)


def report(records: Sequence[dict], protocol: str, out: str | Path, *, data: str = "", plot: bool = True) -> dict:
    """Summarise ``records`` of one protocol into ``out/summary_PROTOCOL.{json,md}`` (and the figure)."""
    summary = summarise(records)
    summary.update(protocol=protocol, data=data, environment=environment())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"summary_{protocol}.json").write_text(json.dumps(summary, indent=1))
    title = f"{protocol} protocol, {summary.get('examples', 0)} examples"
    (out / f"summary_{protocol}.md").write_text(markdown(summary, title) + "\n")
    if plot:
        figure(summary, out / f"figure_{protocol}.png", title)
    return summary


def read_records(*paths: str | Path) -> list[dict]:
    """The records of several ``records.jsonl`` files (runs split over processes), in order.

    Runs split by hand can overlap; a ``(protocol, example, method)`` seen again is dropped, so
    every example counts once in a summary (the first file's record is kept).
    """
    seen: set[tuple] = set()
    out = []
    for path in paths:
        for record in _read_records(Path(path)):
            key = (record.get("protocol"), record.get("example"), record.get("method"))
            if key not in seen:
                seen.add(key)
                out.append(record)
    return out
