"""``gauss_newton``: ``S`` from the Gauss-Newton (Fisher) part of the input Hessian.

With ``z = f(E)_p`` the logits at the prediction row and ``g = log softmax(z)[y]``,

    H = J^T Lambda J + sum_v (dg/dz_v) d^2 z_v / dE^2,   J = dz/dE,   Lambda = d^2 g / dz^2 = -(diag P - P P^T).

The estimator keeps the first term only, on the ``K`` most probable tokens plus the target
(``C`` = ``K`` or ``K + 1`` logits; ``P_C``, ``Lambda_C`` restricted to them, not renormalised):

    S_i = (1/m) sum_k || J_i^T Lambda_C J_i r_{i,k} ||_1,   J_i = dz_C / dx_i  (C x d),

since ``(J^T Lambda J r)_i = J_i^T Lambda J_i r`` for a probe that lives in block ``i``.
``J`` for all positions at once is one forward over rows ``0 .. p`` and one backward batched
over the ``C`` logits; the read-out (``common.factored_sensitivity``) is ``O(n m C d)`` flops.
It drops the curvature of the network itself (the second term), so its values are smaller than
exact ``S`` (BENCHMARKS.md, estimator fidelity on SmolLM2: ``sum S`` is 0.09-0.17 of exact's,
geometric mean per input set, K = 8): the ``beta S`` vs ``gamma I`` balance of the scores
changes. It is not rescaled.
"""

from __future__ import annotations

import torch

from heta_fast.components import Progress
from heta_fast.sensitivity.common import factored_sensitivity, vectors_that_fit


def logit_set(log_probs: torch.Tensor, y: int, topk: int) -> torch.Tensor:
    """The ``topk`` most probable token ids, then ``y`` if it is not among them: int64 ``[C]``."""
    top = torch.topk(log_probs, min(topk, log_probs.numel())).indices
    if not (top == y).any():
        top = torch.cat([top, top.new_tensor([y])])
    return top


def softmax_curvature(probs: torch.Tensor) -> torch.Tensor:
    """``Lambda = -(diag P - P P^T)`` on the given entries of ``P``: ``[C]`` -> ``[C, C]``."""
    return torch.outer(probs, probs) - torch.diag(probs)


def logit_jacobian(lm, E: torch.Tensor, y: int, topk: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``J`` ``[C, t, d]`` (the chosen logits at row ``p`` w.r.t. rows ``0 .. p`` of ``E``) and ``P_C`` ``[C]`` float64.

    E: ``[t + 1, d]``. chunk: logits per batched backward (each is one vector of the batch).
    """
    X = E[:-1].detach().clone().requires_grad_(True)
    hidden = lm.hidden(X[None]).last_hidden_state[0, -1]
    z = lm.unembed(hidden).float()
    with torch.no_grad():
        log_p = torch.log_softmax(z.double(), dim=-1)
        chosen = logit_set(log_p, y, topk)
        probs = log_p[chosen].exp()
    zc = z[chosen]
    C = zc.numel()
    eye = torch.eye(C, dtype=zc.dtype, device=zc.device)
    parts = []
    for a in range(0, C, chunk):
        b = min(C, a + chunk)
        (J,) = torch.autograd.grad(zc, X, grad_outputs=eye[a:b], is_grads_batched=True, retain_graph=b < C)
        parts.append(J)
    return torch.cat(parts), probs


class LogitJacobian:
    """``(J, P_C)`` of ``logit_jacobian`` for one target, computed on first use and kept.

    Gauss-Newton ``S`` and linearised or screened ``I`` (``heta_fast.influence``) read the same
    Jacobian of the ``K`` most probable logits (``config.hessian_topk``) plus the target's; the
    pipeline makes one holder per target, so a configuration that uses both pays for it once.
    """

    def __init__(self, lm, E: torch.Tensor, y: int, config, budget: int):
        self.lm, self.E, self.y, self.config, self.budget = lm, E, y, config, budget
        self._value: tuple[torch.Tensor, torch.Tensor] | None = None

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``J`` ``[C, t, d]`` and ``P_C`` ``[C]`` float64 (see ``logit_jacobian``)."""
        if self._value is None:
            t, topk = self.E.shape[0] - 1, self.config.hessian_topk
            chunk = vectors_that_fit(self.lm, self.budget, t, topk + 1, "one logit's backward over all rows")
            self._value = logit_jacobian(self.lm, self.E, self.y, topk, chunk)
        return self._value

    def release(self) -> None:
        """Drop ``J`` (``C x t x d`` floats) once no estimator will read it again."""
        self._value = None


def gauss_newton_sensitivity(lm, E: torch.Tensor, y: int, config, budget: int,
                             progress: Progress | None = None, jacobian: LogitJacobian | None = None) -> torch.Tensor:
    """``S`` ``[n]`` from ``J^T Lambda J`` on ``config.hessian_topk`` logits (+ the target). E: ``[t + 1, d]``.

    jacobian: the target's shared ``LogitJacobian`` (made here when None).
    """
    t, d = E.shape[0] - 1, E.shape[1]
    J, probs = (jacobian or LogitJacobian(lm, E, y, config, budget)).get()
    Lam = softmax_curvature(probs)
    if progress is not None:
        progress("hessian", t // 2, t)  # J done; positions, like the exact path
    S = factored_sensitivity(lambda a, b: J[:, a:b].permute(1, 2, 0), Lam, t, d, config, E.device)  # U_i = J_i^T
    if progress is not None:
        progress("hessian", t, t)
    return S
