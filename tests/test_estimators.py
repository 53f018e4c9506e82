"""The curvature estimators (``hessian`` = low_rank, gauss_newton, layer_subset) against brute force.

Brute force here: the explicit Hessian from ``torch.autograd.functional.hessian``, the explicit
logit Jacobian from ``torch.autograd.functional.jacobian``, and this file's own hooks to cut the
model at a layer. Every estimator runs through the public API on the torch backend.
"""

from __future__ import annotations

import pytest
import torch
from helpers import SPEC, random_ids, rel_err

from heta_fast import HETA
from heta_fast.config import HESSIANS, HETAConfig
from heta_fast.memory import sequence_bytes
from heta_fast.model import CausalLM
from heta_fast.rng import rademacher
from heta_fast.sensitivity import ESTIMATORS, estimate_sensitivity
from heta_fast.sensitivity.exact import hessian_sensitivity
from heta_fast.sensitivity.low_rank import sketch_vectors


def embeddings(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.get_input_embeddings()(ids[None])[0]


def blocks(model):
    return model.transformer.h if hasattr(model, "transformer") else model.model.layers


def num_layers(model) -> int:
    return len(blocks(model))


def probe(seed: int, i: int, k: int, d: int) -> torch.Tensor:
    return rademacher(seed, torch.tensor([i]), torch.tensor([k]), d, dtype=torch.float64)[0]


def block_sensitivity(block, n: int, d: int, samples: int, seed: int) -> torch.Tensor:
    """``S_i = (1/m) sum_k ||block(i) r_{i,k}||_1`` with ``block(i)`` a ``[d, d]`` matrix, by loops."""
    S = torch.zeros(n, dtype=torch.float64)
    for i in range(n):
        Hii = block(i).double()
        for k in range(samples):
            S[i] += (Hii @ probe(seed, i, k, d)).abs().sum()
    return S / samples


def input_hessian(model, E: torch.Tensor, y: int) -> torch.Tensor:
    """``d^2 log P[y] / dE^2`` over rows ``0 .. p``: ``[t, d, t, d]`` (row ``t`` does not reach row ``p``)."""
    t, d = E.shape[0] - 1, E.shape[1]

    def g(flat):
        return torch.log_softmax(model(inputs_embeds=flat.view(1, t, d)).logits[0, -1].float(), -1)[y]

    return torch.autograd.functional.hessian(g, E[:t].flatten(), vectorize=True).view(t, d, t, d)


def setup(model, seed: int, length: int):
    ids = random_ids(seed, length)
    return HETA(model, config=SPEC), ids, embeddings(model, ids), int(ids[-1])


# -- low_rank ------------------------------------------------------------------------------------


def test_low_rank_with_full_rank_reproduces_exact(model, fresh_seed):
    heta, ids, E, _ = setup(model, fresh_seed, 7)
    D = (E.shape[0] - 1) * E.shape[1]
    exact = heta.attribute(ids, samples=3, seed=fresh_seed, backend="torch")
    full = heta.attribute(ids, samples=3, seed=fresh_seed, backend="torch", hessian="low_rank", hessian_rank=D)
    assert rel_err(full.S, exact.S) < 1e-4
    assert torch.equal(full.M, exact.M) and torch.equal(full.I, exact.I)


def test_low_rank_matches_explicit_sketch(model, fresh_seed):
    """Rank k < t d: Q = qr(H Omega), B = Q^T H Q built from the explicit Hessian and the same sketch."""
    heta, ids, E, y = setup(model, fresh_seed, 8)
    t, d = E.shape[0] - 1, E.shape[1]
    rank, m, seed = 12, 2, fresh_seed
    got = heta.attribute(ids, samples=m, seed=seed, backend="torch", hessian="low_rank", hessian_rank=rank)
    H = input_hessian(model, E, y).reshape(t * d, t * d).double()
    omega = sketch_vectors(seed, torch.arange(rank), t, d, dtype=torch.float64).reshape(rank, t * d).T
    assert set(omega.unique().tolist()) == {-1.0, 1.0}
    Q, _ = torch.linalg.qr(H @ omega)
    approx = (Q @ (Q.T @ H @ Q) @ Q.T).view(t, d, t, d)
    expected = block_sensitivity(lambda i: approx[i, :, i, :], t, d, m, seed)
    assert rel_err(got.S, expected) < 1e-4


def test_low_rank_is_deterministic_in_the_seed(model, fresh_seed):
    heta, ids, _, _ = setup(model, fresh_seed, 9)
    options = dict(samples=2, backend="torch", hessian="low_rank", hessian_rank=6)
    a = heta.attribute(ids, seed=fresh_seed, **options).S
    b = heta.attribute(ids, seed=fresh_seed, **options).S
    c = heta.attribute(ids, seed=(fresh_seed + 1) % 2**32, **options).S
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sketch_stream_differs_from_the_probes(fresh_seed):
    sketch = sketch_vectors(fresh_seed, torch.arange(4), 3, 64)  # [s, i, d]
    for s in range(4):
        for i in range(3):
            assert not torch.equal(sketch[s, i], rademacher(fresh_seed, torch.tensor([i]), torch.tensor([s]), 64)[0])
    assert torch.equal(sketch[2:], sketch_vectors(fresh_seed, torch.arange(2, 4), 3, 64))


# -- gauss_newton ---------------------------------------------------------------------------------


@pytest.mark.parametrize("topk", [1, 5])
def test_gauss_newton_matches_explicit_jacobian(model, fresh_seed, topk):
    heta, ids, E, _ = setup(model, fresh_seed, 9)
    t, d = E.shape[0] - 1, E.shape[1]
    # explain a token the model ranks low half of the time, so the "plus the target" case is hit
    g = torch.Generator().manual_seed(fresh_seed)
    y = int(ids[-1]) if fresh_seed % 2 else int(torch.randint(0, model.config.vocab_size, (1,), generator=g))
    m, seed = 3, fresh_seed
    got = heta.attribute(ids, target_token=y, samples=m, seed=seed, backend="torch", hessian="gauss_newton",
                         hessian_topk=topk)
    with torch.no_grad():
        P = torch.softmax(model(inputs_embeds=E[None, :t]).logits[0, -1].double(), -1)
    chosen = torch.argsort(P, descending=True)[:topk].tolist()
    if y not in chosen:
        chosen.append(y)
    chosen = torch.tensor(chosen)

    def logits(flat):
        return model(inputs_embeds=flat.view(1, t, d)).logits[0, -1, chosen]

    J = torch.autograd.functional.jacobian(logits, E[:t].flatten(), vectorize=True).double().view(-1, t, d)
    Pc = P[chosen]
    Lam = -(torch.diag(Pc) - torch.outer(Pc, Pc))
    assert torch.linalg.eigvalsh(Lam).max() <= 1e-12  # log-softmax is concave
    expected = block_sensitivity(lambda i: J[:, i].T @ Lam @ J[:, i], t, d, m, seed)
    assert rel_err(got.S, expected) < 1e-4


def test_gauss_newton_is_deterministic(model, fresh_seed):
    heta, ids, _, _ = setup(model, fresh_seed, 8)
    options = dict(samples=2, seed=fresh_seed, backend="torch", hessian="gauss_newton", hessian_topk=4)
    assert torch.equal(heta.attribute(ids, **options).S, heta.attribute(ids, **options).S)


# -- layer_subset ---------------------------------------------------------------------------------


def test_layer_subset_of_all_layers_equals_exact(model, fresh_seed):
    heta, ids, _, _ = setup(model, fresh_seed, 8)
    exact = heta.attribute(ids, samples=3, seed=fresh_seed, backend="torch")
    every = heta.attribute(ids, samples=3, seed=fresh_seed, backend="torch", hessian="layer_subset",
                           hessian_layers=num_layers(model))
    more = heta.attribute(ids, samples=3, seed=fresh_seed, backend="torch", hessian="layer_subset",
                          hessian_layers=num_layers(model) + 5)  # clamped to N
    assert rel_err(every.S, exact.S) < 1e-4
    assert torch.equal(every.S, more.S)


@pytest.mark.parametrize("batching", ["one position, probes in two groups", "many positions"])
def test_exact_path_gives_the_explicit_hessian_blocks_under_any_batching(model, fresh_seed, batching):
    """The fast exact path builds one graph per batch of positions; every batching gives ``H_ii r_{i,k}``."""
    _, ids, E, y = setup(model, fresh_seed, 11)
    t, d, m = E.shape[0] - 1, E.shape[1], 3
    lm = CausalLM(model)
    config = HETAConfig.paper(samples=m, seed=fresh_seed)
    batches: list[int] = []
    with lm.prepared():
        with torch.no_grad():
            key_values = lm.key_values(lm.hidden(E[None, :t], use_cache=True))
        # the graph (2 copies) and 2 probes (2 each) of the first position fit; 3 probes do not
        budget = sequence_bytes(lm, t, t, 6) if batching.startswith("one") else 1 << 40
        S = hessian_sensitivity(lm, E, y, key_values, config, budget,
                                progress=lambda _stage, done, _total: batches.append(done))
    H = input_hessian(model, E, y)
    want = block_sensitivity(lambda i: H[i, :, i, :], t, d, m, fresh_seed)
    assert rel_err(S, want) < 1e-4
    if batching.startswith("one"):
        assert batches[0] == 1
    else:
        assert batches == [2, 4, 6, 8, 10]  # at most ceil(t / 8) positions a batch


def residual_hessian(model, E: torch.Tensor, y: int, start: int) -> torch.Tensor:
    """``d^2 log P[y] / dh^2`` for ``h`` the input of block ``start`` at rows ``0 .. p``: ``[t, d, t, d]``.

    ``h`` is caught with a pre-hook; then the whole model is run again with block ``start``'s
    input replaced by the variable (the earlier blocks' output is discarded).
    """
    t, d = E.shape[0] - 1, E.shape[1]
    block = blocks(model)[start]
    seen = []

    def catch(_m, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    handle = block.register_forward_pre_hook(catch, with_kwargs=True)
    with torch.no_grad():
        model(inputs_embeds=E[None, :t])
    handle.remove()
    h0 = seen[0][0]

    def G(flat):
        def swap(_m, args, kwargs):
            hidden = flat.view(1, t, d)
            return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})

        handle = block.register_forward_pre_hook(swap, with_kwargs=True)
        try:
            logits = model(inputs_embeds=E[None, :t]).logits[0, -1]
        finally:
            handle.remove()
        return torch.log_softmax(logits.float(), -1)[y]

    with torch.no_grad():  # the swap really feeds h: same logits as the plain model
        assert abs(float(G(h0.flatten())) - float(torch.log_softmax(model(inputs_embeds=E[None, :t]).logits[0, -1],
                                                                     -1)[y])) < 1e-5
    return torch.autograd.functional.hessian(G, h0.flatten(), vectorize=True).view(t, d, t, d)


