"""heta_fast.evaluation.methods: each baseline against a computation by hand on a tiny model."""

from __future__ import annotations

import pytest
import torch
from helpers import random_ids, rel_err, tiny_llama

from heta_fast import HETA, HETAConfig
from heta_fast.evaluation import methods

pytest.importorskip("captum")


def _setup(seed: int, n: int = 10):
    model = tiny_llama(seed % 1000)
    heta = HETA(model)
    ids = random_ids(seed, n + 1).tolist()
    return model, heta, ids[:n], ids[n]


def _g(model, E, target):
    return torch.log_softmax(model(inputs_embeds=E[None]).logits[0, -1], dim=-1)[target]


def _E(model, ids):
    return model.get_input_embeddings()(torch.tensor(ids)).detach().clone()


def test_gradient_baselines_by_hand(fresh_seed):
    model, heta, ids, y = _setup(fresh_seed)
    E = _E(model, ids).requires_grad_(True)
    (grad,) = torch.autograd.grad(_g(model, E, y), E)
    assert rel_err(methods.saliency(heta, ids, y), grad.norm(dim=-1)) < 1e-4
    assert rel_err(methods.input_x_gradient(heta, ids, y), (E * grad).sum(dim=-1).detach()) < 1e-4


def test_occlusion_is_the_drop_when_a_row_is_zeroed(fresh_seed):
    model, heta, ids, y = _setup(fresh_seed)
    E = _E(model, ids)
    with torch.no_grad():
        full = _g(model, E, y)
        expected = []
        for i in range(len(ids)):
            masked = E.clone()
            masked[i] = 0
            expected.append(float(full - _g(model, masked, y)))
    assert rel_err(methods.occlusion(heta, ids, y), torch.tensor(expected)) < 1e-4


def test_integrated_gradients_reports_its_completeness_error(fresh_seed):
    model, heta, ids, y = _setup(fresh_seed)
    scores = methods.integrated_gradients(heta, ids, y)
    E = _E(model, ids)
    baseline = model.get_input_embeddings().weight.detach().mean(dim=0).expand_as(E)
    with torch.no_grad():
        change = float(_g(model, E, y) - _g(model, baseline, y))
    assert methods.LAST_IG_DELTA["change"] == pytest.approx(change, rel=1e-4, abs=1e-6)
    assert methods.LAST_IG_DELTA["delta"] == pytest.approx(abs(float(scores.sum()) - change), rel=1e-3, abs=1e-5)
    assert methods.LAST_IG_DELTA["delta"] < 0.05 * max(abs(change), 1e-3) + 1e-4  # a smooth tiny model: small


def test_rollout_and_last_attention_by_hand(fresh_seed):
    model, heta, ids, y = _setup(fresh_seed)
    with torch.no_grad():
        attentions = model(torch.tensor([ids]), output_attentions=True).attentions
    n = len(ids)
    R = torch.eye(n, dtype=torch.float64)
    for A in attentions:
        a = 0.5 * A[0].double().mean(dim=0) + 0.5 * torch.eye(n, dtype=torch.float64)
        R = (a / a.sum(dim=-1, keepdim=True)) @ R
    assert rel_err(methods.rollout(heta, ids, y), R[-1]) < 1e-5
    assert rel_err(methods.last_attention(heta, ids, y), attentions[-1][0].mean(dim=0)[-1]) < 1e-5


def test_random_is_seeded_by_the_input(fresh_seed):
    _, heta, ids, y = _setup(fresh_seed)
    a, b = methods.random_scores(heta, ids, y), methods.random_scores(heta, ids, y)
    assert torch.equal(a, b) and a.shape == (len(ids),)
    assert not torch.equal(a, methods.random_scores(heta, ids, (y + 1) % 97))


def test_heta_parts_and_mixes(fresh_seed):
    _, heta, ids, y = _setup(fresh_seed)
    config = HETAConfig.paper(samples=2, beta=0.3, gamma=0.7, seed=fresh_seed % 1000)
    a = heta.attribute(ids, target_pos=len(ids), target_token=y, config=config)
    for part in ("M", "S", "I"):
        assert torch.equal(methods.heta_method(config, part)(heta, ids, y), getattr(a, part))
    assert rel_err(methods.heta_method(config)(heta, ids, y), a.scores) < 1e-6
    assert rel_err(methods.heta_method(config, "SI")(heta, ids, y), 0.3 * a.S + 0.7 * a.I) < 1e-6
    normalised = config.replace(mix="normalised")
    expected = a.M * (0.3 * a.S / a.S.sum() + 0.7 * a.I / a.I.sum())
    assert rel_err(methods.heta_method(normalised)(heta, ids, y), expected) < 1e-5


def test_heta_sensitivity_sees_the_noise_not_the_cached_clean_run(fresh_seed):
    """The parts share one cached attribution per input; under the sensitivity metric's noise
    the cache must not answer, or HETA's sensitivity would read 0."""
    from heta_fast.evaluation import metrics

    _, heta, ids, y = _setup(fresh_seed)
    config = HETAConfig.paper(samples=2, seed=fresh_seed % 1000)
    method = methods.heta_method(config)
    method(heta, ids, y)  # fills the cache with the clean run
    runs = []
    for r in range(3):
        with metrics.embedding_noise(heta.lm, 0.01, fresh_seed + r):
            runs.append(heta.attribute(ids, target_pos=len(ids), target_token=y, config=config).scores)
    expected = float(torch.stack(runs).std(dim=0).mean())
    got = metrics.sensitivity(method, heta, ids, y, list(range(len(ids))), sigma=0.01, seed=fresh_seed)
    assert expected > 0 and got == pytest.approx(expected, rel=1e-5)
    assert torch.equal(method(heta, ids, y), heta.attribute(ids, target_pos=len(ids), target_token=y,
                                                            config=config).scores)


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match="unknown method 'ig'; expected one of heta_exact, "):
        methods.resolve(["saliency", "ig"])


def test_ig_node_derivatives_sum_to_captums_attributions(fresh_seed):
    """The convergence benchmark's per-node ``w dg/dalpha`` are the quadrature Captum sums: their
    total equals the sum of IG's attributions at the same step count; a kept first row scores 0."""
    from benchmarks.bench_ig_convergence import node_derivatives

    model, heta, ids, y = _setup(fresh_seed)
    baseline = methods.mean_embedding_baseline(heta, ids, keep=1)
    assert torch.equal(baseline[0, 0], _E(model, ids)[0])
    assert torch.equal(baseline[0, 1], model.get_input_embeddings().weight.detach().mean(dim=0))
    scores, delta, change = methods.integrated_gradients_with_delta(heta, ids, y, baseline, steps=16)
    nodes = node_derivatives(heta, ids, y, baseline, steps=16)
    assert float(scores[0]) == 0.0
    assert nodes["sum_of_contributions"] == pytest.approx(float(scores.sum()), rel=1e-4, abs=1e-5)
    assert delta == pytest.approx(abs(float(scores.sum()) - change), rel=1e-3, abs=1e-5)
    assert abs(nodes["largest_contribution"]) <= abs(nodes["largest_derivative"])
