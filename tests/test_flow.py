"""``flow``: the semantic flow ``M`` as the spec defines it (``rollout``) or divided by its positional drift."""

from __future__ import annotations

import pytest
import torch
from helpers import random_ids, rel_err

from heta_fast import HETA, HETAConfig
from heta_fast.semantic_flow import uniform_flow


def test_uniform_flow_is_the_rollout_of_uniform_causal_attention():
    size, layers, rows = 9, 4, [8, 5]
    U = torch.tril(torch.ones(size, size, dtype=torch.float64))
    U_hat = 0.5 * U / U.sum(dim=-1, keepdim=True) + 0.5 * torch.eye(size, dtype=torch.float64)
    expected = torch.zeros(len(rows), size, dtype=torch.float64)
    for k, p in enumerate(rows):
        R = torch.eye(size, dtype=torch.float64)
        for _ in range(layers):
            R = U_hat @ R
            expected[k] += R[p]
    got = uniform_flow(size, rows, layers)
    assert rel_err(got, expected) < 1e-6
    assert torch.count_nonzero(got[1, 6:]) == 0 and bool((got[1, :6] > 0).all())


@pytest.mark.parametrize("flow_layers", [None, 2])
def test_position_normalised_flow_matches_the_reference(model, fresh_seed, flow_layers):
    heta = HETA(model)
    ids = random_ids(fresh_seed, 11)
    config = HETAConfig.paper(samples=1, seed=fresh_seed % 1000, flow="position_normalised", flow_layers=flow_layers)
    fast = heta.attribute(ids, config=config.replace(backend="torch"))
    ref = heta.attribute(ids, config=config.replace(backend="reference"))
    assert rel_err(fast.M, ref.M) < 1e-5
    plain = heta.attribute(ids, config=config.replace(backend="torch", flow="rollout"))
    assert not torch.allclose(fast.M, plain.M)  # the variant does change M
    many = heta.attribute(ids, targets=[10, 6], config=config.replace(backend="torch"))
    assert rel_err(many[0].M, fast.M) < 1e-5
    assert rel_err(many[1].M, heta.attribute(ids, target_pos=6, config=config.replace(backend="reference")).M) < 1e-5


def test_unknown_flow_is_named():
    with pytest.raises(ValueError, match="unknown flow 'uniform'; expected one of rollout, position_normalised"):
        HETAConfig(flow="uniform")
