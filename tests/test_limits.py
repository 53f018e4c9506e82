"""Inputs a model cannot take get a named error before any model work, from the API and the CLI (issue 9)."""

from __future__ import annotations

import pytest
import torch
from helpers import SPEC, random_ids

from heta_fast import HETA
from heta_fast.cli import main
from heta_fast.memory import MemoryBudgetWarning, forward_bytes

WORDS = "the cat sat on the mat and looked at the dog who sat by the door of the old red barn".split()


def tiny_gpt2(positions: int = 16):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=len(WORDS) + 1,
                                      n_positions=positions, bos_token_id=0, eos_token_id=0)).eval()


def tiny_rope(positions: int = 16):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                        num_hidden_layers=2, intermediate_size=64, vocab_size=97,
                                        max_position_embeddings=positions)).eval()


def forwards_counted(model) -> list[int]:
    """A list that grows by one per forward of ``model`` from now on."""
    calls: list[int] = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_rope])
def test_over_length_input_names_the_limit_and_suggests_windows(build):
    model = build(16)
    heta = HETA(model, config=SPEC)
    calls = forwards_counted(model)
    ids = random_ids(0, 20) % 20
    with pytest.raises(ValueError, match=r"19 context tokens and the target make 20 positions, more than this \w+ "
                                         r"model's limit of 16 \(max_position_embeddings\); pass window_size <= 15"):
        heta.attribute(ids)
    with pytest.raises(ValueError, match="a window of 16 tokens and the target make 17 positions"):
        heta.attribute(ids, window_size=16)
    with pytest.raises(ValueError, match="limit of 16"):
        heta.attribute(ids, targets=[5, 19])
    with pytest.raises(ValueError, match=r"12 prompt tokens \+ max_new_tokens 5 exceed the model's limit of 16"):
        heta.explain_generation(ids[:12], max_new_tokens=5)
    assert calls == []
    windowed = heta.attribute(ids, window_size=8, samples=1)  # what the message suggests works
    assert len(windowed) == 19 and torch.isfinite(windowed.scores).all()
    # the sink token takes a position too, in every window, and the message counts it
    ids = ids.clamp_min(2)  # no BOS (id 0 or 1) in the text: the sink is added
    with pytest.raises(ValueError, match=r"15 context tokens, the sink token and the target make 17 positions, "
                                         r".* pass window_size <= 14"):
        heta.attribute(ids[:16], sink="bos")
    with pytest.raises(ValueError, match="a window of 15 tokens, the sink token and the target make 17 positions"):
        heta.attribute(ids, sink="bos", window_size=15)
    with pytest.raises(ValueError, match="15 context tokens, the sink token and the target make 17"):
        heta.attribute(ids[:16], targets=[3, 15], sink="bos")
    assert calls == []
    assert len(heta.attribute(ids[:15], sink="bos", samples=1)) == 14  # 14 + sink + target = 16 fits


def test_an_input_that_cannot_fit_the_budget_is_refused_with_bytes_needed():
    model = tiny_rope(512)
    heta = HETA(model, config=SPEC)
    calls = forwards_counted(model)
    ids = random_ids(1, 200)
    budget = forward_bytes(heta.lm, 101)  # a 100-token window fits, 200 tokens do not
    with pytest.raises(ValueError, match=r"200 tokens need about [\d,]+ MiB for the shared forward \(one layer's "
                                         r"attention maps x 4 heads x 200\^2 .* above memory_budget .* MiB free "
                                         r"on cpu\); pass window_size <= 100 to attribute it in windows"):
        heta.attribute(ids, memory_budget=budget)
    assert calls == []
    with pytest.warns(MemoryBudgetWarning):  # the forward fits; batches of one position are over, and say so
        assert len(heta.attribute(ids, memory_budget=budget, window_size=100, samples=1)) == 199


# --- the command line ------------------------------------------------------------------------


def save(model, folder) -> str:
    """``model`` with a word-level tokenizer over ``WORDS``, loadable by ``--model``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(dict.fromkeys(WORDS))}}
    words = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]").save_pretrained(folder)
    model.save_pretrained(folder)
    return str(folder)


def one_line_error(capsys, *args: str) -> str:
    capsys.readouterr()  # what came before (saving the model draws a progress bar)
    code = main(list(args))
    captured = capsys.readouterr()
    assert code == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    return lines[0]


def test_cli_gives_one_line_for_each_input_it_cannot_take(capsys, tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    short = save(tiny_gpt2(16), tmp_path / "short")
    text = " ".join(WORDS[:20])
    assert "limit of 16" in one_line_error(capsys, "attribute", text, "--model", short, "-q")
    roomy = save(tiny_gpt2(64), tmp_path / "roomy")
    assert "above memory_budget" in one_line_error(capsys, "attribute", text, "--model", roomy, "-q",
                                                   "--memory-budget", "1K")
    torch.manual_seed(0)
    opt = OPTForCausalLM(OPTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64,
                                   vocab_size=len(WORDS) + 1, word_embed_proj_dim=32))
    unsupported = save(opt, tmp_path / "opt")
    assert "(model_type 'opt') is not a supported model family" in one_line_error(
        capsys, "attribute", text, "--model", unsupported, "-q")
