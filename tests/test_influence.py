"""The estimators of ``I`` (``information`` = exact, linearised, screened) against independent computations.

Independent here: the KL of one explicit float64 forward with a token's embedding moved, by
plain ``transformers`` calls; and the exact path's own masked forwards for the screened values.
Every estimator runs through the public API on the torch backend.
"""

from __future__ import annotations

import pytest
import torch
from helpers import VOCAB, random_ids, rel_err, tiny_gpt2

from heta_fast import HETA, HETAConfig
from heta_fast.config import INFORMATIONS
from heta_fast.influence import ESTIMATORS, masked_kl
from heta_fast.kl import mask_rows
from heta_fast.model import CausalLM
from heta_fast.sensitivity import gauss_newton


def embeddings(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.get_input_embeddings()(ids[None])[0]


def kl_of_moved_row(model, E: torch.Tensor, i: int, move: torch.Tensor) -> float:
    """``KL(P || Q)`` at the last context row, ``Q`` with row ``i`` of ``E[:-1]`` moved by ``move``; float64."""
    X = E[:-1].double()
    with torch.no_grad():
        log_p = torch.log_softmax(model(inputs_embeds=X[None]).logits[0, -1].double(), -1)
        X2 = X.clone()
        X2[i] += move.double()
        log_q = torch.log_softmax(model(inputs_embeds=X2[None]).logits[0, -1].double(), -1)
    return float((log_p.exp() * (log_p - log_q)).sum())


@pytest.mark.parametrize("mask", ["zero", "unk"])
def test_linearised_is_the_second_order_term_of_the_kl(fresh_seed, mask):
    """With every logit kept (K = V), linearised I_i = lim KL(P || Q(e_i + eps delta_i)) / eps^2.

    GPT-2 in float64 only: Llama's eager attention takes its softmax in float32 whatever the
    model's dtype, which puts ~1e-7 noise on a KL of order eps^2.
    """
    model = tiny_gpt2(fresh_seed % 1000).double()
    ids = random_ids(fresh_seed, 7)
    config = HETAConfig.paper(samples=1, seed=fresh_seed % 1000, mask=mask, information="linearised",
                              hessian_topk=VOCAB)
    got = HETA(model).attribute(ids, config=config).I.double()
    E = embeddings(model, ids)
    delta = mask_rows(mask, E, torch.arange(6), config.seed).double() - E[:6].double()
    eps = 1e-4
    limit = torch.tensor([kl_of_moved_row(model, E, i, eps * delta[i]) / eps**2 for i in range(6)])
    assert rel_err(got, limit) < 1e-3, (got, limit)


@pytest.mark.parametrize("topk", [3, VOCAB])
def test_linearised_matches_the_explicit_jacobian_formula(model, fresh_seed, topk):
    """``1/2 dz^T (diag P_C - P_C P_C^T) dz`` with ``dz`` from ``torch.autograd.functional.jacobian``."""
    ids = random_ids(fresh_seed, 8)
    config = HETAConfig.paper(samples=1, seed=fresh_seed % 1000, mask="unk", information="linearised",
                              hessian_topk=topk)
    got = HETA(model).attribute(ids, config=config).I.double()
    E = embeddings(model, ids)
    X = E[:-1]

    def logits(x):
        return model(inputs_embeds=x[None]).logits[0, -1].double()

    with torch.no_grad():
        p = torch.softmax(logits(X), -1)
    chosen = torch.topk(p, topk).indices
    if not (chosen == ids[-1]).any():
        chosen = torch.cat([chosen, ids[-1:]])
    J = torch.autograd.functional.jacobian(logits, X)[chosen].double()  # [C, t, d]
    delta = mask_rows("unk", E, torch.arange(7), config.seed).double() - X.double()
    dz = torch.einsum("ctd,td->ct", J, delta)
    pc = p[chosen]
    expected = 0.5 * torch.einsum("ct,cs,st->t", dz, torch.diag(pc) - torch.outer(pc, pc), dz)
    assert rel_err(got, expected) < 1e-4


def test_screened_with_room_for_every_token_is_exact(model, fresh_seed):
    heta = HETA(model)
    ids = random_ids(fresh_seed, 9)
    config = HETAConfig.paper(samples=1, seed=fresh_seed % 1000)
    exact = heta.attribute(ids, config=config)
    screened = heta.attribute(ids, config=config.replace(information="screened", screened_tokens=8))
    assert torch.equal(screened.I, exact.I)


def test_screened_runs_the_top_tokens_exactly_and_rescales_the_rest(model, fresh_seed):
    heta = HETA(model)
    ids = random_ids(fresh_seed, 13)
    config = HETAConfig.paper(samples=1, seed=fresh_seed % 1000, hessian="gauss_newton", hessian_topk=5)
    exact = heta.attribute(ids, config=config).I.double()
    lin = heta.attribute(ids, config=config.replace(information="linearised")).I.double()
    got = heta.attribute(ids, config=config.replace(information="screened", screened_tokens=4)).I.double()
    chosen = torch.topk(lin, 4).indices
    rest = torch.ones(12, dtype=torch.bool)
    rest[chosen] = False
    assert rel_err(got[chosen], exact[chosen]) < 1e-5
    scale = exact[chosen].sum() / lin[chosen].sum()
    assert rel_err(got[rest], scale * lin[rest]) < 1e-5


def test_masked_kl_on_a_subset_of_positions_equals_the_full_run_there(model, fresh_seed):
    lm = CausalLM(model)
    ids = random_ids(fresh_seed, 12)
    E = lm.embed(ids)
    config = HETAConfig(samples=1, seed=fresh_seed % 1000, mask="unk")
    with torch.no_grad():
        out = lm.hidden(E[None, :-1], use_cache=True)
        log_P = torch.log_softmax(lm.unembed(out.last_hidden_state[0, -1:]).double(), -1)
    key_values = lm.key_values(out)
    budget = 1 << 28
    full = masked_kl(lm, E, log_P, None, [11], key_values, config, budget)[0]
    subset = [0, 3, 4, 9]
    part = masked_kl(lm, E, log_P, None, [11], key_values, config, budget, positions=subset)[0]
    assert rel_err(part[subset], full[subset]) < 1e-5
    assert torch.count_nonzero(part[[1, 2, 5, 6, 7, 8, 10]]) == 0


def test_gauss_newton_s_and_linearised_i_share_one_jacobian(model, fresh_seed, monkeypatch):
    calls = []
    original = gauss_newton.logit_jacobian
    monkeypatch.setattr(gauss_newton, "logit_jacobian", lambda *a, **k: calls.append(1) or original(*a, **k))
    ids = random_ids(fresh_seed, 10)
    HETA(model).attribute(ids, targets=[5, 9], samples=1, hessian="gauss_newton", information="linearised")
    assert len(calls) == 2  # one per target, read by S and by I


@pytest.mark.parametrize("information", ["linearised", "screened"])
def test_several_targets_equal_one_at_a_time(model, fresh_seed, information):
    heta = HETA(model)
    ids = random_ids(fresh_seed, 12)
    config = HETAConfig(samples=1, seed=fresh_seed % 1000, information=information, screened_tokens=3)
    many = heta.attribute(ids, targets=[11, 6], config=config)
    for k, t in enumerate([11, 6]):
        assert rel_err(many[k].I, heta.attribute(ids, target_pos=t, config=config).I) < 1e-5


def test_dispatch_table_covers_every_config_choice(model):
    assert sorted(ESTIMATORS) == sorted(INFORMATIONS)
    with pytest.raises(ValueError, match="unknown information estimator 'fisher'; expected one of exact, linearised"):
        HETAConfig(information="fisher")
    with pytest.raises(ValueError, match="screened_tokens must be >= 1"):
        HETAConfig(screened_tokens=0)
    with pytest.raises(ValueError, match="the reference backend computes the exact I only"):
        HETA(model).attribute(torch.tensor([1, 2, 3]), backend="reference", information="screened")
