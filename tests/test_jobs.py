"""Corpus jobs on the local engine (``heta_fast.attribute_dataset``), on a tiny GPT-2 saved to disk.

Rows are compared with ``HETA.attribute`` on the same inputs and config: bitwise, since both run
the same code in the same process with a fixed memory budget (the batch sizes follow it).
"""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from heta_fast import HETA, HETAConfig, attribute_dataset
from heta_fast.cli import main
from heta_fast.jobs import io
from heta_fast.jobs.io import Columns, load_result, read_records

WORDS = ("the cat sat on the mat . The capital of France is Paris Berlin is the capital of Germany "
         "user assistant system : a dog ran to red blue house").split()
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
                 "{% if add_generation_prompt %}assistant :{% endif %}")
# Few probes and a fixed budget: these tests check the job machinery, not estimates.
CONFIG = HETAConfig(samples=2, memory_budget=64 << 20, backend="torch")
VOLATILE = ("seconds", "timings", "row_timings")  # wall-clock fields, different on every run


def make_tiny_model(folder) -> str:
    """A random 2-layer GPT-2 with a word-level tokenizer and a chat template, saved to ``folder``."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=64, vocab_size=len(tokenizer),
                        bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-gpt2-chat"))


@pytest.fixture(scope="module")
def heta(tiny_model) -> HETA:
    return HETA.from_pretrained(tiny_model)


def random_rows(seed: int, n: int = 6) -> list[dict]:
    """``n`` rows of every kind with random words and lengths: text (some with a target position or
    token), prompt + answer, and chat messages."""
    rng = random.Random(seed)

    def sentence(lo: int, hi: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    rows = []
    for k in range(n):
        kind = k % 4
        if kind == 0:
            rows.append({"id": f"t{k}", "text": sentence(3, 12)})
        elif kind == 1:
            text = sentence(4, 12)
            rows.append({"id": f"t{k}", "text": text, "target_pos": rng.randint(1, len(text.split()) - 1),
                         "target_token": rng.choice(WORDS)})
        elif kind == 2:
            rows.append({"id": f"p{k}", "prompt": sentence(3, 8), "answer": sentence(1, 4)})
        else:
            rows.append({"id": f"m{k}", "messages": [{"role": "user", "content": sentence(2, 6)},
                                                     {"role": "assistant", "content": sentence(1, 3)}]})
    return rows


def expected(heta: HETA, row: dict) -> dict:
    """What ``HETA`` gives for a row, computed here independently of the job code."""
    if "text" in row:
        result = heta.attribute(row["text"], target_pos=row.get("target_pos"), target_token=row.get("target_token"),
                                config=CONFIG)
        return {"kind": "single", **result.to_dict()}
    if "prompt" in row:
        prompt, answer = row["prompt"], row["answer"]
    else:
        history = [row["messages"][0]]
        prompt = heta.tokenizer.apply_chat_template(history, add_generation_prompt=True, tokenize=False)
        answer = row["messages"][1]["content"]
    prompt_ids = heta.tokenizer(prompt)["input_ids"]
    answer_ids = heta.tokenizer(answer, add_special_tokens=False)["input_ids"]
    ids = prompt_ids + answer_ids
    result = heta.attribute_targets(ids, list(range(len(prompt_ids), len(ids))), prompt_length=len(prompt_ids),
                                    config=CONFIG)
    return {"kind": "multi", **result.to_dict()}


def stable(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in VOLATILE}


def by_id(path) -> dict[str, dict]:
    records = read_records(str(path))
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids)), f"duplicate ids in {path}"
    return {r["id"]: r for r in records}


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return str(path)


# --- results -----------------------------------------------------------------------------------


def test_rows_equal_heta_attribute_bitwise(tmp_path, tiny_model, heta, fresh_seed):
    rows = random_rows(fresh_seed, 8)
    out = tmp_path / "out.jsonl"
    report = attribute_dataset(write_jsonl(tmp_path / "in.jsonl", rows), out, model=tiny_model, config=CONFIG,
                               quiet=True)
    assert (report.done, report.skipped, report.failed) == (8, 0, 0)
    got = by_id(out)
    assert sorted(got) == sorted(r["id"] for r in rows)
    from heta_fast import __version__

    for row in rows:
        record = got[row["id"]]
        assert record["heta_fast_version"] == __version__ and record["seconds"] > 0
        want = expected(heta, row)
        assert stable(record) == {"id": row["id"], "heta_fast_version": __version__, **stable(want)}, row["id"]
        assert set(record) == set(io.OUTPUT_SCHEMA[record["kind"]])
        back = load_result(record)
        assert stable({"kind": record["kind"], **back.to_dict()}) == stable(want)


def test_every_input_format_gives_the_same_records(tmp_path, tiny_model, fresh_seed):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = random_rows(fresh_seed, 8)
    flat = [{**r, "messages": json.dumps(r["messages"])} if "messages" in r else r for r in rows]
    names = ["id", "text", "target_pos", "target_token", "prompt", "answer", "messages"]
    with open(tmp_path / "in.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, names)
        writer.writeheader()
        writer.writerows(flat)
    pq.write_table(pa.Table.from_pylist([{name: r.get(name) for name in names} for r in rows]),
                   tmp_path / "in.parquet")  # every column in every row: from_pylist reads the first row's keys
    sources = {"jsonl": write_jsonl(tmp_path / "in.jsonl", rows), "csv": str(tmp_path / "in.csv"),
               "parquet": str(tmp_path / "in.parquet"), "list": rows}
    try:
        import datasets

        sources["datasets"] = datasets.Dataset.from_list(rows)
    except ModuleNotFoundError:  # optional: the users' own package, not one of ours
        pass
    results = {}
    for name, source in sources.items():
        report = attribute_dataset(source, tmp_path / f"{name}.jsonl", model=tiny_model, config=CONFIG, quiet=True)
        assert (report.done, report.failed) == (8, 0), name
        results[name] = {k: stable(v) for k, v in by_id(tmp_path / f"{name}.jsonl").items()}
    for name in sources:
        assert results[name] == results["jsonl"], name


def test_parquet_output_holds_the_same_records(tmp_path, tiny_model, fresh_seed):
    rows = random_rows(fresh_seed, 4) + [{"id": "bad", "text": "the cat", "target_pos": 9}]
    source = write_jsonl(tmp_path / "in.jsonl", rows)
    attribute_dataset(source, tmp_path / "out.jsonl", model=tiny_model, config=CONFIG, quiet=True)
    report = attribute_dataset(source, tmp_path / "out.parquet", model=tiny_model, config=CONFIG, quiet=True)
    assert (report.done, report.failed) == (4, 1)
    assert not os.path.exists(str(tmp_path / "out.parquet") + io.JOURNAL_SUFFIX)
    jsonl, parquet = by_id(tmp_path / "out.jsonl"), by_id(tmp_path / "out.parquet")
    assert {k: stable(v) for k, v in parquet.items()} == {k: stable(v) for k, v in jsonl.items()}
    for key, record in parquet.items():
        if key != "bad":
            assert stable(load_result(record).to_dict()) == stable(load_result(jsonl[key]).to_dict())
    # a second run on the finished Parquet file resumes from it and rewrites it whole
    again = attribute_dataset(source, tmp_path / "out.parquet", model=tiny_model, config=CONFIG, quiet=True)
    assert (again.done, again.skipped, again.failed) == (0, 5, 0)
    assert {k: stable(v) for k, v in by_id(tmp_path / "out.parquet").items()} == \
        {k: stable(v) for k, v in jsonl.items()}


def test_renamed_columns(tmp_path, tiny_model, heta):
    rows = [{"key": 7, "sentence": "the cat sat on the mat"},
            {"key": 8, "question": "The capital of France is", "reply": "Paris"}]
    out = tmp_path / "out.jsonl"
    attribute_dataset(rows, out, model=tiny_model, config=CONFIG, quiet=True,
                      columns={"id": "key", "text": "sentence", "prompt": "question", "answer": "reply"})
    got = by_id(out)
    assert sorted(got) == ["7", "8"]  # ids are written as strings
    assert stable(got["7"])["scores"] == heta.attribute("the cat sat on the mat", config=CONFIG).to_dict()["scores"]
    assert got["8"]["targets"] == [5] and got["8"]["prompt_length"] == 5


# --- bad rows and bad jobs ---------------------------------------------------------------------

BAD_ROWS = [
    ({"id": "no-kind"}, "ValueError: a row needs exactly one of 'text', 'prompt' (with 'answer') or 'messages'; "
                        "found none"),
    ({"id": "two-kinds", "text": "the cat", "prompt": "the"},
     "ValueError: a row needs exactly one of 'text', 'prompt' (with 'answer') or 'messages'; found 'text', 'prompt'"),
    ({"id": "far", "text": "the cat sat", "target_pos": 7},
     "ValueError: target_pos 7 is out of range: it must lie in [1, 2] for 3 tokens (position 0 has no context)"),
    ({"id": "pos-text", "text": "the cat sat", "target_pos": "two"}, "TypeError: 'target_pos' must be an int, "
                                                                     "got 'two'"),
    ({"id": "short", "text": "cat"}, "ValueError: need at least 2 tokens (a context and a target), got 1"),
    ({"id": "empty", "text": "   "}, "ValueError: empty text: nothing to attribute"),
    ({"id": "number", "text": 5}, "TypeError: 'text' must be a string, got int"),
    ({"id": "no-answer", "prompt": "the cat"}, "ValueError: a 'prompt' row needs an 'answer' (the tokens to explain)"),
    ({"id": "blank-answer", "prompt": "the cat", "answer": " "}, "ValueError: empty answer: nothing to explain"),
    ({"id": "two-tokens", "text": "the cat sat", "target_token": "red house"},
     "ValueError: target token 'red house' is 2 tokens for this tokenizer; give exactly one token (or its id)"),
    ({"id": "user-last", "messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}]},
     "ValueError: the last message must be the assistant's reply (the tokens explained), got role 'user'"),
    ({"id": "bad-message", "messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]},
     "ValueError: message 0 must be a {'role': str, 'content': str} object"),
    ({"id": "bad-json", "messages": "[{"}, "ValueError: 'messages' is not valid JSON (Expecting property name "
                                           "enclosed in double quotes)"),
]


def test_bad_rows_become_error_records_and_the_job_finishes(tmp_path, tiny_model, capsys):
    good = [{"id": "ok1", "text": "the cat sat on the mat"}, {"id": "ok2", "prompt": "the cat", "answer": "sat"}]
    rows = good[:1] + [row for row, _ in BAD_ROWS] + good[1:]
    out = tmp_path / "out.jsonl"
    report = attribute_dataset(rows, out, model=tiny_model, config=CONFIG)
    assert (report.done, report.skipped, report.failed) == (2, 0, len(BAD_ROWS))
    got = by_id(out)
    for row, message in BAD_ROWS:
        assert got[row["id"]] == {"id": row["id"], "error": message}
    assert "error" not in got["ok1"] and "error" not in got["ok2"]
    assert f"done 2, skipped 0, failed {len(BAD_ROWS)}" in capsys.readouterr().err
    with pytest.raises(ValueError, match="row 'far' failed: ValueError: target_pos 7"):
        load_result(got["far"])


def test_restart_skips_done_rows_and_errors_unless_retried(tmp_path, tiny_model, heta):
    rows = [{"id": "a", "text": "the cat sat"}, {"id": "b", "text": "the cat sat on", "target_pos": 9}]
    out = tmp_path / "out.jsonl"
    first = attribute_dataset(rows, out, model=tiny_model, config=CONFIG, quiet=True)
    assert (first.done, first.skipped, first.failed) == (1, 0, 1)
    rows.append({"id": "c", "text": "the dog ran"})
    second = attribute_dataset(rows, out, model=tiny_model, config=CONFIG, quiet=True)
    assert (second.done, second.skipped, second.failed) == (1, 2, 0)
    rows[1]["target_pos"] = 2  # the row is fixed; only --retry-errors runs it again
    third = attribute_dataset(rows, out, model=tiny_model, config=CONFIG, quiet=True, retry_errors=True)
    assert (third.done, third.skipped, third.failed) == (1, 2, 0)
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert sorted(json.loads(line)["id"] for line in lines) == ["a", "b", "c"]
    assert stable(by_id(out)["b"])["scores"] == heta.attribute("the cat sat on", target_pos=2,
                                                               config=CONFIG).to_dict()["scores"]


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"engine": "spark"}, ValueError, "unknown engine 'spark'; expected one of local, ray"),
    ({"format": "xml"}, ValueError, "unknown output format 'xml'; expected one of jsonl, parquet"),
    ({"columns": {"txt": "a"}}, ValueError, "unknown column role 'txt'; expected one of id, text, target_pos"),
    ({"config": {"samples": 2}}, TypeError, "config must be a HETAConfig, got dict"),
    ({"samples": 0}, ValueError, "m (samples) must be >= 1, got 0"),
    ({"actors": 0, "engine": "ray"}, ValueError, "actors must be >= 1, got 0"),
    ({"model_factory": 3}, TypeError, "model_factory must be callable, got int"),
])
def test_bad_job_options_fail_before_any_work(tmp_path, kwargs, error, message):
    rows = [{"id": 1, "text": "the cat"}]
    if "model_factory" not in kwargs:
        kwargs["model"] = str(tmp_path / "no-such-model")  # never loaded: the checks come first
    with pytest.raises(error, match=message.replace("(", r"\(").replace(")", r"\)")):
        attribute_dataset(rows, tmp_path / "out.jsonl", **kwargs)
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize(("rows", "message"), [
    ([{"id": 1, "text": "a b"}, {"id": "1", "text": "a b c"}], "id '1' appears twice in the input"),
    ([{"id": 1, "text": "a b"}, {"text": "a b c"}], "input row 1 has no 'id'; every row needs an id"),
    ([["a"]], "input row 0 is a list, not an object with named columns"),
])
def test_bad_ids_fail_before_the_model_loads(tmp_path, rows, message):
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(")):
        attribute_dataset(rows, tmp_path / "out.jsonl", model=str(tmp_path / "no-such-model"))


def test_missing_or_unknown_input_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="input file not found: .*missing.jsonl"):
        attribute_dataset(str(tmp_path / "missing.jsonl"), tmp_path / "out.jsonl")
    (tmp_path / "in.txt").write_text("x")
    with pytest.raises(ValueError, match="cannot tell the input format of .*in.txt.*: name it .jsonl, .csv or"):
        attribute_dataset(str(tmp_path / "in.txt"), tmp_path / "out.jsonl")


# --- atomic rows -------------------------------------------------------------------------------


def test_writer_drops_a_torn_last_line(tmp_path):
    path = tmp_path / "out.jsonl"
    whole = [{"id": "a", "error": "x"}, {"id": "b", "error": "y"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in whole) + '{"id": "c", "sco')
    with io.RecordWriter(str(path)) as writer:
        assert writer.torn and writer.done == {"a", "b"}
        writer.write({"id": "c", "error": "z"})
    assert [json.loads(line) for line in path.read_text().splitlines()] == whole + [{"id": "c", "error": "z"}]
    with io.RecordWriter(str(path)) as writer:
        assert not writer.torn and writer.done == {"a", "b", "c"}


KILL_SCRIPT = """
import sys
from heta_fast import HETAConfig, attribute_dataset
attribute_dataset(sys.argv[1], sys.argv[2], model=sys.argv[3], quiet=True,
                  config=HETAConfig(samples=2, memory_budget=64 << 20, backend="torch"))
