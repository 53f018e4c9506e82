"""``benchmarks.common``: a clean clone's benchmarks read only what the repository ships or is given."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import bench_fidelity, bench_multi_target, bench_smollm
from benchmarks.common import REPO, SHIPPED_PROMPTS, curated_examples, prompt_text
from heta_fast import HETA


def test_without_a_curated_set_the_shipped_prompts_are_used():
    text, source = prompt_text(None)
    assert source == "benchmarks/data/prompts.txt" and SHIPPED_PROMPTS.is_relative_to(REPO)
    assert text == SHIPPED_PROMPTS.read_text() and len(text.split()) > 900  # >= 1,025 tokens for --memory 1024


def test_a_curated_set_is_joined_as_question_and_answer_paragraphs(tmp_path: Path):
    path = tmp_path / "set.json"
    path.write_text(json.dumps({"examples": [{"input_text": "A <s> B <s> Question: q1?", "answer": "x"},
                                             {"input_text": "C <s> D <s> Question: q2?", "answer": "y"}]}))
    text, source = prompt_text(path)
    assert text == "A <s> B <s> Question: q1?\nAnswer: x\n\nC <s> D <s> Question: q2?\nAnswer: y"
    assert source == str(path.resolve())


def test_a_missing_or_malformed_curated_set_is_named(tmp_path: Path):
    missing = tmp_path / "curated_qa_100.json"
    with pytest.raises(FileNotFoundError, match=f"^--curated {missing}: no such file. The curated QA set"):
        curated_examples(missing)
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2]")
    with pytest.raises(ValueError, match=f"^--curated {bad}: not the curated QA set"):
        curated_examples(bad)


def test_curated_examples_without_a_path_fail_before_any_model_work():
    with pytest.raises(ValueError, match="2 curated examples asked for, but no curated set given: pass --curated"):
        bench_fidelity.run(examples=2, curated=None, heta=object())


@pytest.mark.parametrize("module", [bench_smollm, bench_fidelity, bench_multi_target])
def test_every_script_takes_curated_and_nothing_reads_outside_the_repository(module):
    source = Path(module.__file__).read_text()
    assert "add_curated_argument(parser)" in source
    assert "shared" + "/" not in source and '"shared"' not in source


@pytest.mark.parametrize("module", [bench_smollm, bench_fidelity, bench_multi_target])
def test_a_missing_curated_file_is_one_error_line_before_the_model_loads(module, capsys, monkeypatch):
    monkeypatch.setattr(HETA, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as stop:
        module.main(["--curated", "/nonexistent/curated_qa_100.json"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith("error: --curated /nonexistent/curated_qa_100.json: no such file. The curated QA set "
                        "(curated_qa_100.json, from the paper's release) is not shipped with heta_fast; pass the "
                        "path of your copy")


def test_curated_examples_asked_for_without_the_set_are_refused_on_the_command_line(capsys, monkeypatch):
    monkeypatch.setattr(HETA, "from_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as stop:
        bench_fidelity.main(["--examples", "3"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip().endswith("error: --examples 3 needs the curated set: pass --curated PATH "
                                                    "(curated_qa_100.json, not shipped) or leave --examples out")


# bench_kernels_gpu reads its arguments on import (it must set TRITON_INTERPRET before triton loads)
SCRIPTS = {"bench_kernels_gpu", "bench_backends_gpu"}  # scripts: parse their flags on import


@pytest.mark.parametrize("name", sorted(p.stem for p in (REPO / "benchmarks").glob("bench_*.py")
                                        if p.stem not in SCRIPTS))
def test_every_benchmark_module_imports(name):
    """A benchmark that no longer imports (a name moved in a refactor) fails here, not on the day it is run."""
    importlib.import_module(f"benchmarks.{name}")


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_gpu_scripts_run_their_smoke_mode_on_the_cpu(name):
    """The GPU scripts run only where a GPU is lent; ``--smoke`` checks them here on Triton's interpreter."""
    run = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--smoke"], cwd=REPO, capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "device: CPU (Triton interpreter)" in run.stdout


