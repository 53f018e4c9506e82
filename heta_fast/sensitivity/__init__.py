"""Hessian sensitivity ``S`` (docs/method.md §2): the exact path and the curvature estimators.

``estimate_sensitivity`` dispatches on ``config.hessian`` through ``ESTIMATORS``:

- ``exact`` (``exact``): the method's own block probes on the true input Hessian;
- ``low_rank`` (``low_rank``): ``H ~ Q B Q^T`` from a randomised range finder;
- ``gauss_newton`` (``gauss_newton``): ``H ~ J^T Lambda J`` on the top-K logits;
- ``layer_subset`` (``layer_subset``): the Hessian with respect to the residual stream entering
  layer ``N - k`` instead of ``E``.

Each estimator keeps ``S_i = (1/m) sum_k ||(H~ r_{i,k})_i||_1`` with the method's probes and
only changes ``H``; formulas and costs are in docs/estimators.md. ``common`` holds what they
share; nothing here imports back into this package's ``__init__``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from heta_fast.components import Progress
from heta_fast.rng import rademacher
from heta_fast.sensitivity.exact import block_l1_mean, hessian_sensitivity
from heta_fast.sensitivity.gauss_newton import LogitJacobian, gauss_newton_sensitivity
from heta_fast.sensitivity.layer_subset import layer_subset_sensitivity
from heta_fast.sensitivity.low_rank import low_rank_sensitivity

Estimator = Callable[..., torch.Tensor]
"""``(lm, E [t + 1, d], y, key_values, config, budget, progress, rademacher_fn, block_l1_fn, jacobian) -> S [t]``."""


def _exact(lm, E, y, key_values, config, budget, progress, rademacher_fn, block_l1_fn,
           jacobian) -> torch.Tensor:
    return hessian_sensitivity(lm, E, y, key_values, config, budget, rademacher_fn, block_l1_fn, progress)


def _low_rank(lm, E, y, key_values, config, budget, progress, rademacher_fn, block_l1_fn,
              jacobian) -> torch.Tensor:
    return low_rank_sensitivity(lm, E, y, config, budget, progress)


def _gauss_newton(lm, E, y, key_values, config, budget, progress, rademacher_fn, block_l1_fn,
                  jacobian) -> torch.Tensor:
    return gauss_newton_sensitivity(lm, E, y, config, budget, progress, jacobian)


def _layer_subset(lm, E, y, key_values, config, budget, progress, rademacher_fn, block_l1_fn,
                  jacobian) -> torch.Tensor:
    return layer_subset_sensitivity(lm, E, y, key_values, config, budget, progress, rademacher_fn, block_l1_fn)


ESTIMATORS: dict[str, Estimator] = {
    "exact": _exact,
    "low_rank": _low_rank,
    "gauss_newton": _gauss_newton,
    "layer_subset": _layer_subset,
}
"""``config.hessian`` -> how ``S`` is computed (the keys are ``heta_fast.config.HESSIANS``)."""


def estimate_sensitivity(lm, E: torch.Tensor, y: int, key_values, config, budget: int,
                         progress: Progress | None = None, rademacher_fn=rademacher,
                         block_l1_fn=block_l1_mean, jacobian: LogitJacobian | None = None) -> torch.Tensor:
    """``S`` ``[n]`` float32 by ``config.hessian``.

    E: ``[t + 1, d]`` token embeddings (context and target); y: target id; key_values: the
    prefix cache of rows ``0 .. p`` from the shared forward (``CausalLM.key_values``);
    budget: bytes for batched work; progress: ``progress("hessian", done, total)``;
    rademacher_fn, block_l1_fn: the probe generator and the HVP reduction of the paths that
    run HVPs with the method's probes (``exact``, ``layer_subset``), swappable for the fused
    kernels. The others draw their probes in float64 for the read-out and ignore them.
    jacobian: the target's ``LogitJacobian``, shared with linearised ``I`` (``gauss_newton`` reads it).
    """
    estimator = ESTIMATORS.get(config.hessian)
    if estimator is None:
        raise ValueError(f"unknown hessian estimator {config.hessian!r}; expected one of {', '.join(ESTIMATORS)}")
    return estimator(lm, E, y, key_values, config, budget, progress, rademacher_fn, block_l1_fn, jacobian)


__all__ = ["ESTIMATORS", "LogitJacobian", "block_l1_mean", "estimate_sensitivity", "hessian_sensitivity"]
