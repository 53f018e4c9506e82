"""Bad input fails with a clear ValueError/TypeError before any model work (issue 2, item 4)."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_gpt2, tiny_llama

from heta_fast import HETA, HETAConfig


class _WordTokenizer:
    """Just enough tokenizer for text input: whitespace words -> ids."""

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [hash(w) % 50 for w in text.split()]}

    def decode(self, ids):
        return " ".join(str(i) for i in ids)


@pytest.fixture(params=["gpt2", "llama"])
def guarded(request, monkeypatch):
    """A HETA whose model raises if anything runs it: errors must come first."""
    heta = HETA({"gpt2": tiny_gpt2, "llama": tiny_llama}[request.param](), _WordTokenizer())

    def forbidden(*args, **kwargs):
        raise AssertionError("the model ran before the input was validated")

    for module in (heta.lm.model, heta.lm.backbone, heta.lm.embedding):
        monkeypatch.setattr(module, "forward", forbidden)
    return heta


IDS = [3, 1, 4, 1, 5, 9]


@pytest.mark.parametrize("call, error, message", [
    (lambda h: h.attribute(""), ValueError, "empty text"),
    (lambda h: h.attribute("   "), ValueError, "empty text"),
    (lambda h: h.attribute([]), ValueError, "empty input"),
    (lambda h: h.attribute([7]), ValueError, "at least 2 tokens"),
    (lambda h: h.attribute("word"), ValueError, "at least 2 tokens"),
    (lambda h: h.attribute(IDS, target_pos=0), ValueError, "target_pos 0 is out of range"),
    (lambda h: h.attribute(IDS, target_pos=-1), ValueError, "target_pos -1 is out of range"),
    (lambda h: h.attribute(IDS, target_pos=6), ValueError, "target_pos 6 is out of range"),
    (lambda h: h.attribute(IDS, target_pos=2.0), TypeError, "target_pos must be an int"),
    (lambda h: h.attribute(IDS, target_token=10**6), ValueError, "outside the vocabulary"),
    (lambda h: h.attribute([1, 2, 10**6]), ValueError, "token id 1000000 is outside the vocabulary"),
    (lambda h: h.attribute(torch.rand(4)), TypeError, "1-D integer tensor"),
    (lambda h: h.attribute(3.5), TypeError, "expected text or token ids"),
    (lambda h: h.attribute(IDS, beta=-0.1), ValueError, "beta must be >= 0"),
    (lambda h: h.attribute(IDS, gamma=-1), ValueError, "gamma must be >= 0"),
    (lambda h: h.attribute(IDS, beta=float("nan")), ValueError, "beta must be >= 0"),
    (lambda h: h.attribute(IDS, samples=0), ValueError, "m (samples) must be >= 1"),
    (lambda h: h.attribute(IDS, samples=2.5), TypeError, "samples must be an int"),
    (lambda h: h.attribute(IDS, mask="blank"), ValueError, "unknown mask 'blank'"),
    (lambda h: h.attribute(IDS, backend="jax"), ValueError, "unknown backend 'jax'"),
    (lambda h: h.attribute(IDS, overlap=1.0), ValueError, "overlap must lie in [0, 1)"),
    (lambda h: h.attribute(IDS, overlap=-0.2), ValueError, "overlap must lie in [0, 1)"),
    (lambda h: h.attribute(IDS, window_size=-3), ValueError, "window_size must be >= 0"),
    (lambda h: h.attribute(IDS, layer_subset=0), ValueError, "layer_subset must be >= 1"),
    (lambda h: h.attribute(IDS, value_source="keys"), ValueError, "unknown value_source 'keys'"),
    (lambda h: h.attribute(IDS, seed=-1), ValueError, "seed must lie in [0, 2**32)"),
    (lambda h: h.attribute(IDS, seed=2**32), ValueError, "seed must lie in [0, 2**32)"),
    (lambda h: h.attribute(IDS, hessian="diagonal"), ValueError, "unknown hessian estimator 'diagonal'"),
    (lambda h: h.attribute(IDS, hessian="low_rank", backend="reference"), ValueError, "exact Hessian only"),
    (lambda h: h.attribute(IDS, memory_budget=0), ValueError, "memory_budget must be a positive byte count"),
    (lambda h: h.attribute(IDS, retain_heap="yes"), TypeError, "retain_heap must be a bool"),
])
def test_bad_input_is_named_before_model_work(guarded, call, error, message):
    with pytest.raises(error) as info:
        call(guarded)
    assert message in str(info.value)


def test_config_rejects_bad_values_at_construction():
    with pytest.raises(ValueError, match="beta must be >= 0"):
        HETAConfig(beta=-1)
    with pytest.raises(TypeError, match="config must be a HETAConfig"):
        HETA(tiny_gpt2(), config={"beta": 1})


def test_target_backend_triton_without_cuda_is_named(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from heta_fast import backends

    ok, why = backends.triton_status(torch.device("cpu"))
    if ok:
        pytest.skip("triton can run here")
    with pytest.raises(ValueError, match="backend 'triton' cannot run"):
        backends.check("triton", torch.device("cpu"))


@pytest.mark.parametrize("build", ["bert", "t5", "plain_module"])
def test_non_causal_models_are_refused(build):
    if build == "bert":
        from transformers import BertConfig, BertForMaskedLM

        model = BertForMaskedLM(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                           intermediate_size=64, vocab_size=50))
        match = "not a causal language model"
    elif build == "t5":
        from transformers import T5Config, T5ForConditionalGeneration

        model = T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=50,
                                                    d_kv=16))
        match = "encoder-decoder"
    else:
        model = torch.nn.Linear(3, 3)
        match = "expected a transformers causal language model"
    with pytest.raises(TypeError, match=match):
        HETA(model)


def test_unsupported_family_is_named_with_the_supported_ones():
    from transformers import OPTConfig, OPTForCausalLM

    model = OPTForCausalLM(OPTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=64,
                                     vocab_size=50, word_embed_proj_dim=32))
    with pytest.raises(TypeError, match=r"OPTForCausalLM \(model_type 'opt'\) is not a supported model family; "
                                        r"supported families \(transformers model_type\): cohere, gemma, "):
        HETA(model)
