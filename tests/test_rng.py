"""Counter-based probes: reproducible, seed-dependent, independent of batching (issue 2, item 3)."""

from __future__ import annotations

import pytest
import torch
from helpers import SPEC, random_ids, rel_err

from heta_fast import HETA
from heta_fast.memory import MemoryBudgetWarning, forward_bytes
from heta_fast.rng import hash32, hash32_int, rademacher, unk_vectors


def test_tensor_hash_equals_integer_hash(fresh_seed):
    g = torch.Generator().manual_seed(fresh_seed)
    xs = torch.randint(0, 2**32, (2000,), generator=g, dtype=torch.int64)
    xs = torch.cat([xs, torch.tensor([0, 1, 2**31, 2**32 - 1])])
    assert hash32(xs).tolist() == [hash32_int(int(x)) for x in xs]


def test_probes_do_not_depend_on_batch_or_order(fresh_seed):
    g = torch.Generator().manual_seed(fresh_seed)
    positions = torch.randint(0, 500, (64,), generator=g)
    samples = torch.randint(0, 20, (64,), generator=g)
    batch = rademacher(fresh_seed, positions, samples, 96)
    perm = torch.randperm(64, generator=g)
    assert torch.equal(rademacher(fresh_seed, positions[perm], samples[perm], 96), batch[perm])
    for b in (0, 17, 63):
        one = rademacher(fresh_seed, positions[b:b + 1], samples[b:b + 1], 96)
        assert torch.equal(one[0], batch[b])
    assert set(batch.unique().tolist()) == {-1.0, 1.0}


def test_probes_depend_on_seed_position_and_sample():
    base = rademacher(0, torch.tensor([3]), torch.tensor([2]), 256)
    assert not torch.equal(base, rademacher(1, torch.tensor([3]), torch.tensor([2]), 256))
    assert not torch.equal(base, rademacher(0, torch.tensor([4]), torch.tensor([2]), 256))
    assert not torch.equal(base, rademacher(0, torch.tensor([3]), torch.tensor([1]), 256))
    # a longer d extends the vector: entry j never depends on d
    assert torch.equal(rademacher(0, torch.tensor([3]), torch.tensor([2]), 512)[:, :256], base)


def test_probe_and_unk_statistics():
    r = rademacher(5, torch.arange(200), torch.zeros(200, dtype=torch.long), 500)
    assert abs(float(r.mean())) < 0.01
    u = unk_vectors(5, torch.arange(200), 500).double()
    assert abs(float(u.mean())) < 2e-4 and abs(float(u.std()) - 0.01) < 2e-4
    assert torch.equal(unk_vectors(5, torch.tensor([7]), 500)[0], unk_vectors(5, torch.arange(10), 500)[7])


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_same_seed_same_scores_bitwise(model, fresh_seed, backend):
    heta = HETA(model, config=SPEC)
    ids = random_ids(fresh_seed, 9)
    seed = fresh_seed
    a = heta.attribute(ids, samples=3, seed=seed, mask="unk", backend=backend)
    b = heta.attribute(ids, samples=3, seed=seed, mask="unk", backend=backend)
    for k in ("scores", "M", "S", "I"):
        assert torch.equal(getattr(a, k), getattr(b, k))
    c = heta.attribute(ids, samples=3, seed=(seed + 1) % 2**32, mask="unk", backend=backend)
    assert not torch.equal(a.S, c.S)
    assert not torch.equal(a.I, c.I)
    assert a.seed == seed


def test_scores_do_not_depend_on_batch_size(model, fresh_seed):
    """Different memory budgets batch positions differently; the probes (and so S) stay the same."""
    heta = HETA(model, config=SPEC)
    ids = random_ids(fresh_seed, 14)
    budget = forward_bytes(heta.lm, 14)  # just the shared forward: one position per batch
    with pytest.warns(MemoryBudgetWarning):
        one = heta.attribute(ids, samples=2, seed=fresh_seed, memory_budget=budget)
    many = heta.attribute(ids, samples=2, seed=fresh_seed, memory_budget=1 << 30)
    ref = heta.attribute(ids, samples=2, seed=fresh_seed, backend="reference")
    for k in ("S", "I", "scores"):
        assert rel_err(getattr(one, k), getattr(many, k)) < 1e-5
        assert rel_err(getattr(one, k), getattr(ref, k)) < 1e-4
