"""The user's model after HETA: exactly as it was; half-precision models attributed in float32 (issue 9)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import random_ids, rel_err

from heta_fast import HETA


def snapshot(model: torch.nn.Module) -> dict:
    """Everything a call could change: modes, grad flags, attention kernel, parameter storage and values."""
    return {
        "training": {name: m.training for name, m in model.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "attention": model.config._attn_implementation,
        "storage": {name: (p.dtype, p.data_ptr()) for name, p in model.named_parameters()},
        "values": {name: p.detach().clone() for name, p in model.named_parameters()},
        "buffers": {name: (b.dtype, b.data_ptr()) for name, b in model.named_buffers()},
    }


def assert_unchanged(before: dict, model: torch.nn.Module) -> None:
    after = snapshot(model)
    for key in ("training", "requires_grad", "attention", "storage", "buffers"):
        assert after[key] == before[key], key
    for name, value in before["values"].items():
        assert torch.equal(after["values"][name], value), name


@pytest.fixture(params=[torch.float32, torch.bfloat16])
def users_model(request, model):
    """A model as a user holds it mid-training: train mode, sdpa attention, some parameters frozen."""
    model = model.to(request.param).train()
    model.set_attn_implementation("sdpa")
    for i, p in enumerate(model.parameters()):
        p.requires_grad_(i % 3 != 0)
    return model


class Stop(Exception):
    pass


def stop_midway(stage: str, done: int, total: int) -> None:
    if stage == "hessian" and done >= 1:
        raise Stop


CALLS = {
    "attribute": lambda heta, ids, **kw: heta.attribute(ids, samples=1, **kw),
    "attribute_targets": lambda heta, ids, **kw: heta.attribute(ids, targets=[5, 9], samples=1, **kw),
    "explain_generation": lambda heta, ids, **kw: heta.explain_generation(ids[:6], max_new_tokens=3,
                                                                          stop_at_eos=False, samples=1, **kw),
}


@pytest.mark.parametrize("call", sorted(CALLS))
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_the_model_is_unchanged_after_a_call_and_after_a_failed_one(users_model, call, backend, fresh_seed):
    before = snapshot(users_model)
    heta = HETA(users_model)
    assert_unchanged(before, users_model)  # building HETA changes nothing either
    ids = random_ids(fresh_seed, 12)
    CALLS[call](heta, ids, backend=backend)
    assert_unchanged(before, users_model)
    with pytest.raises(Stop):
        CALLS[call](heta, ids, backend=backend, progress=stop_midway)
    assert_unchanged(before, users_model)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_are_computed_in_float32(model, dtype, fresh_seed):
    """The half model's attribution is the float32 computation on its own (rounded) weights.

    On these tiny models (initializer_range 0.2, curvature far above a trained model's) bf16
    rounding of the weights alone moves S by 0.4-3.6% (12 seeds); the arithmetic adds nothing.
    """
    ids = random_ids(fresh_seed, 16)
    options = dict(samples=2, seed=fresh_seed)
    half_model = copy.deepcopy(model).to(dtype)
    rounded = HETA(copy.deepcopy(half_model).float()).attribute(ids, **options)  # float32, same weights
    half = HETA(half_model)
    fast = half.attribute(ids, backend="torch", **options)
    ref = half.attribute(ids, backend="reference", **options)
    for part in ("M", "S", "I"):
        assert rel_err(getattr(fast, part), getattr(rounded, part)) < 1e-5, part
        assert rel_err(getattr(fast, part), getattr(ref, part)) < 1e-3, part
    several = half.attribute(ids, targets=[15, 8], backend="torch", **options)
    assert rel_err(several[0].S, fast.S) < 1e-3


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_agree_with_the_float32_model(family, dtype, fresh_seed):
    """S, I and M within 2% of the float32 model's, at an initialisation scale like transformers' own
    (0.05; measured worst of 10 seeds: bf16 0.64%, fp16 0.07%)."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(fresh_seed % 1000)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                             num_hidden_layers=3, intermediate_size=64, vocab_size=97,
                                             initializer_range=0.05, attn_implementation="eager"))
    else:
        model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=97, initializer_range=0.05,
                                           bos_token_id=0, eos_token_id=0, attn_implementation="eager"))
    ids = random_ids(fresh_seed, 16) % 97
    options = dict(samples=2, seed=fresh_seed, backend="torch")
    full = HETA(model.eval()).attribute(ids, **options)
    half = HETA(copy.deepcopy(model).to(dtype)).attribute(ids, **options)
    for part in ("M", "S", "I"):
        assert rel_err(getattr(half, part), getattr(full, part)) < 2e-2, part


def test_prepared_upcasts_inside_and_puts_the_originals_back(model):
    model = model.to(torch.bfloat16)
    heta = HETA(model)
    weight = heta.lm.lm_head.weight
    original = weight.data
    with heta.lm.prepared():
        assert weight.dtype == torch.float32 and heta.lm.dtype == torch.float32
        assert torch.equal(weight.data, original.float())
        with heta.lm.prepared():  # nested: no second swap
            assert weight.dtype == torch.float32
        assert weight.dtype == torch.float32
    assert weight.data is original or weight.data.data_ptr() == original.data_ptr()
    assert weight.dtype == torch.bfloat16
