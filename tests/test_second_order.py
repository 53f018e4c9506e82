"""The hand-derived second-order Functions (issue 14, item 3) and the module swap around the HVPs."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import random_ids, rel_err, tiny_gpt2, tiny_llama
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from transformers.activations import GELUActivation, GELUTanh, NewGELUActivation

from heta_fast import HETA
from heta_fast.config import HETAConfig
from heta_fast.second_order import fused_second_order, gelu, layer_norm, rms_norm, swiglu
from heta_fast.sensitivity import exact as hessian


def _stock_swiglu(g, u):
    return nn.functional.silu(g) * u


def _stock_rms(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _cases(generator: torch.Generator, dtype: torch.dtype, shape=(3, 4, 7)):
    """(name, fused f, stock f, inputs): every Function on fresh random inputs."""
    def rand(*s):
        return torch.randn(*s, generator=generator, dtype=dtype) * 1.5

    d = shape[-1]
    w, b, eps = rand(d), rand(d), 1e-5
    return [
        ("swiglu", swiglu, _stock_swiglu, (rand(*shape), rand(*shape))),
        ("gelu_tanh", lambda x: gelu(x, "tanh"), lambda x: nn.functional.gelu(x, approximate="tanh"), (rand(*shape),)),
        ("gelu", gelu, nn.functional.gelu, (rand(*shape),)),
        ("rms_norm", lambda x: rms_norm(x, w, eps), lambda x: _stock_rms(x, w, eps), (rand(*shape),)),
        ("rms_norm_no_weight", lambda x: rms_norm(x, None, eps), lambda x: _stock_rms(x, 1.0, eps), (rand(*shape),)),
        ("layer_norm", lambda x: layer_norm(x, w, b, eps),
         lambda x: nn.functional.layer_norm(x, (d,), w, b, eps), (rand(*shape),)),
        ("layer_norm_no_affine", lambda x: layer_norm(x, None, None, eps),
         lambda x: nn.functional.layer_norm(x, (d,), None, None, eps), (rand(*shape),)),
    ]


@pytest.mark.parametrize("index", range(7))
def test_first_and_second_derivatives_match_autograd_in_float64(fresh_seed, index):
    g = torch.Generator().manual_seed(fresh_seed)
    name, fused, stock, inputs = _cases(g, torch.float64, shape=(2, 3, 6))[index]
    inputs = tuple(x.requires_grad_(True) for x in inputs)
    assert rel_err(fused(*inputs).detach(), stock(*inputs).detach()) < 1e-12, name
    assert gradcheck(fused, inputs), name
    assert gradgradcheck(fused, inputs), name


@pytest.mark.parametrize("index", range(7))
def test_batched_float32_hvp_matches_autograd_of_the_stock_formula(fresh_seed, index):
    """Reverse over reverse with m probes batched, as the exact S runs it, against stock autograd."""
    g = torch.Generator().manual_seed(fresh_seed)
    name, fused, stock, inputs = _cases(g, torch.float32, shape=(3, 5, 64))[index]
    outer = torch.randn(3, 5, 64, generator=g)  # a random linear read-out makes the scalar
    probes = [torch.randn(4, *x.shape, generator=g) for x in inputs]
    results = []
    for f in (fused, stock):
        leaves = tuple(x.detach().clone().requires_grad_(True) for x in inputs)
        y = (f(*leaves) * outer).pow(2).sum()  # squared: a nonzero second derivative through every path
        grads = torch.autograd.grad(y, leaves, create_graph=True)
        dot = sum((gr[None] * p).flatten(1).sum(1) for gr, p in zip(grads, probes, strict=True))  # [m]
        hvps = torch.autograd.grad(dot, leaves, grad_outputs=torch.eye(4), is_grads_batched=True)
        results.append((grads, hvps))
    (fg, fh), (sg, sh) = results
    for a, b in zip(fg + fh, sg + sh, strict=True):
        assert rel_err(a.detach(), b.detach()) < 1e-5, name


@pytest.mark.parametrize("index", range(7))
def test_probe_batched_pass_has_no_vmap_fallback(index):
    """Every op of the batched second pass has a legacy-vmap batching rule (a fallback loops over m)."""
    name, fused, _, inputs = _cases(torch.Generator().manual_seed(0), torch.float32)[index]
    leaves = tuple(x.requires_grad_(True) for x in inputs)
    grads = torch.autograd.grad(fused(*leaves).pow(2).sum(), leaves, create_graph=True)
    previous = torch._C._debug_only_are_vmap_fallback_warnings_enabled()
    torch._C._debug_only_display_vmap_fallback_warnings(True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.autograd.grad(grads, leaves, grad_outputs=[torch.randn(3, *g.shape) for g in grads],
                                is_grads_batched=True)
    finally:
        torch._C._debug_only_display_vmap_fallback_warnings(previous)
    assert [str(w.message)[:120] for w in caught if "batching rule" in str(w.message)] == [], name


# -- the module swap ------------------------------------------------------------------------------

def _forwards(model: nn.Module) -> dict[str, object]:
    return {name: module.__dict__.get("forward") for name, module in model.named_modules()}


@pytest.mark.parametrize("build, expected", [(tiny_llama, 3 + 2 * 3 + 1), (tiny_gpt2, 2 + 2 * 2 + 1)])
def test_swap_covers_every_mlp_and_norm_and_restores_the_model(fresh_seed, build, expected):
    """Llama: 3 MLPs, 2 norms per layer and the final norm; GPT-2: 2 GELUs, 2 LayerNorms per layer, ln_f."""
    model = build(fresh_seed % 1000)
    ids = random_ids(fresh_seed, 12)[None]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        want = model(ids).logits
    before = _forwards(model)
    rng = torch.get_rng_state()
    with fused_second_order(model) as count, torch.no_grad():
        got = model(ids).logits
        swapped = [name for name, f in _forwards(model).items() if f is not None]
    assert count == expected == len(swapped)
    assert torch.equal(torch.get_rng_state(), rng)  # the agreement check draws from its own generator
    assert rel_err(got, want) < 1e-5
    assert _forwards(model) == before
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_swap_restores_on_exception_and_keeps_an_instance_forward():
    model = tiny_llama(0)
    norm = model.model.norm
    own = norm.forward  # a bound method set on the instance before the swap
    norm.forward = own
    with pytest.raises(RuntimeError, match="boom"), fused_second_order(model):
        assert model.model.norm.forward is not own
        raise RuntimeError("boom")
    assert norm.__dict__["forward"] is own
    assert [n for n, f in _forwards(model).items() if f is not None] == ["model.norm"]


def test_look_alike_modules_are_left_alone():
    """A norm named like RMSNorm whose formula differs (Gemma's (1 + w)) keeps its forward."""
    class OffsetRMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8))
            self.variance_epsilon = 1e-6

        def forward(self, x):
            return (1.0 + self.weight) * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)

    model = nn.Sequential(OffsetRMSNorm(), NewGELUActivation(), GELUTanh(), GELUActivation(), nn.GELU())
    with fused_second_order(model) as count:
        assert "forward" not in model[0].__dict__
        assert all("forward" in m.__dict__ for m in model[1:])
    assert count == 4


