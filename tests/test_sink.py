"""HETAConfig.sink and .mix: the sink token before the context, and the normalised mix."""

from __future__ import annotations

import pytest
import torch
from helpers import random_ids, rel_err, tiny_llama

from heta_fast import HETA, HETAConfig
from heta_fast.components import Components
from heta_fast.mix import mixed, unit_sum


def test_bos_sink_is_prepended_and_left_out(fresh_seed):
    model = tiny_llama(fresh_seed % 1000)
    heta = HETA(model)
    ids = random_ids(fresh_seed, 9).tolist()
    ids = [i if i != 1 else 2 for i in ids]  # 1 is tiny_llama's BOS
    config = HETAConfig.paper(samples=2, seed=fresh_seed % 1000)
    with_sink = heta.attribute(ids, config=config.replace(sink="bos"))
    by_hand = heta.attribute([1, *ids], config=config)  # the same computation with BOS written in
    assert with_sink.context_ids == ids[:-1] and with_sink.target_pos == len(ids) - 1
    assert rel_err(with_sink.S, by_hand.S[1:]) < 1e-5
    assert rel_err(with_sink.I, by_hand.I[1:]) < 1e-5
    assert rel_err(with_sink.M, by_hand.M[1:] / by_hand.M[1:].sum()) < 1e-5
    assert with_sink.sink_share == pytest.approx(float(by_hand.scores[0] / by_hand.scores.sum()), rel=1e-4)
    assert with_sink.to_dict()["sink_share"] == with_sink.sink_share
    # input that already starts with the sink is left as it is
    again = heta.attribute([1, *ids], config=config.replace(sink="bos"))
    assert again.sink_share is None and torch.equal(again.S, by_hand.S)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_many_targets_share_one_sink(fresh_seed, backend):
    """Several targets with ``sink="bos"`` run once on the text with one sink before it; each row
    equals ``attribute`` of that target alone (sink share included)."""
    heta = HETA(tiny_llama(fresh_seed % 1000))
    ids = [i if i != 1 else 2 for i in random_ids(fresh_seed, 10).tolist()]
    config = HETAConfig(samples=2, seed=fresh_seed % 1000, sink="bos", mix="normalised", backend=backend)
    many = heta.attribute(ids, targets=[9, 4, 6], config=config)
    for k, t in enumerate([9, 4, 6]):
        one = heta.attribute(ids, target_pos=t, config=config)
        row = many[k]
        assert row.context_ids == ids[:t] and row.target_pos == t
        for name in ("M", "S", "I", "scores"):
            assert rel_err(getattr(row, name), getattr(one, name)) < 1e-4, name
        assert row.sink_share == pytest.approx(one.sink_share, rel=1e-4)
    again = type(many).from_dict(many.to_dict())
    assert again.sink_shares == many.sink_shares and again[1].sink_share == many[1].sink_share


def test_every_window_gets_its_own_sink(fresh_seed):
    """With windows, each window runs with the sink before it (not only the first window):
    per token the mean over the windows holding it of that window's own sink-stripped parts."""
    heta = HETA(tiny_llama(fresh_seed % 1000))
    ids = [i if i != 1 else 2 for i in random_ids(fresh_seed, 13).tolist()]
    config = HETAConfig(samples=2, seed=fresh_seed % 1000, sink="bos")
    got = heta.attribute(ids, config=config, window_size=6, overlap=0.5)
    n = len(ids) - 1
    total = {name: torch.zeros(n) for name in ("M", "S", "I")}
    count, shares = torch.zeros(n), []
    for a in range(0, n - 6 + 1, 3):  # spans of 6 with stride 3 cover 0..12 exactly
        one = heta.attribute([*ids[a:a + 6], ids[-1]], config=config)  # one window, its own sink
        for name in total:
            total[name][a:a + 6] += getattr(one, name)
        count[a:a + 6] += 1
        shares.append(one.sink_share)
    M = total["M"] / count
    assert rel_err(got.M, M / M.sum()) < 1e-5
    assert rel_err(got.S, total["S"] / count) < 1e-5 and rel_err(got.I, total["I"] / count) < 1e-5
    assert got.sink_share == pytest.approx(sum(shares) / len(shares), rel=1e-5)


def test_normalised_mix_formula():
    c = Components(M=torch.tensor([0.5, 0.25, 0.25]), S=torch.tensor([100.0, 300.0, 600.0]),
                   I=torch.tensor([0.0, 0.0, 0.0]))
    # S / sum S = [0.1, 0.3, 0.6]; I sums to 0 and stays 0
    expected = torch.tensor([0.5 * 0.2 * 0.1, 0.25 * 0.2 * 0.3, 0.25 * 0.2 * 0.6])
    assert torch.allclose(mixed(c, 0.2, 0.8, "normalised"), expected)
    assert torch.equal(mixed(c, 0.2, 0.8, "raw"), c.M * (0.2 * c.S + 0.8 * c.I))
    assert torch.equal(unit_sum(torch.zeros(3)), torch.zeros(3))


@pytest.mark.parametrize("field, value, message", [
    ("sink", "eos", "unknown sink 'eos'; expected one of none, bos"),
    ("mix", "sum", "unknown mix 'sum'; expected one of raw, normalised"),
])
def test_bad_sink_and_mix(field, value, message):
    with pytest.raises(ValueError, match=message):
        HETAConfig(**{field: value})


