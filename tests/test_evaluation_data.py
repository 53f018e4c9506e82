"""heta_fast.evaluation.data: schemas, protocols, segments and important words by character offsets."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_llama
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from heta_fast.evaluation.data import Example, load_examples, prepare, reply_start
from heta_fast.model import CausalLM

RAW = {"id": "x1", "distractor": "Anna walked home.", "support": "Plants use sunlight in photosynthesis.",
       "question": "What do plants use?", "answer": "sunlight", "important_words": ["sunlight", "plants"]}
CHAT = ("{% for m in messages %}<|user|> {{ m['content'] }} <|end|>{% endfor %}"
        "{% if add_generation_prompt %} <|bot|>{% endif %}")


def word_tokenizer() -> PreTrainedTokenizerFast:
    """Words and punctuation of RAW (plus the cue and template tokens) as a 97-id vocabulary."""
    words = ["[UNK]", "<|", "|>", "user", "end", "bot", "<", "s", ">", "Question", ":", "Answer",
             "Anna", "walked", "home", ".", "Plants", "use", "sunlight", "in", "photosynthesis", "What", "do",
             "plants", "?", "Sunlight"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()  # \w+ | [^\w\s]+, with character offsets
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")
    out.chat_template = CHAT
    return out


def test_both_schemas_and_json_kinds(tmp_path):
    paper = {k: v for k, v in RAW.items() if k not in ("distractor", "support")}
    paper.update(narrative_segment=RAW["distractor"], sciq_support_segment=RAW["support"])
    paper["input_text"] = Example(**{**{k: RAW[k] for k in ("id", "distractor", "support", "question", "answer")},
                                     "important_words": ()}).text
    (tmp_path / "a.jsonl").write_text(json.dumps(RAW) + "\n\n" + json.dumps({**RAW, "id": "x2"}) + "\n")
    (tmp_path / "b.json").write_text(json.dumps({"examples": [paper]}))
    a = load_examples(tmp_path / "a.jsonl")
    b = load_examples(tmp_path / "b.json")
    assert [e.id for e in a] == ["x1", "x2"]
    assert a[0] == b[0]
    assert a[0].text == "Anna walked home. <s> Plants use sunlight in photosynthesis. <s> Question: What do plants use?"


@pytest.mark.parametrize("change, message", [
    ({"support": ""}, "field 'support' must be a non-empty string"),
    ({"important_words": "sunlight"}, "field 'important_words' must be a list of non-empty strings"),
    ({"input_text": "something else"}, "input_text is not distractor"),
])
def test_bad_examples_are_named(tmp_path, change, message):
    (tmp_path / "bad.jsonl").write_text(json.dumps({**RAW, **change}) + "\n")
    with pytest.raises(ValueError, match=f"bad.jsonl: line 1: {message}"):
        load_examples(tmp_path / "bad.jsonl")


def test_missing_field_and_file(tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps({k: v for k, v in RAW.items() if k != "answer"}) + "\n")
    with pytest.raises(ValueError, match="missing field 'answer'"):
        load_examples(tmp_path / "m.jsonl")
    with pytest.raises(FileNotFoundError, match="evaluation data not found"):
        load_examples(tmp_path / "none.json")


def test_builtin_set_loads():
    examples = load_examples()
    assert len(examples) >= 100
    for e in examples:
        assert e.answer.lower() in e.support.lower()
        assert e.important_spans()  # every example has located important words


def _tokens(prepared, tokenizer, positions):
    return [tokenizer.convert_ids_to_tokens(prepared.ids[i]) for i in positions]


def test_answer_protocol_positions():
    tok = word_tokenizer()
    p = prepare(Example(**{**RAW, "important_words": tuple(RAW["important_words"])}), "answer", tok)
    assert p.target == tok.convert_tokens_to_ids("sunlight")
    assert p.context == list(range(len(p.ids)))
    assert _tokens(p, tok, p.distractor) == ["Anna", "walked", "home", "."]
    assert _tokens(p, tok, p.support) == ["Plants", "use", "sunlight", "in", "photosynthesis", "."]
    # "plants" matches "Plants" (case-insensitive, whole word) inside the support only, not the question's
    assert _tokens(p, tok, p.important) == ["Plants", "sunlight"]
    assert tok.convert_ids_to_tokens(p.ids[-2:]) == ["Answer", ":"]


def test_chat_protocol_leaves_template_out():
    tok = word_tokenizer()
    p = prepare(Example(**{**RAW, "important_words": tuple(RAW["important_words"])}), "chat", tok)
    names = tok.convert_ids_to_tokens(p.ids)
    assert names[:3] == ["<|", "user", "|>"] and names[-6:] == ["<|", "end", "|>", "<|", "bot", "|>"]
    assert p.context == list(range(3, len(p.ids) - 6))
    assert _tokens(p, tok, p.support) == ["Plants", "use", "sunlight", "in", "photosynthesis", "."]
    assert _tokens(p, tok, p.important) == ["Plants", "sunlight"]
    assert tok.convert_ids_to_tokens([p.target]) == ["Sunlight"]  # how the assistant's reply starts
    assert reply_start("sunlight") == "Sunlight" and reply_start("pH") == "PH" and reply_start("") == ""


def test_predicted_protocol_is_the_greedy_token(fresh_seed):
    tok = word_tokenizer()
    model = tiny_llama(fresh_seed % 1000)
    p = prepare(Example(**{**RAW, "important_words": tuple(RAW["important_words"])}), "predicted", tok,
                CausalLM(model))
    with torch.no_grad():
        expected = int(model(torch.tensor([p.ids])).logits[0, -1].argmax())
    assert p.target == expected


def test_unknown_protocol():
    with pytest.raises(ValueError, match="unknown protocol 'qa'; expected one of answer, predicted, chat, facts, "
                                         "facts_distractor"):
        prepare(Example(**{**RAW, "important_words": ()}), "qa", word_tokenizer())


@pytest.mark.smollm
def test_smollm2_chat_and_answer_protocols():
    from transformers import AutoTokenizer

    from heta_fast.embedded import default_model_path

    tok = AutoTokenizer.from_pretrained(default_model_path())
    example = load_examples(limit=1)[0]
    chat = prepare(example, "chat", tok)
    names = [tok.decode([i]) for i in chat.ids]
    assert names[0] == "<|im_start|>" and "".join(names[-6:]) == "<|im_end|>\n<|im_start|>assistant\n"
    assert "".join(names[i] for i in chat.context) == example.text
    reply = example.answer[0].upper() + example.answer[1:]
    assert chat.target == tok(reply, add_special_tokens=False)["input_ids"][0] != \
        tok(example.answer, add_special_tokens=False)["input_ids"][0]
    answer = prepare(example, "answer", tok)
    assert "".join(tok.decode([i]) for i in answer.ids) == example.text + "\nAnswer:"
    assert "".join(tok.decode([answer.ids[i]]) for i in answer.support).strip() == example.support
    assert "".join(tok.decode([answer.ids[i]]) for i in answer.distractor) == example.distractor