def test_weights_that_require_grad_fall_back_to_the_stock_forward():
    model = tiny_llama(0)
    model.requires_grad_(True)
    ids = random_ids(1, 6)[None]
    with fused_second_order(model):
        model(ids).logits.sum().backward()
    assert model.model.norm.weight.grad is not None
    assert model.model.layers[0].input_layernorm.weight.grad is not None


# -- in the exact path ---------------------------------------------------------------------------

@pytest.mark.parametrize("build", [tiny_llama, tiny_gpt2])
def test_exact_sensitivity_equals_the_stock_modules_run(fresh_seed, build):
    heta = HETA(build(fresh_seed % 1000))
    lm = heta.lm
    ids = random_ids(fresh_seed, 16)
    E = lm.embed(ids)
    t = E.shape[0] - 1
    with torch.no_grad():
        key_values = lm.key_values(lm.hidden(E[None, :t], use_cache=True))
    config = HETAConfig(samples=3, seed=fresh_seed)
    fused = hessian.hessian_sensitivity(lm, E, int(ids[-1]), key_values, config, 1 << 30)
    stock = hessian.hessian_sensitivity.__wrapped__(lm, E, int(ids[-1]), key_values, config, 1 << 30)
    assert rel_err(fused, stock) < 1e-5
    assert all("forward" not in m.__dict__ for m in lm.model.modules())
