"""Each metric of heta_fast.evaluation.metrics against a hand computation on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import random_ids, tiny_llama

from heta_fast.evaluation import metrics
from heta_fast.model import CausalLM


def _setup(seed: int, n: int = 12):
    model = tiny_llama(seed % 1000)
    lm = CausalLM(model)
    ids = random_ids(seed, n + 1).tolist()
    prompt, target = ids[:n], ids[n]
    scores = torch.randn(n, generator=torch.Generator().manual_seed(seed))
    return model, lm, prompt, target, scores


def _log_probs(model, prompt, rows=(), keep_dims=None):
    """By hand: the model's own forward on embeddings with ``rows`` zeroed (or scaled by ``keep_dims``)."""
    E = model.get_input_embeddings()(torch.tensor([prompt]))[0].clone()
    for i in rows:
        E[i] = 0.0
    if keep_dims is not None:
        E = E * keep_dims
    with torch.no_grad():
        return torch.log_softmax(model(inputs_embeds=E[None]).logits[0, -1].double(), dim=-1)


def _kl(log_p, log_q):
    return float((log_p.exp() * (log_p - log_q)).sum())


def _top(scores, k):
    return sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))[:k]


def test_soft_nc_and_ns_match_hand_kl(fresh_seed):
    model, lm, prompt, target, scores = _setup(fresh_seed)
    scorer = metrics.Scorer(lm, prompt, target)
    context = list(range(len(prompt)))
    log_p = _log_probs(model, prompt)
    nc, ns = [], []
    for f in (0.1, 0.2, 0.3):
        k = max(1, int(len(prompt) * f))
        top = _top(scores, k)
        nc.append(_kl(log_p, _log_probs(model, prompt, top)))
        ns.append(-_kl(log_p, _log_probs(model, prompt, [i for i in context if i not in top])))
    assert metrics.soft_nc(scorer, scores, context) == pytest.approx(sum(nc) / 3, rel=1e-3, abs=1e-6)
    assert metrics.soft_ns(scorer, scores, context) == pytest.approx(sum(ns) / 3, rel=1e-3, abs=1e-6)


def test_aopc_comprehensiveness_and_sufficiency_by_hand(fresh_seed):
    model, lm, prompt, target, scores = _setup(fresh_seed, n=20)
    scorer = metrics.Scorer(lm, prompt, target)
    context = list(range(len(prompt)))
    p = float(_log_probs(model, prompt)[target].exp())
    assert scorer.p == pytest.approx(p, rel=1e-4)
    comp, suff = [], []
    for f in (0.01, 0.05, 0.1, 0.2, 0.5):
        top = _top(scores, max(1, int(20 * f)))
        comp.append(p - float(_log_probs(model, prompt, top)[target].exp()))
        suff.append(p - float(_log_probs(model, prompt, [i for i in context if i not in top])[target].exp()))
    assert metrics.comprehensiveness(scorer, scores, context) == pytest.approx(sum(comp) / 5, abs=1e-5)
    assert metrics.sufficiency(scorer, scores, context) == pytest.approx(sum(suff) / 5, abs=1e-5)


def test_masks_never_touch_positions_outside_the_context(fresh_seed):
    model, lm, prompt, target, scores = _setup(fresh_seed)
    context = list(range(3, len(prompt)))  # 0..2 play the chat template: never masked
    scorer = metrics.Scorer(lm, prompt, target)
    log_p = _log_probs(model, prompt)
    top = _top(scores[3:], 1)
    kept = [3 + i for i in top]
    expected = -_kl(log_p, _log_probs(model, prompt, [i for i in context if i not in kept]))
    assert metrics.soft_ns(scorer, scores, context, fractions=(0.1,)) == pytest.approx(expected, rel=1e-3, abs=1e-6)