def test_paper_preset_is_the_spec():
    paper = HETAConfig.paper()
    assert (paper.sink, paper.mix, paper.beta, paper.gamma, paper.samples, paper.mask) == \
        ("none", "raw", 0.5, 0.5, 10, "zero")
    assert HETAConfig.paper(samples=3).samples == 3


def test_presets_by_need():
    """``fast`` is Gauss-Newton on 8 tokens, ``exact`` the defaults; changes apply on top."""
    assert HETAConfig.preset("exact") == HETAConfig(hessian="exact")
    fast = HETAConfig.preset("fast")
    assert (fast.hessian, fast.hessian_topk) == ("gauss_newton", 8)
    assert fast.replace(hessian="gauss_newton", hessian_topk=8) == fast
    assert HETAConfig.preset("fast", hessian_topk=4, seed=3) == HETAConfig(hessian="gauss_newton", hessian_topk=4,
                                                                            seed=3)
    assert HETAConfig.preset("paper", samples=3) == HETAConfig.paper(samples=3)
    fixed = HETAConfig.preset("fixed")
    assert (fixed.hessian, fixed.hessian_topk, fixed.information, fixed.screened_tokens) == (
        "gauss_newton", 8, "screened", 16)
    assert fixed.replace(information="exact") == fast
    with pytest.raises(ValueError, match="unknown preset 'quick'; expected one of paper, exact, fast, fixed"):
        HETAConfig.preset("quick")
    with pytest.raises(TypeError, match="unknown HETAConfig field 'hesian'"):
        HETAConfig.preset("fast", hesian="exact")


# --- the sink token of models without a usable BOS (issue 23) ----------------------------------

BAD_BOS = "sink='bos' needs a BOS \\(or EOS\\) token id inside the vocabulary \\[0, 97\\)"


def gpt2_with(bos, eos, vocab: int = 97):
    """A random 1-layer GPT-2 of ``vocab`` tokens whose config says BOS ``bos`` and EOS ``eos``.

    ``GPT2Config(vocab_size=97)`` keeps the stock 50256 for both: the case users meet first.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=32, vocab_size=vocab)
    config.bos_token_id, config.eos_token_id = bos, eos
    return GPT2LMHeadModel(config).eval()


def ids97(seed: int, length: int) -> list[int]:
    return torch.randint(0, 97, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


class Lookups:
    """Counts the model's embedding lookups: zero means no model work was done."""

    def __init__(self, model):
        self.count = 0
        self.handle = model.get_input_embeddings().register_forward_hook(self.hook)

    def hook(self, *_):
        self.count += 1


@pytest.mark.parametrize(("bos", "eos", "named"), [(50256, 50256, "config.bos_token_id is 50256"),
                                                   (None, None, "config.bos_token_id is None"),
                                                   (None, 97, "config.eos_token_id is 97")])
def test_bos_sink_without_a_usable_token_names_the_option_before_any_model_work(fresh_seed, bos, eos, named):
    model = gpt2_with(bos, eos)
    heta, lookups = HETA(model), Lookups(model)
    ids = ids97(fresh_seed, 7)
    for call in (lambda: heta.attribute(ids), lambda: heta.attribute(ids, targets=[3, 6]),
                 lambda: heta.attribute_targets(ids, [3, 6])):
        with pytest.raises(ValueError, match=BAD_BOS) as error:
            call()
        assert named in str(error.value) and "pass sink='none'" in str(error.value)
    assert lookups.count == 0
    result = heta.attribute(ids, sink="none", samples=1)
    assert result.sink_share is None and result.context_ids == ids[:-1]


@pytest.mark.parametrize("eos", [5, [5, 9]])
def test_bos_sink_falls_back_to_the_eos_token(fresh_seed, eos):
    heta = HETA(gpt2_with(None, eos))
    ids = [i if i != 5 else 6 for i in ids97(fresh_seed, 8)]
    config = HETAConfig.paper(samples=2, seed=fresh_seed % 1000)
    with_sink = heta.attribute(ids, config=config.replace(sink="bos"))
    by_hand = heta.attribute([5, *ids], config=config)
    assert with_sink.context_ids == ids[:-1] and with_sink.sink_share is not None
    assert rel_err(with_sink.S, by_hand.S[1:]) < 1e-5 and rel_err(with_sink.I, by_hand.I[1:]) < 1e-5


def test_a_dataset_job_refuses_the_sink_before_its_first_row(tmp_path):
    from heta_fast import attribute_dataset

    model = gpt2_with(50256, 50256)
    heta = HETA(model)  # its constructor's own check of the logits path runs one tiny forward
    lookups = Lookups(model)
    with pytest.raises(ValueError, match=BAD_BOS):
        attribute_dataset([{"id": "a", "text": "a b c"}], tmp_path / "out.jsonl", model=heta, quiet=True)
    assert lookups.count == 0


def test_the_cli_refuses_the_sink_with_the_same_message(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from heta_fast.cli import main

    words = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator(["the cat sat on the mat"], trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]")
    tokenizer.save_pretrained(tmp_path)
    gpt2_with(50256, 50256, vocab=len(tokenizer)).save_pretrained(tmp_path)
    code = main(["attribute", "the cat sat on the mat", "--model", str(tmp_path)])
    err = capsys.readouterr().err
    assert code != 0 and "sink='bos' needs a BOS (or EOS) token id" in err and "config.bos_token_id is 50256" in err
    assert main(["attribute", "the cat sat on the mat", "--model", str(tmp_path), "--sink", "none",
                 "--samples", "1"]) == 0
