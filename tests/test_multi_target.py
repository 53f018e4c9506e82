"""Multi-target attribution: every row is the single-target attribution of its target.

The shared fast path (one forward, one flow descent, shared masked forwards) is checked row by
row against ``HETA.attribute`` for each target alone, on tiny GPT-2 and Llama models with fresh
random inputs; ``explain_generation`` against an independent greedy decode; bad targets against
a model that must not run.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import VOCAB, random_ids, rel_err, tiny_gpt2, tiny_llama

from heta_fast import HETA, HETAConfig, kl
from heta_fast.influence.exact import shifted_kl
from heta_fast.model import CausalLM
from heta_fast.pipeline import Ops
from heta_fast.pipeline import run as components_many
from heta_fast.results import Attribution, MultiAttribution
from heta_fast.semantic_flow import prediction_rows


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and on a shared CPU OpenMP's spinning threads can
    make these tests 30x slower; one thread for this module, restored after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


L = 13  # tokens per random input
TARGET_SETS = {
    "consecutive": [8, 9, 10, 11, 12],
    "scattered": [7, 1, 12, 4],  # unordered, includes position 1 (a one-token context)
    "single": [1],
}


def assert_rows_match(multi: MultiAttribution, singles: list[Attribution], tol: float = 1e-4) -> None:
    assert len(multi) == len(singles)
    for k, single in enumerate(singles):
        row = multi[k]
        assert row.target_pos == single.target_pos and row.target_id == single.target_id
        assert row.context_ids == single.context_ids
        for name in ("scores", "M", "S", "I"):
            got, want = getattr(row, name), getattr(single, name)
            assert got.shape == want.shape, name
            # 1e-12 absolute floor: a KL that is exactly 0 on one path (the mean mask of a one-token
            # context replaces the token by itself) is rounding noise of ~1e-14 on the other.
            err = float((got.double() - want.double()).abs().max())
            assert err <= tol * float(want.abs().max()) + 1e-12, (single.target_pos, name, rel_err(got, want))


@pytest.mark.parametrize("mask", ["zero", "mean", "unk"])
@pytest.mark.parametrize("targets", sorted(TARGET_SETS))
def test_rows_equal_single_target_attributions(model, fresh_seed, mask, targets):
    heta = HETA(model, config=HETAConfig.paper(samples=2, mask=mask, seed=fresh_seed, backend="torch"))
    ids = random_ids(fresh_seed, L)
    positions = TARGET_SETS[targets]
    multi = heta.attribute(ids, targets=positions)
    assert isinstance(multi, MultiAttribution) and multi.targets == positions
    assert_rows_match(multi, [heta.attribute(ids, target_pos=t) for t in positions])


@pytest.mark.parametrize("estimator", ["low_rank", "gauss_newton", "layer_subset"])
def test_approximate_estimators_run_per_target(fresh_seed, estimator):
    heta = HETA(tiny_llama(fresh_seed % 1000), config=HETAConfig.paper(samples=2, seed=fresh_seed, hessian=estimator,
                                                                 backend="torch"))
    ids = random_ids(fresh_seed, 10)
    positions = [9, 2, 6]
    try:
        multi = heta.attribute(ids, targets=positions)
    except ValueError as error:
        if "not implemented" in str(error):
            pytest.skip(str(error))
        raise
    assert_rows_match(multi, [heta.attribute(ids, target_pos=t) for t in positions])


def test_reference_backend_loops_and_agrees_with_the_shared_path(model, fresh_seed):
    heta = HETA(model, config=HETAConfig.paper(samples=2, seed=fresh_seed))
    ids = random_ids(fresh_seed, 10)
    positions = [3, 9, 5]
    oracle = heta.attribute(ids, targets=positions, backend="reference")
    assert oracle.backend == "reference"
    fast = heta.attribute(ids, targets=positions, backend="torch")
    assert_rows_match(fast, list(oracle))


def test_windows_fall_back_to_one_target_at_a_time(model, fresh_seed):
    heta = HETA(model, config=HETAConfig.paper(samples=2, seed=fresh_seed, window_size=4, overlap=0.5, backend="torch"))
    ids = random_ids(fresh_seed, 11)
    positions = [3, 10, 7]  # contexts 3 (no windows) and 10, 7 (windowed)
    multi = heta.attribute(ids, targets=positions)
    singles = [heta.attribute(ids, target_pos=t) for t in positions]
    for k, single in enumerate(singles):
        for name in ("scores", "M", "S", "I"):
            assert torch.equal(getattr(multi[k], name), getattr(single, name))


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama])
def test_explain_generation_explains_the_greedy_continuation(build, fresh_seed):
    model = build(fresh_seed % 1000)
    heta = HETA(model, config=HETAConfig.paper(samples=2, seed=fresh_seed, backend="torch"))
    prompt = random_ids(fresh_seed, 6)
    new = 5
    multi = heta.explain_generation(prompt, max_new_tokens=new, stop_at_eos=False)
    ids = prompt.tolist() + multi.target_ids
    assert multi.prompt_length == 6 and multi.targets == list(range(6, 6 + new))
    with torch.no_grad():  # independent greedy decode: a full forward per step, no cache
        for t in multi.targets:
            assert ids[t] == int(model(torch.tensor([ids[:t]])).logits[0, -1].argmax())
    assert_rows_match(multi, [heta.attribute(ids, target_pos=t) for t in multi.targets])


def test_explain_generation_stops_after_eos(fresh_seed):
    model = tiny_gpt2(fresh_seed % 1000)
    heta = HETA(model, config=HETAConfig.paper(samples=1))
    prompt = random_ids(fresh_seed, 5).tolist()
    with torch.no_grad():
        first = int(model(torch.tensor([prompt])).logits[0, -1].argmax())
    model.config.eos_token_id = first  # the first greedy token ends the generation
    multi = heta.explain_generation(prompt, max_new_tokens=4)
    assert multi.target_ids == [first] and multi.targets == [5]
    assert len(heta.explain_generation(prompt, max_new_tokens=4, stop_at_eos=False)) == 4


def test_multi_attribution_layout_and_round_trip(fresh_seed):
    heta = HETA(tiny_llama(fresh_seed % 1000), config=HETAConfig.paper(samples=1, backend="torch"))
    ids = random_ids(fresh_seed, 9)
    multi = heta.attribute(ids, targets=[8, 2, 5])
    assert multi.matrix.shape == (3, 8) and multi.scores is multi.matrix
    for name in ("scores", "M", "S", "I"):
        values = getattr(multi, name)
        assert torch.isnan(values[~multi.valid]).all() and not torch.isnan(values[multi.valid]).any()
    assert multi.valid.sum(dim=1).tolist() == [8, 2, 5]
    assert multi[-1].target_pos == 5 and len(multi[1]) == 2
    with pytest.raises(IndexError):
        multi[3]
    text = multi.to_json()
    assert "NaN" not in text  # rows are stored ragged: strict JSON
    back = MultiAttribution.from_dict(json.loads(text))
    assert back.targets == multi.targets and back.target_ids == multi.target_ids
    for name in ("scores", "M", "S", "I"):
        assert torch.equal(getattr(back, name).nan_to_num(-1.0), getattr(multi, name).nan_to_num(-1.0))
    assert [a.to_dict() for a in back] == [a.to_dict() for a in multi]
    shown = repr(multi)
    assert shown.startswith("MultiAttribution(") and "3 targets over 8 context tokens" in shown
    assert shown.count("*") == 2 + 1  # targets 2 and 5 sit inside the shown context; 8 is past it (+ legend)


def test_prediction_rows_of_several_rows_match_one_row_each():
    g = torch.Generator().manual_seed(0)
    A = torch.rand(3, 2, 7, 7, generator=g).tril()
    A = A / A.sum(-1, keepdim=True)
    rows = [6, 0, 3]
    phi = prediction_rows(A, rows)  # [Ls, H, K, P]
    assert phi.shape == (3, 2, 3, 7)
    for k, r in enumerate(rows):
        one = prediction_rows(A[..., :r + 1, :r + 1])  # row r is the last row of the cut matrix
        assert torch.allclose(phi[:, :, k, :r + 1], one, atol=1e-6)
        assert (phi[:, :, k, r + 1:] == 0).all()  # causal: nothing after the row reaches it


def test_shifted_kl_equals_linear_kl():
    g = torch.Generator().manual_seed(1)
    V, d = 300, 16
    weight, bias = torch.randn(V, d, generator=g), torch.randn(V, generator=g)
    reference = torch.randn(2, d, generator=g)  # unmasked hidden states of two targets
    log_p = torch.log_softmax(reference.double() @ weight.double().T + bias.double(), dim=-1)  # exact P
    hidden = [reference[0] + torch.randn(3, d, generator=g) * s for s in (1e-3,)] + \
             [reference[1] + torch.randn(4, d, generator=g)]
    owner = torch.tensor([0] * 3 + [1] * 4)
    shift = torch.cat([hidden[0] - reference[0], hidden[1] - reference[1]])
    exact = torch.cat([kl.kl_from_log_probs(log_p[k], torch.log_softmax(h.double() @ weight.double().T + bias.double(),
                                                                         dim=-1)) for k, h in enumerate(hidden)])
    chunked = torch.cat([kl.linear_kl(h, weight, bias, log_p[k]) for k, h in enumerate(hidden)])
    for max_rows in (1, 2, 7):  # row blocks cut through a target's rows
        got = shifted_kl(shift, weight, log_p, owner, max_rows)
        for part in (slice(0, 3), slice(3, 7)):  # tiny KLs (a small shift) and large ones
            assert rel_err(got[part], exact[part]) < 1e-5
            assert rel_err(got[part], exact[part]) <= 2 * rel_err(chunked[part], exact[part]) + 1e-6


def test_per_target_reduction_path_matches_the_grouped_one(model, fresh_seed):
    """The triton backend's route (a fused ``linear_kl`` called per target), with torch's reduction in it."""
    lm = CausalLM(model)
    ids = random_ids(fresh_seed, 12)
    config = HETAConfig.paper(samples=1, seed=fresh_seed, mask="unk")
    ops = Ops(linear_kl=lambda *args, **kwargs: kl.linear_kl(*args, **kwargs))  # not kl.linear_kl itself
    grouped, _ = components_many(lm, ids, [11, 4, 8], config, sensitivity=False)
    per_target, _ = components_many(lm, ids, [11, 4, 8], config, ops=ops, sensitivity=False)
    for a, b in zip(grouped, per_target, strict=True):
        assert rel_err(a.I, b.I) < 1e-4 and torch.equal(a.M, b.M)


def test_progress_reaches_every_stage(fresh_seed):
    heta = HETA(tiny_gpt2(), config=HETAConfig.paper(samples=1, backend="torch"))
    seen = []
    heta.attribute(random_ids(fresh_seed, 8), targets=[3, 7], progress=lambda *a: seen.append(a))
    last = {stage: (done, total) for stage, done, total in seen}
    assert last == {"semantic_flow": (1, 1), "hessian": (10, 10), "kl": (7, 7)}


class _WordTokenizer:
    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [hash(w) % 50 for w in text.split()]}

    def decode(self, ids):
        return " ".join(str(i) for i in ids)


@pytest.fixture(params=["gpt2", "llama"])
def guarded(request, monkeypatch):
    """A HETA whose model raises if anything runs it: errors must come first."""
    heta = HETA({"gpt2": tiny_gpt2, "llama": tiny_llama}[request.param](), _WordTokenizer())

    def forbidden(*args, **kwargs):
        raise AssertionError("the model ran before the input was validated")

    for module in (heta.lm.model, heta.lm.backbone, heta.lm.embedding):
        monkeypatch.setattr(module, "forward", forbidden)
    return heta


IDS = [3, 1, 4, 1, 5, 9]


@pytest.mark.parametrize("call, error, message", [
    (lambda h: h.attribute(IDS, targets=[]), ValueError, "targets is empty"),
    (lambda h: h.attribute(IDS, targets=range(0)), ValueError, "targets is empty"),
    (lambda h: h.attribute(IDS, targets=[2, 4, 2]), ValueError, "target position 2 is given twice"),
    (lambda h: h.attribute(IDS, targets=[0, 3]), ValueError, "target position 0 is out of range"),
    (lambda h: h.attribute(IDS, targets=[2, -1]), ValueError, "target position -1 is out of range"),
    (lambda h: h.attribute(IDS, targets=[6]), ValueError, "target position 6 is out of range: it must lie in [1, 5]"),
    (lambda h: h.attribute([7], targets=[1]), ValueError, "at least 2 tokens"),
    (lambda h: h.attribute(IDS, targets=[2.0]), TypeError, "target positions must be ints"),
    (lambda h: h.attribute(IDS, targets=3), TypeError, "targets must be a sequence"),
    (lambda h: h.attribute(IDS, targets=torch.tensor([1.5])), TypeError, "1-D integer tensor"),
    (lambda h: h.attribute(IDS, 3, targets=[2]), ValueError, "either targets or target_pos"),
    (lambda h: h.attribute(IDS, targets=[2], mask="blank"), ValueError, "unknown mask 'blank'"),
    (lambda h: h.attribute_targets("", [1]), ValueError, "empty text"),
    (lambda h: h.explain_generation(IDS, max_new_tokens=0), ValueError, "max_new_tokens must be >= 1"),
    (lambda h: h.explain_generation(IDS, max_new_tokens=2.5), TypeError, "max_new_tokens must be an int"),
    (lambda h: h.explain_generation(IDS, backend="jax"), ValueError, "unknown backend 'jax'"),
    (lambda h: h.explain_generation([], max_new_tokens=2), ValueError, "empty input"),
    (lambda h: h.explain_generation([10**6]), ValueError, "outside the vocabulary"),
])
def test_bad_targets_are_named_before_model_work(guarded, call, error, message):
    with pytest.raises(error) as info:
        call(guarded)
    assert message in str(info.value)


def test_targets_accept_ranges_and_tensors(fresh_seed):
    heta = HETA(tiny_gpt2(), config=HETAConfig.paper(samples=1, backend="torch"))
    ids = random_ids(fresh_seed, 7)
    a = heta.attribute(ids, targets=range(4, 7))
    b = heta.attribute(ids, targets=torch.tensor([4, 5, 6]))
    assert a.targets == b.targets == [4, 5, 6]
    assert torch.equal(a.scores.nan_to_num(), b.scores.nan_to_num())
    assert not math.isnan(float(a.scores[0, 3])) and math.isnan(float(a.scores[0, 4]))
    assert all(0 <= i < VOCAB for i in a.target_ids)