def test_zhao_aletras_soft_masks_seeded_by_hand(fresh_seed):
    model, lm, prompt, target, scores = _setup(fresh_seed)
    n, d = len(prompt), model.config.hidden_size
    scorer = metrics.Scorer(lm, prompt, target)
    context = list(range(n))
    s = (scores - scores.min()) / (scores.max() - scores.min())
    p = float(_log_probs(model, prompt)[target].exp())
    comp, suff = [], []
    draws = torch.rand(2, n, d, generator=torch.Generator().manual_seed(fresh_seed))
    for b in range(2):
        masked = (draws[b] < (1 - s)[:, None]).double()  # dimension kept with probability 1 - s_i
        comp.append(max(0.0, p - float(_log_probs(model, prompt, keep_dims=masked.float())[target].exp())))
    draws = torch.rand(2, n, d, generator=torch.Generator().manual_seed(fresh_seed))
    for b in range(2):
        kept = (draws[b] < s[:, None]).float()
        suff.append(1 - max(0.0, p - float(_log_probs(model, prompt, keep_dims=kept)[target].exp())))
    got_c = metrics.soft_comprehensiveness_za(scorer, scores, context, seed=fresh_seed)
    got_s = metrics.soft_sufficiency_za(scorer, scores, context, seed=fresh_seed)
    assert got_c == pytest.approx(sum(comp) / 2, abs=1e-5)
    assert got_s == pytest.approx(sum(suff) / 2, abs=1e-5)


def test_dsa_f1_and_first_share_exact():
    scores = torch.tensor([4.0, -1.0, 2.0, 0.0, 3.0, 5.0])
    context = [0, 1, 2, 3, 4]  # position 5 is outside the context (template)
    # |a| over the context: 4, 1, 2, 0, 3 -> total 10
    assert metrics.dsa(scores, context, support=[2, 3, 4], distractor=[0, 1]) == pytest.approx(0.5 - 0.5)
    assert metrics.dsa(scores, context, support=[0, 4], distractor=[1]) == pytest.approx(0.7 - 0.1)
    assert metrics.first_token_share(scores, context) == pytest.approx(0.4)
    assert metrics.first_token_share(scores, [1, 2, 3]) == pytest.approx(1 / 3)
    # top-2 of the context by signed score: 0 (4), 4 (3); gold {4, 2}: one hit -> 2 * 1 / (2 + 2)
    assert metrics.f1(scores, context, [4, 2]) == pytest.approx(0.5)
    assert metrics.f1(scores, context, [0, 4]) == pytest.approx(1.0)
    assert metrics.f1(scores, context, []) == 0.0


def test_subject_mass_and_top1_by_hand():
    scores = torch.tensor([5.0, 1.0, -1.0, 2.0, 0.0])
    context = [1, 2, 3, 4]  # position 0 is outside the context: its 5.0 counts nowhere
    # |a| over the context: 1, 1, 2, 0 -> total 4; the negative score counts by its size
    assert metrics.subject_mass(scores, context, [2]) == pytest.approx(0.25)
    assert metrics.subject_mass(scores, context, [1, 2]) == pytest.approx(0.5)
    assert metrics.subject_mass(scores, context, [3, 4]) == pytest.approx(0.5)
    assert metrics.subject_mass(torch.zeros(5), context, [2]) == 0.0
    # top of the context by signed score: 3 (2.0), not 0 (outside), not 2 (|-1| is not ranked)
    assert metrics.subject_top1(scores, context, [3, 4]) == 1.0
    assert metrics.subject_top1(scores, context, [1, 2]) == 0.0
    # a tie at the top goes to the earlier position, as in ``ranking``
    tied = torch.tensor([0.5, 0.5, 0.1])
    assert metrics.subject_top1(tied, [0, 1, 2], [0]) == 1.0
    assert metrics.subject_top1(tied, [0, 1, 2], [1]) == 0.0


def test_subject_against_distractor_subject_by_hand():
    scores = torch.tensor([0.4, -0.2, 0.1, 0.3])  # |a| total 1.0
    context = [0, 1, 2, 3]
    # subject {0, 2}: 0.4 + 0.1 = 0.5; distractor subject {1}: 0.2
    assert metrics.subject_over_distractor(scores, context, [0, 2], [1]) == pytest.approx(0.3)
    assert metrics.subject_beats_distractor(scores, context, [0, 2], [1]) == 1.0
    # subject {1}: 0.2; distractor subject {0, 3}: 0.7
    assert metrics.subject_over_distractor(scores, context, [1], [0, 3]) == pytest.approx(-0.5)
    assert metrics.subject_beats_distractor(scores, context, [1], [0, 3]) == 0.0
    # an exact tie (shares 0.25, 0.25, 0.5) and all-zero scores do not beat
    assert metrics.subject_over_distractor(torch.tensor([1.0, 1.0, 2.0]), [0, 1, 2], [0], [1]) == 0.0
    assert metrics.subject_beats_distractor(torch.tensor([1.0, 1.0, 2.0]), [0, 1, 2], [0], [1]) == 0.0
    assert metrics.subject_beats_distractor(torch.zeros(4), context, [0], [1]) == 0.0


