"""Faithfulness and alignment metrics of one attribution, one function per metric.

Notation: prompt embeddings ``E`` ``[n, d]``, target ``y``; ``P = softmax(f(E)_{n-1})`` and
``p = P[y]``. ``a``: the scores ``[n]`` of one method; ``C``: the attributed context positions
(all ``n`` except chat-template tokens). ``top_k(a)``: the ``k`` positions of ``C`` with the
highest ``a`` (ties: earlier first). "Masking" a row replaces it as HETA's ``I`` does
(``heta_fast.kl.mask_rows``: zero, mean or unk); positions outside ``C`` are never masked.
``k_f = max(1, floor(|C| f))``.

Signed attributions (integrated gradients, input x gradient, occlusion) rank by their signed
value; the share metrics (DSA, first-token share, the subject metrics of a known fact) use ``|a|``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from heta_fast.kl import kl_from_log_probs, mask_rows

SOFT_FRACTIONS = (0.1, 0.2, 0.3)  # docs/method.md §8: Soft-NC / Soft-NS, as released with the paper
AOPC_FRACTIONS = (0.01, 0.05, 0.1, 0.2, 0.5)  # ERASER's bins
BATCH = 16  # masked variants per forward


class Scorer:
    """The model's prediction of ``target`` after ``ids`` under masked or scaled embeddings.

    lm: a ``heta_fast.model.CausalLM``; ids: the prompt ``[n]``; mask/seed: as ``HETAConfig``.
    """

    def __init__(self, lm, ids: Sequence[int], target: int, mask: str = "zero", seed: int = 0):
        self.lm = lm
        self.target = int(target)
        full = lm.embed(torch.tensor([*ids, target], dtype=torch.long)).float()  # [n + 1, d]: the mean mask's rows
        self.E = full[:-1]
        n = self.E.shape[0]
        self.replacement = mask_rows(mask, full, torch.arange(n), seed)  # [n, d]
        self._memo: dict[frozenset, torch.Tensor] = {}
        self.log_P = self.log_probs(self.E[None])[0]

    @property
    def p(self) -> float:
        """``P[y]``, the target's probability."""
        return float(self.log_P[self.target].exp())

    def log_probs(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``log softmax(f(E_b)_{n-1})`` for a batch ``[B, n, d]`` -> ``[B, V]``."""
        out = []
        with torch.no_grad():
            for start in range(0, embeddings.shape[0], BATCH):
                chunk = embeddings[start:start + BATCH].to(self.lm.dtype)
                hidden = self.lm.hidden(chunk).last_hidden_state[:, -1]
                out.append(torch.log_softmax(self.lm.unembed(hidden).float(), dim=-1).cpu())
        return torch.cat(out)

    def masked(self, rows: Sequence[Sequence[int]]) -> torch.Tensor:
        """``log_probs`` with, in variant ``b``, the rows ``rows[b]`` masked: ``[B, V]``.

        Results are kept per set of rows: the top-k sets of Soft-NC and comprehensiveness
        coincide at 10% and 20%, so a method's metrics share those forwards (each ~0.4 s for
        SmolLM2 at 60 tokens on one thread).
        """
        keys = [frozenset(int(i) for i in r) for r in rows]
        todo = list(dict.fromkeys(k for k in keys if k not in self._memo))
        if todo:
            batch = self.E[None].repeat(len(todo), 1, 1)
            for b, key in enumerate(todo):
                index = torch.as_tensor(sorted(key), dtype=torch.long)
                batch[b, index] = self.replacement[index]
            for key, out in zip(todo, self.log_probs(batch), strict=True):
                self._memo[key] = out
        return torch.stack([self._memo[k] for k in keys])


def ranking(scores: torch.Tensor, context: Sequence[int]) -> list[int]:
    """The positions of ``context`` from highest to lowest score (ties: earlier first)."""
    return sorted(context, key=lambda i: (-float(scores[i]), i))


def top_k_count(size: int, fraction: float) -> int:
    """``k_f = max(1, floor(size f))``."""
    return max(1, int(size * fraction))


def soft_nc(scorer: Scorer, scores: torch.Tensor, context: Sequence[int],
            fractions: Sequence[float] = SOFT_FRACTIONS) -> float:
    """Soft-NC, hard top-k as released: ``mean_f KL(P || P with top_{k_f}(a) masked)``. Higher is better."""
    order = ranking(scores, context)
    rows = [order[:top_k_count(len(context), f)] for f in fractions]
    return float(kl_from_log_probs(scorer.log_P, scorer.masked(rows)).mean())


def soft_ns(scorer: Scorer, scores: torch.Tensor, context: Sequence[int],
            fractions: Sequence[float] = SOFT_FRACTIONS) -> float:
    """Soft-NS, hard top-k as released: ``-mean_f KL(P || P with C \\ top_{k_f}(a) masked)``. Higher is better."""
    order = ranking(scores, context)
    rows = [order[top_k_count(len(context), f):] for f in fractions]
    return -float(kl_from_log_probs(scorer.log_P, scorer.masked(rows)).mean())


def comprehensiveness(scorer: Scorer, scores: torch.Tensor, context: Sequence[int],
                      fractions: Sequence[float] = AOPC_FRACTIONS) -> float:
    """ERASER comprehensiveness, AOPC: ``mean_f (p - p(y | top_{k_f}(a) masked))``. Higher is better."""
    order = ranking(scores, context)
    rows = [order[:top_k_count(len(context), f)] for f in fractions]
    q = scorer.masked(rows)[:, scorer.target].exp()
    return float((scorer.p - q).mean())


def sufficiency(scorer: Scorer, scores: torch.Tensor, context: Sequence[int],
                fractions: Sequence[float] = AOPC_FRACTIONS) -> float:
    """ERASER sufficiency, AOPC: ``mean_f (p - p(y | only top_{k_f}(a) kept))``. Lower is better."""
    order = ranking(scores, context)
    rows = [order[top_k_count(len(context), f):] for f in fractions]
    q = scorer.masked(rows)[:, scorer.target].exp()
    return float((scorer.p - q).mean())


def importance(scores: torch.Tensor, context: Sequence[int]) -> torch.Tensor:
    """Min-max normalised scores on ``C``: ``s_i = (a_i - min_C a) / (max_C a - min_C a)`` ``[|C|]`` (0.5 if flat)."""
    a = scores[list(context)].float()
    span = a.max() - a.min()
    return (a - a.min()) / span if span > 0 else torch.full_like(a, 0.5)


def _bernoulli_rows(scorer: Scorer, context: Sequence[int], keep: torch.Tensor, seed: int,
                    samples: int) -> torch.Tensor:
    """``samples`` variants of ``E`` whose context rows keep each dimension with probability ``keep_i``."""
    generator = torch.Generator().manual_seed(seed)
    index = torch.as_tensor(list(context), dtype=torch.long)
    batch = scorer.E[None].repeat(samples, 1, 1)
    d = scorer.E.shape[1]
    drop = torch.rand(samples, len(index), d, generator=generator) >= keep[None, :, None]
    batch[:, index] = torch.where(drop, scorer.replacement[index][None], batch[:, index])
    return batch


def soft_comprehensiveness_za(scorer: Scorer, scores: torch.Tensor, context: Sequence[int], seed: int = 0,
                              samples: int = 2) -> float:
    """Zhao & Aletras (2023) soft comprehensiveness, importance-scaled random masks (unnormalised).

    Each dimension of context row ``i`` is masked with probability ``s_i`` (``importance``),
    independently, ``samples`` seeded draws: ``mean_draws max(0, p - p(y | E'))``. Higher is better.
    """
    keep = 1.0 - importance(scores, context)
    q = scorer.log_probs(_bernoulli_rows(scorer, context, keep, seed, samples))[:, scorer.target].exp()
    return float((scorer.p - q).clamp_min(0).mean())


def soft_sufficiency_za(scorer: Scorer, scores: torch.Tensor, context: Sequence[int], seed: int = 0,
                        samples: int = 2) -> float:
    """Zhao & Aletras (2023) soft sufficiency, importance-scaled random masks (unnormalised).

    Each dimension of context row ``i`` is kept with probability ``s_i``:
    ``mean_draws (1 - max(0, p - p(y | E')))``. Higher is better.
    """
    keep = importance(scores, context)
    q = scorer.log_probs(_bernoulli_rows(scorer, context, keep, seed, samples))[:, scorer.target].exp()
    return float((1.0 - (scorer.p - q).clamp_min(0)).mean())


def shares(scores: torch.Tensor, context: Sequence[int]) -> torch.Tensor:
    """``|a_i| / sum_C |a_j|`` over ``C``: ``[n]``, zero outside ``C`` (all zero if the sum is 0)."""
    out = torch.zeros(scores.shape[0])
    index = torch.as_tensor(list(context), dtype=torch.long)
    a = scores[index].abs().float()
    total = a.sum()
    if total > 0:
        out[index] = a / total
    return out


def dsa(scores: torch.Tensor, context: Sequence[int], support: Sequence[int], distractor: Sequence[int]) -> float:
    """DSA: ``sum_{support} share_i - sum_{distractor} share_i`` in ``[-1, 1]``. Higher is better."""
    s = shares(scores, context)
    return float(s[list(support)].sum() - s[list(distractor)].sum())


def subject_mass(scores: torch.Tensor, context: Sequence[int], subject: Sequence[int]) -> float:
    """A fact's subject mass: ``sum_{i in subject} share_i = sum_{i in subject} |a_i| / sum_{j in C} |a_j|``
    in ``[0, 1]`` (``shares``). Signed scores count by their size: a large negative score on the
    subject is mass on the subject. 0 when every score on ``C`` is 0. Higher is better."""
    return float(shares(scores, context)[list(subject)].sum())


def subject_top1(scores: torch.Tensor, context: Sequence[int], subject: Sequence[int]) -> float:
    """1.0 if the top context position, ``ranking(a, C)[0]`` (the highest signed score, the
    earlier on a tie, as the faithfulness metrics rank), is a subject token, else 0.0."""
    return 1.0 if ranking(scores, context)[0] in set(subject) else 0.0


def subject_over_distractor(scores: torch.Tensor, context: Sequence[int], subject: Sequence[int],
                            other: Sequence[int]) -> float:
    """``sum_{subject} share_i - sum_{other} share_i`` in ``[-1, 1]``, ``other`` the distractor
    subject's tokens: DSA with the subject for the support. Higher is better."""
    return dsa(scores, context, subject, other)


def subject_beats_distractor(scores: torch.Tensor, context: Sequence[int], subject: Sequence[int],
                             other: Sequence[int]) -> float:
    """1.0 if ``sum_{subject} share_i > sum_{other} share_i`` (strictly; 0.0 on a tie, all-zero
    scores included), else 0.0."""
    return 1.0 if subject_over_distractor(scores, context, subject, other) > 0 else 0.0


LDS_SAMPLES = 32  # random ablations per example, shared by every method (the Scorer keeps their forwards)
LDS_KEEP = 0.5  # each source kept with this probability, as ContextCite samples its ablations


def word_sources(tokens: Sequence[str], context: Sequence[int]) -> list[list[int]]:
    """The context's positions grouped into words: a token whose text starts with whitespace, or the
    first context token, opens a source; the tokens after it join it until the next one opens."""
    sources: list[list[int]] = []
    for i in context:
        if not sources or tokens[i][:1].isspace():
            sources.append([])
        sources[-1].append(i)
    return sources


def lds(scorer: Scorer, scores: torch.Tensor, sources: Sequence[Sequence[int]], seed: int = 0,
        samples: int = LDS_SAMPLES, keep: float = LDS_KEEP) -> float:
    """Linear datamodeling score (Park et al. 2023; ContextCite, Cohen-Wang et al. 2024), no gold labels.

    ``samples`` random ablations ``v`` (source ``s`` kept with probability ``keep``, the others'
    tokens masked as ``I`` masks them; seeded, so every method of an example meets the same
    ablations): the Spearman correlation between the target's actual log-probability under ``v``
    and the attribution's linear prediction ``sum_s v_s sum_{i in s} a_i``. Higher is better.
    Signed attributions predict with their sign. A non-negative one (HETA's) can only say that
    keeping a source never lowers the target, so it ranks wrongly every ablation where dropping a
    source raises it: the metric charges that to it, as it should. NaN when the prediction is
    constant (all scores 0).
    """
    generator = torch.Generator().manual_seed(seed)
    kept = torch.rand(samples, len(sources), generator=generator) < keep
    dropped = [[i for source, k in zip(sources, row, strict=True) if not k for i in source] for row in kept.tolist()]
    actual = scorer.masked(dropped)[:, scorer.target]
    per_source = torch.tensor([float(scores[list(source)].double().sum()) for source in sources], dtype=torch.float64)
    return spearman(kept.double() @ per_source, actual)


def f1(scores: torch.Tensor, context: Sequence[int], gold: Sequence[int]) -> float:
    """F1 of the top ``|G|`` positions by ``a`` against the gold set ``G`` (0 when ``G`` is empty)."""
    gold = set(gold)
    if not gold:
        return 0.0
    top = set(ranking(scores, context)[:len(gold)])
    hit = len(top & gold)
    return 2 * hit / (len(top) + len(gold)) if hit else 0.0


def first_token_share(scores: torch.Tensor, context: Sequence[int]) -> float:
    """``|a_c0| / sum_C |a_j|``, ``c0`` the first context position: the attention sink's share."""
    return float(shares(scores, context)[min(context)])


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two ``[n]`` vectors (average ranks for ties); NaN if one is constant."""
    ra, rb = _ranks(a.double()), _ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = (ra.norm() * rb.norm())
    return float((ra @ rb) / denominator) if denominator > 0 else float("nan")


def _ranks(x: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(x, stable=True)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(x.numel(), dtype=x.dtype)
    for value in torch.unique(x):  # ties share their mean rank
        tie = x == value
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


def sensitivity(method, heta, ids: Sequence[int], target: int, context: Sequence[int], sigma: float = 0.01,
                repeats: int = 3, seed: int = 0) -> float:
    """Mean over ``C`` of the per-token standard deviation of ``a`` across ``repeats`` runs, each with
    ``N(0, sigma^2)`` noise (seeded) added to the input embeddings. Lower is better."""
    runs = []
    for r in range(repeats):
        with embedding_noise(heta.lm, sigma, seed + r):
            runs.append(method(heta, list(ids), target).float())
    stacked = torch.stack(runs)[:, list(context)]
    return float(stacked.std(dim=0, unbiased=True).mean())


@contextlib.contextmanager
def embedding_noise(lm, sigma: float, seed: int) -> Iterator[None]:
    """Add ``N(0, sigma^2)`` noise, seeded, to every output of the model's input embedding layer.

    Each forward of the embedding draws from one generator seeded once, so a run is reproducible;
    the hook is removed on exit and the model is left as it was.
    """
    generator = torch.Generator().manual_seed(seed)

    def hook(_module, _args, output):
        noise = torch.randn(output.shape, generator=generator) * sigma
        return output + noise.to(output.dtype).to(output.device)

    handle = lm.embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()
