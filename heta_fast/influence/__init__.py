"""KL information impact ``I`` (docs/method.md §3): the exact path and its fixed-pass estimators.

``estimate_information`` dispatches on ``config.information`` through ``ESTIMATORS``, as
``heta_fast.sensitivity`` does for ``S``:

- ``exact`` (``exact``): one masked forward per context token, the method's own ``I``;
- ``linearised`` (``linearised``): ``1/2 dz^T F dz`` with ``dz`` the first-order logit change of
  masking, from the Jacobian Gauss-Newton ``S`` already computes; no forward per token;
- ``screened`` (``screened``): the linearised ranking picks ``config.screened_tokens`` tokens
  whose ``I`` is run exactly; the rest keep the linearised value, rescaled.

Formulas, costs and fidelity to exact ``I`` are in docs/estimators.md. Several targets of one
text share one set of masked forwards on the exact path (``exact.masked_kl``, called by the
pipeline); the estimators run per target.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from heta_fast.influence.exact import kl_information, masked_kl
from heta_fast.influence.linearised import linearised_information
from heta_fast.influence.screened import screened_information
from heta_fast.kl import linear_kl
from heta_fast.sensitivity.gauss_newton import LogitJacobian

Estimator = Callable[..., torch.Tensor]
"""``(lm, E [t + 1, d], log_P [V], key_values, config, budget, jacobian, linear_kl_fn, progress) -> I [t]``."""


def _exact(lm, E, log_P, key_values, config, budget, jacobian, linear_kl_fn, progress) -> torch.Tensor:
    return kl_information(lm, E, log_P, key_values, config, budget, linear_kl_fn, progress)


def _linearised(lm, E, log_P, key_values, config, budget, jacobian, linear_kl_fn, progress) -> torch.Tensor:
    return linearised_information(jacobian, E, config)


def _screened(lm, E, log_P, key_values, config, budget, jacobian, linear_kl_fn, progress) -> torch.Tensor:
    return screened_information(lm, E, log_P, key_values, config, budget, jacobian, linear_kl_fn, progress)


ESTIMATORS: dict[str, Estimator] = {
    "exact": _exact,
    "linearised": _linearised,
    "screened": _screened,
}
"""``config.information`` -> how ``I`` is computed (the keys are ``heta_fast.config.INFORMATIONS``)."""


def estimate_information(lm, E: torch.Tensor, log_P: torch.Tensor, key_values, config, budget: int,
                         jacobian: LogitJacobian, linear_kl_fn=linear_kl, progress=None) -> torch.Tensor:
    """``I`` ``[t]`` float32 of one target by ``config.information``.

    E: ``[t + 1, d]`` (context and target); log_P: ``[V]`` float64, the unmasked log-probabilities at
    row ``p``; key_values: the prefix cache of rows ``0 .. p``; jacobian: the target's
    ``LogitJacobian`` (shared with Gauss-Newton ``S``); linear_kl_fn: ``linear_kl`` or its fused kernel.
    """
    estimator = ESTIMATORS.get(config.information)
    if estimator is None:
        raise ValueError(f"unknown information estimator {config.information!r}; expected one of "
                         f"{', '.join(ESTIMATORS)}")
    return estimator(lm, E, log_P, key_values, config, budget, jacobian, linear_kl_fn, progress)


__all__ = ["ESTIMATORS", "estimate_information", "kl_information", "masked_kl"]