def test_layer_subset_matches_hessian_of_the_residual_stream(model, fresh_seed):
    heta, ids, E, y = setup(model, fresh_seed, 9)
    t, d = E.shape[0] - 1, E.shape[1]
    N = num_layers(model)
    k = 1 + fresh_seed % (N - 1)  # 1 .. N - 1
    m, seed = 3, fresh_seed
    got = heta.attribute(ids, samples=m, seed=seed, backend="torch", hessian="layer_subset", hessian_layers=k)
    H = residual_hessian(model, E, y, N - k)
    expected = block_sensitivity(lambda i: H[i, :, i, :], t, d, m, seed)
    assert rel_err(got.S, expected) < 1e-4
    assert torch.equal(got.S, heta.attribute(ids, samples=m, seed=seed, backend="torch", hessian="layer_subset",
                                             hessian_layers=k).S)


def test_layer_subset_leaves_the_model_intact(model, fresh_seed):
    heta, ids, E, _ = setup(model, fresh_seed, 7)
    before = [id(b) for b in blocks(model)]
    with torch.no_grad():
        logits = model(inputs_embeds=E[None]).logits
    heta.attribute(ids, samples=1, backend="torch", hessian="layer_subset", hessian_layers=1)
    assert [id(b) for b in blocks(model)] == before
    assert all(not b._forward_pre_hooks for b in blocks(model))
    with torch.no_grad():
        assert torch.equal(model(inputs_embeds=E[None]).logits, logits)


