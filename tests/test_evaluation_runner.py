"""heta_fast.evaluation.runner and ``heta-fast eval``: records, resuming, bootstrap summary, figure."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_llama
from test_evaluation_data import RAW, word_tokenizer

from heta_fast import HETA, evaluate
from heta_fast.evaluation import runner

pytest.importorskip("captum")
METHODS = ["random", "saliency", "heta_gn_sink_mix"]


def _data(tmp_path):
    rows = [{**RAW, "id": f"x{k}", "distractor": ["Anna walked home.", "Anna walked.", "Anna walked home home."][k]}
            for k in range(3)]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_evaluate_writes_resumes_and_summarises(tmp_path, fresh_seed):
    heta = HETA(tiny_llama(fresh_seed % 1000), word_tokenizer())
    out = tmp_path / "run"
    summary = evaluate(heta, _data(tmp_path), protocol="answer", methods=METHODS, out=out, samples=2)
    lines = (out / "records.jsonl").read_text().splitlines()
    assert len(lines) == 9
    records = [json.loads(line) for line in lines]
    for name in METHODS:
        values = [r["dsa"] for r in records if r["method"] == name]
        mean, lo, hi = summary["methods"][name]["dsa"]
        assert mean == pytest.approx(sum(values) / 3)
        assert min(values) - 1e-9 <= lo <= mean <= hi <= max(values) + 1e-9
    assert "sink_share" in summary["methods"]["heta_gn_sink_mix"]
    assert (out / "figure_answer.png").stat().st_size > 1000
    assert "| heta_gn_sink_mix | 3 |" in (out / "summary_answer.md").read_text()

    # a run stopped half-way through a line: the cut line is dropped and only that pair is redone
    (out / "records.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:20])
    evaluate(heta, _data(tmp_path), protocol="answer", methods=METHODS, out=out, samples=2, plot=False)
    again = runner._read_records(out / "records.jsonl")
    assert len(again) == 9
    assert sorted((r["example"], r["method"]) for r in again) == sorted((r["example"], r["method"]) for r in records)


def test_gap_to_exact_and_seed_floor_by_hand():
    """``gap_vs_exact``: per example |metric(method) - metric(heta_exact)|, on shared examples only."""
    def record(method, example, value, scores):
        return {"method": method, "example": example, "scores": scores, "target_prob": 0.5, "target_rank": 1,
                **{m: value for m in runner.METRICS}}
    records = [record("heta_exact", "a", 0.10, [3, 2, 1]), record("heta_exact", "b", 0.30, [1, 2, 3]),
               record("heta_exact_seed1", "a", 0.15, [3, 1, 2]), record("heta_exact_seed1", "b", 0.20, [1, 2, 3]),
               record("heta_gauss_newton", "a", 0.40, [1, 2, 3]), record("heta_gauss_newton", "c", 9.0, [1, 2, 3])]
    summary = runner.summarise(records)
    floor = summary["seed_floor"]
    assert floor["dsa"][0] == pytest.approx((0.05 + 0.10) / 2)
    gn = summary["methods"]["heta_gauss_newton"]
    assert gn["gap_examples"] == 1 and gn["gap_vs_exact"]["sufficiency"] == pytest.approx((0.3, 0.3, 0.3))
    assert gn["spearman_vs_exact"][0] == pytest.approx(-1.0)
    assert summary["seed_stability"][0] == pytest.approx((0.5 + 1.0) / 2)
    text = runner.markdown(summary, "t")
    assert "| heta_exact_seed1 | 2 | 0.075 [0.05, 0.1] |" in text
    assert "| heta_gauss_newton | 1 | 0.3 [0.3, 0.3] |" in text


def test_goal_needs_intervals_apart_from_every_baseline():
    def entry(dsa, comp):
        return {"examples": 3, "dsa": dsa, "comprehensiveness": comp}
    summary = {"methods": {"heta_a": entry((0.5, 0.4, 0.6), (0.9, 0.8, 1.0)),
                           "heta_b": entry((0.5, 0.3, 0.6), (0.9, 0.8, 1.0)),
                           "occlusion": entry((0.3, 0.2, 0.35), (0.5, 0.4, 0.6)),
                           "saliency": entry((0.1, 0.0, 0.2), (0.7, 0.6, 0.79))}}
    assert runner.goal(summary) == {"heta_a": [], "heta_b": ["occlusion"]}
    summary["methods"]["saliency"]["comprehensiveness"] = (0.85, 0.7, 0.8)
    assert runner.goal(summary) == {"heta_a": ["saliency"], "heta_b": ["occlusion", "saliency"]}
    assert "met by none. Closest: heta_a (not above saliency)" in runner.markdown(summary, "t")


def test_read_records_of_overlapping_runs_keeps_each_pair_once(tmp_path):
    """Two hand-split runs that both did example b: b counts once, from the first file; a cut line is skipped."""
    def write(folder, rows, tail=""):
        (tmp_path / folder).mkdir()
        path = tmp_path / folder / runner.RECORDS
        path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
        return path

    a = [{"protocol": "chat", "example": e, "method": "saliency", "dsa": v} for e, v in (("a", 0.1), ("b", 0.2))]
    b = [{"protocol": "chat", "example": "b", "method": "saliency", "dsa": 0.9},
         {"protocol": "chat", "example": "b", "method": "random", "dsa": 0.3},
         {"protocol": "answer", "example": "b", "method": "saliency", "dsa": 0.5}]
    records = runner.read_records(write("one", a), write("two", b, tail='{"protocol": "chat", "exa'))
    assert [(r["protocol"], r["example"], r["method"], r["dsa"]) for r in records] == [
        ("chat", "a", "saliency", 0.1), ("chat", "b", "saliency", 0.2), ("chat", "b", "random", 0.3),
        ("answer", "b", "saliency", 0.5)]


def test_bootstrap_interval():
    mean, lo, hi = runner.bootstrap([2.0] * 5)
    assert (mean, lo, hi) == (2.0, 2.0, 2.0)
    values = torch.randn(200, generator=torch.Generator().manual_seed(1)).tolist()
    mean, lo, hi = runner.bootstrap(values)
    se = float(torch.tensor(values).std()) / 200 ** 0.5
    assert lo == pytest.approx(mean - 1.96 * se, abs=0.35 * se)
    assert hi == pytest.approx(mean + 1.96 * se, abs=0.35 * se)


def test_cli_eval_bad_input_before_the_model(tmp_path, capsys):
    from heta_fast.cli import main

    assert main(["eval", "--methods", "saliency,nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err
    assert main(["eval", "--data", str(tmp_path / "missing.json")]) == 2
    assert "evaluation data not found" in capsys.readouterr().err
    assert main(["eval", "--limit", "0"]) == 2
    assert "--limit must be >= 1, got 0" in capsys.readouterr().err
