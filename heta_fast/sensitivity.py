"""How ``S`` is estimated: the dispatch over ``config.hessian`` and what the estimators share.

``exact`` is HETA_SPEC §2 (``heta_fast.hessian``); the others replace the Hessian ``H`` of
``g(E) = log P[y]`` by a cheaper curvature model and then apply the spec's own probes
``r_{i,k}`` to it, so that ``S_i = (1/m) sum_k ||(H~ r_{i,k})_i||_1`` keeps its form:

- ``low_rank`` (``heta_fast.low_rank``): ``H~ = Q B Q^T`` from a randomised range finder;
- ``gauss_newton`` (``heta_fast.gauss_newton``): ``H~ = J^T Lambda J`` on the top-K logits;
- ``layer_subset`` (``heta_fast.layer_subset``): the Hessian with respect to the residual stream
  entering layer ``N - k`` instead of ``E``.

Formulas and costs: docs/estimators.md.
"""

from __future__ import annotations

import torch

from heta_fast.components import Progress
from heta_fast.probes import rademacher


def block_probes(seed: int, start: int, stop: int, samples: int, d: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """The spec's probes ``r_{i,k}`` for ``start <= i < stop``, ``k < m``, as blocks: ``[stop - start, m, d]``.

    The same counter-based numbers as the exact path (``heta_fast.probes.rademacher``).
    """
    positions = torch.arange(start, stop, device=device).repeat_interleave(samples)
    ks = torch.arange(samples, device=device).repeat(stop - start)
    return rademacher(seed, positions, ks, d, dtype=dtype, device=device).view(stop - start, samples, d)


def vectors_that_fit(lm, budget: int, rows: int, limit: int, what: str) -> int:
    """How many vectors one batched (double) backward over ``rows`` rows may carry: ``1 .. limit``.

    Sized like the exact path (``heta_fast.memory.sequence_bytes``): the graph costs about 2 sets
    of a forward's activations and every vector in the batched backward about 2 more. Warns
    once when even one vector is estimated above the budget (it then runs anyway).
    """
    from heta_fast.memory import sequence_bytes, warn_if_over

    warn_if_over(budget, sequence_bytes(lm, rows, rows, 4), what)
    chunk = 1
    while chunk < limit and sequence_bytes(lm, rows, rows, 2 + 2 * (chunk + 1)) <= budget:
        chunk += 1
    return chunk


def target_log_prob(lm, X: torch.Tensor, y: int) -> torch.Tensor:
    """``g = log softmax(f(X)_p)[y]`` with ``X`` rows ``0 .. p`` (``[t, d]``); a scalar, float32."""
    hidden = lm.hidden(X[None]).last_hidden_state[0, -1]
    return torch.log_softmax(lm.unembed(hidden).float(), dim=-1)[y]


def estimate_sensitivity(lm, E: torch.Tensor, y: int, key_values, config, budget: int,
                         progress: Progress | None = None) -> torch.Tensor:
    """``S`` ``[n]`` float32 by ``config.hessian``.

    E: ``[t + 1, d]`` token embeddings (context and target); y: target id; key_values: the
    prefix cache of rows ``0 .. p`` from the shared forward (``CausalLM.key_values``);
    budget: bytes for batched work; progress: ``progress("hessian", done, total)``.
    """
    if config.hessian == "exact":
        from heta_fast.hessian import hessian_sensitivity

        return hessian_sensitivity(lm, E, y, key_values, config, budget, progress=progress)
    if config.hessian == "low_rank":
        from heta_fast.low_rank import low_rank_sensitivity

        return low_rank_sensitivity(lm, E, y, config, budget, progress)
    if config.hessian == "gauss_newton":
        from heta_fast.gauss_newton import gauss_newton_sensitivity

        return gauss_newton_sensitivity(lm, E, y, config, budget, progress)
    if config.hessian == "layer_subset":
        from heta_fast.layer_subset import layer_subset_sensitivity

        return layer_subset_sensitivity(lm, E, y, key_values, config, budget, progress)
    raise ValueError(f"unknown hessian estimator {config.hessian!r}")
