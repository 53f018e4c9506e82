"""The memory budget holds: peak memory of a 256-token attribution stays within it (issue 3, item 3)."""

from __future__ import annotations

import pytest
import torch
from conftest import random_ids, tiny_llama
from memory_probe import peak_bytes

from heta_fast import HETA
from heta_fast.memory import MemoryBudgetWarning, forward_bytes

MiB = 1 << 20


@pytest.fixture(scope="module")
def long_input():
    return HETA(tiny_llama(0, layers=2)), random_ids(0, 257)  # 256 context tokens


@pytest.mark.parametrize("budget", [48 * MiB, 160 * MiB])
def test_peak_memory_stays_within_budget(long_input, budget):
    heta, ids = long_input
    peak = peak_bytes(lambda: heta.attribute(ids, samples=2, memory_budget=budget))
    assert peak <= budget, f"peak {peak / MiB:.1f} MiB over the {budget / MiB:.0f} MiB budget"


def test_budget_binds(long_input):
    """With room to spare the backend batches more and uses more: the budget is what held it down."""
    heta, ids = long_input
    small = peak_bytes(lambda: heta.attribute(ids[:129], samples=2, memory_budget=48 * MiB))
    large = peak_bytes(lambda: heta.attribute(ids[:129], samples=2, memory_budget=1 << 40))
    assert large > 2 * small


def test_a_budget_below_one_position_warns(long_input):
    heta, ids = long_input
    budget = forward_bytes(heta.lm, 41)  # the shared forward fits, one position's HVPs do not
    with pytest.warns(MemoryBudgetWarning, match="memory_budget .* is below the estimated"):
        heta.attribute(ids[:40], samples=1, memory_budget=budget)


def test_linear_kl_chunks_keep_memory_bounded():
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(16, 64, generator=g), torch.randn(50_000, 64, generator=g)
    log_p = torch.log_softmax(torch.randn(50_000, generator=g), -1)
    from heta_fast.kl import linear_kl

    whole = peak_bytes(lambda: linear_kl(hidden, weight, None, log_p))
    chunked = peak_bytes(lambda: linear_kl(hidden, weight, None, log_p, vocab_chunk=1024))
    assert whole > 16 * 50_000 * 8  # the float64 logits are there at once
    assert chunked < whole / 3
    assert torch.allclose(linear_kl(hidden, weight, None, log_p), linear_kl(hidden, weight, None, log_p, 1024))


def test_semantic_flow_makes_no_copy_of_the_attention():
    """At long inputs the attention of all layers is most of the memory: the flow reads it in place."""
    from heta_fast.model import CausalLM
    from heta_fast.semantic_flow import semantic_flow

    lm = CausalLM(tiny_llama(1, layers=4))
    n = 192
    E = lm.embed(random_ids(7, n))
    with torch.no_grad(), lm.prepared(), lm.capture_values("attention") as values:
        out = lm.hidden(E[None], output_attentions=True)
        values = list(values)
    one_layer = lm.num_heads * n * n * 4
    with torch.no_grad():
        peak = peak_bytes(lambda: semantic_flow(lm, out.attentions, values, None))
    # one layer's worth of temporaries at most; a stacked or normalised copy would be 4 layers' worth
    assert peak < 1.5 * one_layer, (peak, one_layer)