# -- dispatch -------------------------------------------------------------------------------------


def test_reference_backend_refuses_estimators(model):
    with pytest.raises(ValueError, match="exact"):
        HETA(model).attribute(torch.tensor([1, 2, 3]), config=HETAConfig(backend="reference", hessian="low_rank"))


@pytest.mark.parametrize("hessian", ["low_rank", "gauss_newton", "layer_subset"])
def test_progress_counts_positions_like_exact(model, fresh_seed, hessian):
    heta, ids, _, _ = setup(model, fresh_seed, 8)
    calls = []
    heta.attribute(ids, samples=1, backend="torch", hessian=hessian, hessian_rank=4, hessian_layers=1,
                   progress=lambda stage, done, total: calls.append((done, total)) if stage == "hessian" else None)
    n = ids.numel() - 1
    assert calls and calls[-1] == (n, n)
    assert all(total == n for _, total in calls)
    assert [done for done, _ in calls] == sorted(done for done, _ in calls)


def test_dispatch_table_covers_every_config_choice_and_exact_is_the_exact_path(model, fresh_seed):
    assert sorted(ESTIMATORS) == sorted(HESSIANS)
    _, ids, _, _ = setup(model, fresh_seed, 7)
    lm = CausalLM(model)
    E = lm.embed(ids)
    with torch.no_grad():
        key_values = lm.key_values(lm.hidden(E[None, :-1], use_cache=True))
    config = HETAConfig.paper(samples=2, seed=fresh_seed)
    budget = 1 << 28
    expected = hessian_sensitivity(lm, E, int(ids[-1]), key_values, config, budget)
    assert torch.equal(estimate_sensitivity(lm, E, int(ids[-1]), key_values, config, budget), expected)
    with pytest.raises(ValueError, match="unknown hessian estimator 'diagonal'; expected one of exact, low_rank"):
        estimate_sensitivity(lm, E, int(ids[-1]), key_values, _Unchecked(hessian="diagonal"), budget)


class _Unchecked:
    """A config stand-in that skips ``HETAConfig``'s validation (which refuses unknown estimators first)."""

    def __init__(self, **fields):
        self.__dict__.update(fields)
