"""Reference against the fast backend, per component, on a tiny random Llama (quick; for CI).

    pytest benchmarks --benchmark-enable -q

Each pytest-benchmark group is one component (``semantic_flow``, ``hessian``, ``kl``,
``end_to_end``; ``forward`` for the fast path's shared forward), so the report sets the two
backends side by side. Without ``--benchmark-enable`` the timed tests are skipped; the checks
of the SmolLM2 benchmark's sampling helpers at the bottom always run.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks import bench_smollm
from heta_fast import influence, reference
from heta_fast import semantic_flow as flow
from heta_fast.backends import resolve
from heta_fast.config import HETAConfig
from heta_fast.model import CausalLM
from heta_fast.sensitivity import exact

N_CONTEXT, SAMPLES = 24, 4
BUDGET = 1 << 28


@pytest.fixture(scope="module")
def problem():
    """A tiny random Llama (GQA) and ``N_CONTEXT + 1`` ids, with the fast path's shared forward done."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=64,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    lm = CausalLM(LlamaForCausalLM(config))
    ids = torch.randint(0, lm.vocab_size, (N_CONTEXT + 1,))
    E, y, t = lm.embed(ids), int(ids[-1]), N_CONTEXT
    # the lm-level calls below need what prepared() sets (eager attention: sdpa has no double
    # backward on CPU), so the whole module runs inside it
    with lm.prepared():
        with torch.no_grad(), lm.capture_values("attention") as values:
            out = lm.hidden(E[None, :t], output_attentions=True, use_cache=True)
            log_P = torch.log_softmax(lm.unembed(out.last_hidden_state[0, -1]).double(), dim=-1)
        yield {"lm": lm, "ids": ids, "E": E, "y": y, "attentions": out.attentions, "values": values, "log_P": log_P,
               "key_values": lm.key_values(out), "config": HETAConfig.paper(samples=SAMPLES, memory_budget=BUDGET)}


def _run(benchmark, group: str, fn):
    benchmark.group = group
    benchmark.pedantic(fn, rounds=3, warmup_rounds=1, iterations=1)


# -- reference -----------------------------------------------------------------------------------


def test_reference_semantic_flow(benchmark, problem):
    p = problem
    _run(benchmark, "semantic_flow", lambda: reference.semantic_flow(p["lm"], p["E"], p["config"]))


def test_reference_hessian(benchmark, problem):
    p = problem
    _run(benchmark, "hessian", lambda: reference.hessian_sensitivity(p["lm"], p["E"], p["y"], p["config"]))


def test_reference_kl(benchmark, problem):
    p = problem
    _run(benchmark, "kl", lambda: reference.kl_information(p["lm"], p["E"], p["config"]))


def test_reference_end_to_end(benchmark, problem):
    p = problem
    _run(benchmark, "end_to_end", lambda: resolve("reference", p["lm"]).components(p["lm"], p["ids"], p["config"]))


# -- fast path (torch backend) -------------------------------------------------------------------


def test_torch_forward(benchmark, problem):
    p = problem
    lm, E = p["lm"], p["E"]

    def forward():
        with torch.no_grad(), lm.capture_values("attention"):
            out = lm.hidden(E[None, :N_CONTEXT], output_attentions=True, use_cache=True)
            lm.unembed(out.last_hidden_state[0, -1])

    _run(benchmark, "forward", forward)


def test_torch_semantic_flow(benchmark, problem):
    p = problem
    with torch.no_grad():
        _run(benchmark, "semantic_flow", lambda: flow.semantic_flow(p["lm"], p["attentions"], p["values"], None))


def test_torch_hessian(benchmark, problem):
    p = problem
    _run(benchmark, "hessian", lambda: exact.hessian_sensitivity(p["lm"], p["E"], p["y"], p["key_values"],
                                                                   p["config"], BUDGET))


def test_torch_kl(benchmark, problem):
    p = problem
    _run(benchmark, "kl", lambda: influence.kl_information(p["lm"], p["E"], p["log_P"], p["key_values"], p["config"],
                                                    BUDGET))


def test_torch_end_to_end(benchmark, problem):
    p = problem
    _run(benchmark, "end_to_end", lambda: resolve("torch", p["lm"]).components(p["lm"], p["ids"], p["config"]))


# -- the SmolLM2 benchmark's sampling helpers (not timed; always run) ----------------------------


def test_fast_position_is_the_fast_paths_own_work(problem):
    """Position ``i`` run alone on the shifted prefix gives the full fast run's ``S_i``."""
    p = problem
    full = exact.hessian_sensitivity(p["lm"], p["E"], p["y"], p["key_values"], p["config"], BUDGET)
    for i in (0, 7, N_CONTEXT - 1):
        _, S_i = bench_smollm.fast_position(p["lm"], p["E"], p["y"], p["key_values"], p["config"], i)
        torch.testing.assert_close(S_i, full[i], rtol=1e-4, atol=1e-6)


def test_sampled_estimates(problem):
    p = problem
    ref = bench_smollm.reference_hessian_sampled(p["lm"], p["E"], p["y"], p["config"], 5)
    assert ref["timed"] == 5 and ref["of"] == N_CONTEXT * SAMPLES and ref["estimate"] > ref["build"] > 0
    fast = bench_smollm.fast_hessian_sampled(p["lm"], p["E"], p["y"], p["key_values"], p["config"], 4)
    assert fast["positions"][0] == 0 and fast["positions"][-1] == N_CONTEXT - 1 and fast["estimate"] > 0
    assert "extrapolated from 4 of 24 positions" in fast["label"]


def test_growth_exponent():
    assert bench_smollm.growth_exponent([32, 64, 128], [1.0, 4.0, 16.0]) == pytest.approx(2.0)
    assert bench_smollm.growth_exponent([32], [1.0]) is None