def test_spearman_matches_hand_ranks():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    b = torch.tensor([5.0, 6.0, 7.0, 8.0, 7.0])  # ranks 0, 1, 2.5, 4, 2.5
    ra, rb = torch.tensor([0, 1, 2, 3, 4.0]), torch.tensor([0, 1, 2.5, 4, 2.5])
    ra, rb = ra - ra.mean(), rb - rb.mean()
    expected = float((ra @ rb) / (ra.norm() * rb.norm()))
    assert metrics.spearman(a, b) == pytest.approx(expected)
    assert metrics.spearman(a, -a) == pytest.approx(-1.0)
    assert math.isnan(metrics.spearman(a, torch.ones(5)))


def test_sensitivity_is_the_std_of_noisy_runs(fresh_seed):
    model, lm, prompt, target, _ = _setup(fresh_seed)

    class Holder:
        pass

    heta = Holder()
    heta.lm = lm

    def embedding_norms(h, ids, y):  # a method that sees the (noisy) embeddings
        return h.lm.embed(torch.tensor(ids)).norm(dim=-1)

    context = list(range(len(prompt)))
    runs = []
    for r in range(3):
        E = model.get_input_embeddings()(torch.tensor(prompt)).detach()
        noise = torch.randn(E.shape, generator=torch.Generator().manual_seed(fresh_seed + r)) * 0.01
        runs.append((E + noise).norm(dim=-1))
    expected = float(torch.stack(runs).std(dim=0).mean())
    got = metrics.sensitivity(embedding_norms, heta, prompt, target, context, sigma=0.01, repeats=3, seed=fresh_seed)
    assert got == pytest.approx(expected, rel=1e-4)
    assert metrics.sensitivity(embedding_norms, heta, prompt, target, context, sigma=0.0, seed=fresh_seed) == 0.0
    assert torch.equal(lm.embed(torch.tensor(prompt)), model.get_input_embeddings()(torch.tensor([prompt]))[0])


class _Datamodel:
    """A Scorer stand-in whose target log-probability is exactly linear in the kept sources:
    ``log p = sum_{s kept} w_s`` (a source is kept when none of its tokens is masked)."""

    target = 0

    def __init__(self, sources, weights):
        self.sources, self.weights, self.calls = sources, weights, []

    def masked(self, rows):
        self.calls.extend(rows)
        out = torch.zeros(len(rows), 1)
        for b, row in enumerate(rows):
            out[b, 0] = sum(w for s, w in zip(self.sources, self.weights, strict=True) if not set(s) & set(row))
        return out


def test_word_sources_by_hand():
    tokens = ["<s>", "The", " cap", "ital", " of", " France"]
    assert metrics.word_sources(tokens, [1, 2, 3, 4, 5]) == [[1], [2, 3], [4], [5]]
    assert metrics.word_sources(tokens, [2, 3, 5]) == [[2, 3], [5]]


def test_lds_of_the_true_linear_model_is_one_and_of_its_negation_minus_one():
    sources = [[0], [1, 2], [3], [4], [5, 6]]
    weights = [1.0, 2.0, 4.0, 8.0, 16.0]  # distinct subset sums: no ties among the ablations
    scores = torch.tensor([1.0, 0.5, 1.5, 4.0, 8.0, 10.0, 6.0])  # per source: 1, 2, 4, 8, 16
    model = _Datamodel(sources, weights)
    assert metrics.lds(model, scores, sources, seed=3) == pytest.approx(1.0)
    assert metrics.lds(model, -scores, sources, seed=3) == pytest.approx(-1.0)
    # every ablation masks whole sources, about half of them, and the same ones for the same seed
    assert all(set(row) == {i for s in sources if set(s) & set(row) for i in s} for row in model.calls)
    first = model.calls[:metrics.LDS_SAMPLES]
    metrics.lds(model, scores, sources, seed=3)
    assert model.calls[metrics.LDS_SAMPLES:2 * metrics.LDS_SAMPLES] == first


def test_lds_charges_an_unsigned_attribution_for_a_source_that_lowers_the_target():
    sources = [[0], [1], [2], [3]]
    weights = [3.0, -5.0, 1.0, 0.5]  # dropping source 1 raises the target
    signed = torch.tensor(weights)
    model = _Datamodel(sources, weights)
    assert metrics.lds(model, signed, sources) == pytest.approx(1.0)
    assert metrics.lds(model, signed.abs(), sources) < 0.0  # the sizes alone rank the ablations backwards here