"""


def test_killed_job_restarts_with_every_id_once(tmp_path, tiny_model, fresh_seed):
    rng = random.Random(fresh_seed)
    rows = [{"id": f"r{k}", "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 40)))}
            for k in range(60)]
    source, out = write_jsonl(tmp_path / "in.jsonl", rows), tmp_path / "out.jsonl"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, source, str(out), tiny_model], env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if out.exists() and out.read_text().count("\n") >= 5:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the job finished before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    written = out.read_text().count("\n")
    assert 5 <= written < len(rows)
    report = attribute_dataset(source, out, model=tiny_model, config=CONFIG, quiet=True)
    assert report.skipped >= written and report.done + report.skipped == len(rows) and report.failed == 0
    lines = out.read_text().split("\n")
    assert lines[-1] == ""  # the file ends with a whole line
    ids = [json.loads(line)["id"] for line in lines[:-1]]  # every line is valid JSON
    assert sorted(ids) == sorted(r["id"] for r in rows)


# --- command line ------------------------------------------------------------------------------


def test_command_line_job_with_progress_and_summary(tmp_path, tiny_model, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", [{"id": 1, "text": "the cat sat on the mat"},
                                                 {"id": 2, "text": "the cat", "target_pos": 5}])
    out = tmp_path / "out.jsonl"
    code = main(["attribute-dataset", source, "--out", str(out), "--model", tiny_model, "--samples", "2",
                 "--memory-budget", "64M", "--backend", "torch"])
    err = capsys.readouterr().err
    assert code == 0
    assert "2/2" in err and "row/s" in err  # the tqdm bar: rows and rate
    assert "done 1, skipped 0, failed 1" in err
    assert by_id(out)["1"]["config"] == CONFIG.to_dict()
    code = main(["attribute-dataset", source, "--out", str(out), "--model", tiny_model, "--quiet"])
    captured = capsys.readouterr()
    assert code == 0 and captured.err == "" and captured.out == ""


def test_command_line_bad_input_is_one_error_line(tmp_path, capsys):
    code = main(["attribute-dataset", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o.jsonl")])
    err = capsys.readouterr().err
    assert code == 2 and err == f"error: input file not found: {tmp_path / 'nope.csv'}\n"


def test_columns_of_rejects_bad_names():
    with pytest.raises(TypeError, match="column name for 'text' must be a non-empty str, got ''"):
        Columns.of({"text": ""})


def test_model_factory_and_heta_instance_give_the_same_records(tmp_path, tiny_model, heta, fresh_seed):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = random_rows(fresh_seed, 4)

    def factory():
        return (AutoModelForCausalLM.from_pretrained(tiny_model, attn_implementation="eager"),
                AutoTokenizer.from_pretrained(tiny_model))

    results = {}
    for name, kwargs in {"path": {"model": tiny_model}, "factory": {"model_factory": factory},
                         "instance": {"model": heta}}.items():
        attribute_dataset(rows, tmp_path / f"{name}.jsonl", config=CONFIG, quiet=True, **kwargs)
        results[name] = {k: stable(v) for k, v in by_id(tmp_path / f"{name}.jsonl").items()}
    assert results["factory"] == results["path"] and results["instance"] == results["path"]
    with pytest.raises(ValueError, match="engine 'ray' loads the model in each actor: pass a model path"):
        attribute_dataset(rows, tmp_path / "ray.jsonl", model=heta, engine="ray")
