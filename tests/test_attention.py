"""The grouped-query eager kernel against transformers' own eager kernel."""

from __future__ import annotations

import pytest
import torch
from helpers import random_ids, rel_err, tiny_gpt2, tiny_llama

from heta_fast import attention
from heta_fast.attention import ATTENTION_NAME, stock_attention
from heta_fast.model import CausalLM


def test_every_model_routes_through_heta_attention_and_only_grouped_ones_take_the_grouped_path(fresh_seed):
    """Every call passes through ``grouped_eager_attention`` (so it can be recorded); a model without
    grouped-query heads gets its own family's eager kernel there."""
    import sys

    for build, grouped in ((tiny_llama, True), (tiny_gpt2, False)):
        lm = CausalLM(build(fresh_seed % 1000))
        assert lm.attention_implementation == ATTENTION_NAME
        with lm.prepared(), torch.no_grad(), attention.record_attention() as calls:
            lm.hidden(lm.embed(torch.tensor([1, 2, 3, 4]))[None])
        assert len(calls) == lm.num_layers
        family = sys.modules[type(calls[0].module).__module__].eager_attention_forward
        assert all((call.kernel is attention._grouped_kernel) == grouped for call in calls)
        assert all((call.kernel is family) == (not grouped) for call in calls)


def test_recorded_calls_recompute_any_block_of_rows_exactly(model, fresh_seed):
    lm = CausalLM(model)
    E = lm.embed(torch.randint(0, 90, (13,), generator=torch.Generator().manual_seed(fresh_seed)))
    with lm.prepared(), torch.no_grad():
        with attention.record_attention() as calls:
            out = lm.hidden(E[None], output_attentions=True)
        for call, kept in zip(calls, out.attentions, strict=True):
            blocks = torch.cat([call.rows(a, min(13, a + 5)) for a in range(0, 13, 5)], dim=2)
            assert rel_err(blocks, kept) < 1e-6  # the same kernel on fewer rows: the same numbers up to matmul order


@pytest.fixture
def llama_and_calls(fresh_seed):
    """A tiny GQA Llama, and whether each call of the registered kernel took the grouped path."""
    from transformers import AttentionInterface

    lm = CausalLM(tiny_llama(fresh_seed % 1000))  # registers the kernel; spy on it afterwards
    real, calls = attention.grouped_eager_attention, []

    def spy(module, query, key, *args, **kwargs):
        calls.append(attention._grouped.get() and query.shape[1] != key.shape[1])
        return real(module, query, key, *args, **kwargs)

    AttentionInterface.register(ATTENTION_NAME, spy)
    with lm.prepared():
        yield lm, calls
    AttentionInterface.register(ATTENTION_NAME, real)


def test_forward_and_probabilities_match_stock(fresh_seed, llama_and_calls):
    lm, grouped_calls = llama_and_calls
    E = lm.embed(random_ids(fresh_seed, 13))[None]
    with torch.no_grad():
        fast = lm.hidden(E, output_attentions=True)
        with stock_attention():
            stock = lm.hidden(E, output_attentions=True)
    assert grouped_calls == [True] * lm.num_layers + [False] * lm.num_layers
    assert rel_err(fast.last_hidden_state, stock.last_hidden_state) < 1e-6
    for a, b in zip(fast.attentions, stock.attentions, strict=True):
        assert a.shape == b.shape == (1, lm.num_heads, 13, 13)
        assert rel_err(a, b) < 1e-6


def test_hessian_vector_products_match_stock(fresh_seed):
    """The double backward (what the HVPs run) through the grouped kernel equals the stock one."""
    lm = CausalLM(tiny_llama(fresh_seed % 1000))
    ids = random_ids(fresh_seed, 11)
    E = lm.embed(ids)
    probe = torch.randn(E.shape, generator=torch.Generator().manual_seed(fresh_seed))

    def hvp():
        x = E.detach().clone().requires_grad_(True)
        g = torch.log_softmax(lm.unembed(lm.hidden(x[None]).last_hidden_state[0, -1]), dim=-1)[int(ids[0])]
        (grad,) = torch.autograd.grad(g, x, create_graph=True)
        (Hr,) = torch.autograd.grad(grad, x, grad_outputs=probe)
        return Hr

    with lm.prepared():
        fast = hvp()
        with stock_attention():
            stock = hvp()
    assert rel_err(fast, stock) < 1e-5


def test_reference_logits_use_the_stock_kernel(llama_and_calls):
    lm, grouped_calls = llama_and_calls
    with torch.no_grad():
        lm.logits(lm.embed(random_ids(0, 5))[None])
    assert grouped_calls == [False] * lm.num_layers