def test_dataset_figures_come_from_the_rows_written(tmp_path: Path):
    """A job stopped by its time limit still reports what its output holds: rows, median row time,
    rows per hour per worker from the rows' own seconds; error records do not count."""
    from benchmarks.bench_dataset import format_run, row_figures

    path = tmp_path / "out.jsonl"
    rows = [{"id": "a", "seconds": 10.0, "context_ids": [1, 2, 3]}, {"id": "b", "error": "bad row"},
            {"id": "c", "seconds": 30.0, "context_ids": [4, 5]}, {"id": "d", "seconds": 20.0, "context_ids": [6]}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    figures = row_figures(path, workers=2)
    assert figures == {"rows_written": 3, "rows_per_hour_compute": 3600 * 3 * 2 / 60.0, "median_row_s": 20.0,
                       "tokens": [3, 2, 1], "row_seconds": [10.0, 30.0, 20.0], "ids": ["a", "c", "d"]}
    assert row_figures(tmp_path / "missing.jsonl", workers=1)["rows_written"] == 0
    # a --work folder may hold rows of another sample: only the job's own ids count
    assert row_figures(path, workers=1, ids=frozenset({"c", "b"}))["row_seconds"] == [30.0]
    run = {"estimator": "gauss_newton", "engine": "ray", "error": "stopped after 10 s", "prompts": 200,
           "peak_rss_bytes": 3 << 29, "memory_budget": 1 << 30, **figures}
    line = format_run(run, model_rss_bytes=1 << 30)
    assert "stopped after 10 s" in line and "3/200 rows written, median row 20.00 s, 360 rows/h" in line
    assert "peak RSS 1.50 GiB (model loaded 1.00 + budget 1.00)" in line


def test_a_length_sample_takes_evenly_spaced_ranks_of_the_lengths():
    """``--sample K``: the prompts at ranks floor((j + 1/2) N / K) of (length, id), whatever the input order."""
    import random

    from benchmarks.bench_dataset import length_sample

    rows = [{"id": f"p{k:02d}", "tokens": 100 - 3 * k} for k in range(10)]  # lengths 100, 97, ..., 73
    random.Random(1).shuffle(rows)
    assert [r["tokens"] for r in length_sample(rows, 4)] == [76, 82, 91, 97]  # ranks 1, 3, 6, 8 of 73..100
    assert [r["tokens"] for r in length_sample(rows, 1)] == [88]  # rank 5
    assert length_sample(rows, 10) == rows and length_sample(rows, 50) == rows
    tied = [{"id": "b", "tokens": 5}, {"id": "a", "tokens": 5}, {"id": "c", "tokens": 9}]
    assert [r["id"] for r in length_sample(tied, 2)] == ["a", "c"]  # ranks 0 and 2; ties by id


def test_the_projected_rate_interpolates_row_times_in_the_length():
    """Each prompt's time is read off the sample's (length, seconds) points, linearly between them,
    flat beyond them, equal lengths averaged; rate = workers * 3600 * N / total seconds."""
    from benchmarks.bench_dataset import projected_rate

    # sample: 40 tokens -> 10 s, 80 -> 30 s (two rows, 20 s and 40 s), 120 -> 70 s
    lengths, seconds = [80, 40, 120, 80], [20.0, 10.0, 70.0, 40.0]
    everything = [30, 40, 60, 80, 100, 120, 130]  # times 10, 10, 20, 30, 50, 70, 70: 260 s
    assert projected_rate(lengths, seconds, everything, workers=1) == pytest.approx(3600 * 7 / 260)
    assert projected_rate(lengths, seconds, everything, workers=2) == pytest.approx(2 * 3600 * 7 / 260)
    # the sample itself, projected onto itself, gives its own rate when no length repeats
    assert projected_rate([40, 120], [10.0, 70.0], [40, 120], workers=1) == pytest.approx(3600 * 2 / 80)


def test_a_work_folder_refuses_other_prompts(tmp_path: Path):
    """Resuming in a ``--work`` folder whose prompts differ would skip rows by ids that name other
    texts: refused, naming the folder; the same prompts, or a fresh run (no --work), are written."""
    from benchmarks.bench_dataset import write_prompts

    path = tmp_path / "prompts-2.jsonl"
    rows = [{"id": "p0000", "text": "one", "tokens": 1}, {"id": "p0001", "text": "two", "tokens": 1}]
    write_prompts(path, rows, keep=True)
    assert path.read_text() == '{"id": "p0000", "text": "one"}\n{"id": "p0001", "text": "two"}\n'
    write_prompts(path, rows, keep=True)  # a rerun with the same prompts resumes
    other = [rows[0], {"id": "p0001", "text": "else", "tokens": 1}]
    with pytest.raises(SystemExit, match=f"^--work {tmp_path}: prompts-2.jsonl holds other prompts"):
        write_prompts(path, other, keep=True)
    assert "two" in path.read_text()
    write_prompts(path, other, keep=False)
    assert "else" in path.read_text()
