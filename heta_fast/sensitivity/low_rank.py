"""``low_rank``: ``S`` from a randomised rank-``k`` model of the whole input Hessian.

``H`` is the Hessian of ``g`` over all ``t d`` inputs of rows ``0 .. p`` (row ``t`` does not
reach the logits at ``p``). With a full-support sketch ``Omega`` (``k`` random sign vectors):

    Y = H Omega,   Q = orth(Y)  (D x k, D = t d),   B = Q^T (H Q),   H ~ Q B Q^T,

that is ``2k`` HVPs through one graph over all ``t`` rows, whatever ``n``. Every block product
the method needs is then read from the model, with the method's own probes:

    (H r_{i,k})_i ~ Q_i B Q_i^T r_{i,k},   Q_i = rows of Q in block i (d x k),

which costs ``O(n m d k)`` flops and no model work (``common.factored_sensitivity``). With
``k = D``, ``Q`` is square orthogonal and ``Q B Q^T = H`` exactly (up to rounding).
"""

from __future__ import annotations

import torch

from heta_fast.components import Progress
from heta_fast.rng import check_seed, hash32, hash32_int
from heta_fast.sensitivity.common import factored_sensitivity, target_log_prob, vectors_that_fit

STREAM_SKETCH = 0x736B6574  # "sket": a stream of its own, so sketch and block probes never coincide


def sketch_vectors(seed: int, columns: torch.Tensor, rows: int, d: int, dtype: torch.dtype = torch.float32,
                   device: torch.device | str | None = None) -> torch.Tensor:
    """Full-support Rademacher sketch vectors ``Omega[:, s]`` for the sketch columns ``s`` given: ``[C, rows, d]``.

    Entry ``(s, i, j)`` is ``+1`` when the top bit of ``hash(hash(hash(seed ^ stream) ^ s) ^ i) ^ j``
    is 0, else ``-1``: a pure function of ``(seed, s, i, j)``, like the method's probes.
    """
    base = hash32_int(check_seed(seed) ^ STREAM_SKETCH)
    columns = torch.as_tensor(columns, device=device, dtype=torch.int64).reshape(-1)
    i = torch.arange(rows, dtype=torch.int64, device=columns.device)
    key = hash32(hash32(columns ^ base)[:, None] ^ i[None, :])  # [C, rows]
    j = torch.arange(d, dtype=torch.int64, device=columns.device)
    bits = hash32(key[..., None] ^ j) >> 31
    return (1 - 2 * bits).to(dtype)


class InputHessian:
    """HVPs with the Hessian of ``g`` over rows ``0 .. p`` of ``E``, all through one graph.

    E: ``[t + 1, d]``. ``self(V)`` takes ``V`` ``[c, t, d]`` and returns ``H V`` ``[c, t, d]``
    (one batched double backward). The graph (forward, then the gradient with ``create_graph``)
    is built once and kept until the object is dropped.
    """

    def __init__(self, lm, E: torch.Tensor, y: int):
        self.X = E[:-1].detach().clone().requires_grad_(True)
        g = target_log_prob(lm, self.X, y)
        (self.grad,) = torch.autograd.grad(g, self.X, create_graph=True)

    def __call__(self, V: torch.Tensor) -> torch.Tensor:
        (HV,) = torch.autograd.grad(self.grad, self.X, grad_outputs=V.to(self.X.dtype), is_grads_batched=True,
                                    retain_graph=True)
        return HV


def low_rank_model(hvp, seed: int, rank: int, t: int, d: int, chunk: int, device, dtype,
                   progress: Progress | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``Q`` ``[t, d, k]`` (orthonormal columns) and ``B`` ``[k, k]`` (symmetric) with ``H ~ Q B Q^T``.

    hvp: ``V [c, t, d] -> H V``; rank: ``k`` (at most ``t d``); chunk: vectors per batched HVP.
    Both in float64 (the QR and the small products are cheap next to the HVPs). progress is
    told ``("hessian", done, t)`` in positions, like the exact path, scaled from HVPs done.
    """
    D = t * d
    k = min(rank, D)
    total = 2 * k
    done = 0
    Y = torch.empty(k, t, d, dtype=torch.float64, device=device)
    for a in range(0, k, chunk):
        b = min(k, a + chunk)
        omega = sketch_vectors(seed, torch.arange(a, b), t, d, dtype=dtype, device=device)
        Y[a:b] = hvp(omega).double()
        done += b - a
        if progress is not None:
            progress("hessian", t * done // total, t)
    Q, _ = torch.linalg.qr(Y.reshape(k, D).T)  # [D, k]; square orthogonal when k = D
    del Y
    QT = Q.T.reshape(k, t, d)
    B = torch.empty(k, k, dtype=torch.float64, device=device)
    for a in range(0, k, chunk):
        b = min(k, a + chunk)
        Z = hvp(QT[a:b].to(dtype)).double().reshape(b - a, D)  # (H q_s)^T for columns s in [a, b)
        B[:, a:b] = Q.T @ Z.T
        done += b - a
        if progress is not None:
            progress("hessian", t * done // total, t)
    return Q.reshape(t, d, k), 0.5 * (B + B.T)  # H is symmetric; rounding and the cut make B slightly not


def low_rank_sensitivity(lm, E: torch.Tensor, y: int, config, budget: int,
                         progress: Progress | None = None) -> torch.Tensor:
    """``S`` ``[n]`` from the rank-``config.hessian_rank`` model. E: ``[t + 1, d]``; y: target id."""
    t, d = E.shape[0] - 1, E.shape[1]
    chunk = vectors_that_fit(lm, budget, t, min(config.hessian_rank, t * d), "one low-rank HVP over all rows")
    hvp = InputHessian(lm, E, y)
    Q, B = low_rank_model(hvp, config.seed, config.hessian_rank, t, d, chunk, E.device, E.dtype, progress)
    del hvp
    return factored_sensitivity(lambda a, b: Q[a:b], B, t, d, config, E.device)  # U_i = Q_i, C = B
