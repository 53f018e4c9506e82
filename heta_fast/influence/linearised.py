"""``linearised`` I: the KL's second-order expansion around the unmasked input, from one Jacobian.

Masking token ``i`` moves its embedding by ``delta_i = mask_i - e_i``. To first order the logits
``z_C`` of the ``C`` kept tokens (the ``K = config.hessian_topk`` most probable and the target,
as Gauss-Newton ``S`` keeps) move by ``dz_i = J_i delta_i`` with ``J_i = dz_C / de_i`` ``[C, d]``, and
to second order in ``dz``

    KL(P || softmax(z + dz)) = 1/2 dz^T F dz + O(|dz|^3),   F = diag(P) - P P^T,

the Fisher information of the softmax. Restricted to the kept tokens (``P_C``, not
renormalised; a logit outside ``C`` is taken not to move):

    I_i ~ 1/2 dz_i^T (diag(P_C) - P_C P_C^T) dz_i.

Cost: the Jacobian is ``C`` backwards over the context (shared with Gauss-Newton ``S`` through
``LogitJacobian``), then ``O(n C d)`` for every position at once: no forward per token. What it
misses: masking is not a small move (the expansion is of a first-order ``dz``), so its ranking
of tokens is rough; BENCHMARKS.md ("Fixed-pass I") has its fidelity to exact ``I``.
"""

from __future__ import annotations

import torch

from heta_fast.kl import mask_rows
from heta_fast.sensitivity.gauss_newton import LogitJacobian


def logit_shifts(jacobian: LogitJacobian, E: torch.Tensor, config) -> tuple[torch.Tensor, torch.Tensor]:
    """``dz`` ``[C, t]`` float64 (column ``i``: ``J_i (mask_i - e_i)``) and ``P_C`` ``[C]``. E: ``[t + 1, d]``."""
    J, probs = jacobian.get()  # [C, t, d]
    t = E.shape[0] - 1
    positions = torch.arange(t, device=E.device)
    delta = mask_rows(config.mask, E, positions, config.seed) - E[:t]  # [t, d]
    return torch.einsum("ctd,td->ct", J.double(), delta.double()), probs


def fisher_quadratic(dz: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """``1/2 dz_i^T (diag(P) - P P^T) dz_i`` for every column ``i`` of ``dz`` ``[C, t]``: ``[t]``, >= 0.

    Written as half the variance of ``dz_i`` under ``P`` (``sum_c P_c dz^2 - (sum_c P_c dz)^2`` with the
    unrenormalised ``P_C``: then ``sum P_C <= 1`` keeps it >= 0).
    """
    mean = probs @ dz
    return (0.5 * (probs @ dz.square() - mean.square())).clamp_min(0.0)


def linearised_information(jacobian: LogitJacobian, E: torch.Tensor, config) -> torch.Tensor:
    """``I`` ``[t]`` float32 by the second-order expansion. E: ``[t + 1, d]`` (context and target)."""
    dz, probs = logit_shifts(jacobian, E, config)
    return fisher_quadratic(dz, probs).float()
