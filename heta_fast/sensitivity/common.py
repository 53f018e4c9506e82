"""What the curvature estimators share: the method's probes as blocks, batch sizing, ``g`` and the read-out.

Every estimator replaces the Hessian ``H`` of ``g(E) = log P[y]`` by a model whose diagonal
block ``i`` factors as ``U_i C U_i^T`` (``U_i`` ``[d, k]``, ``C`` ``[k, k]`` symmetric), then
applies the method's own probes ``r_{i,k}`` to it (docs/method.md §2):

    S_i = (1/m) sum_k || U_i C U_i^T r_{i,k} ||_1.

``low_rank`` has ``U_i = Q_i`` and ``C = B``; ``gauss_newton`` has ``U_i = J_i^T`` and
``C = Lambda``. ``factored_sensitivity`` is that read-out, once for both.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from heta_fast.memory import sequence_bytes, warn_if_over
from heta_fast.rng import rademacher

READ_OUT_POSITIONS = 256  # positions per read-out step: the probes of all n at once would be n m d floats


def block_probes(seed: int, start: int, stop: int, samples: int, d: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """The method's probes ``r_{i,k}`` for ``start <= i < stop``, ``k < m``, as blocks: ``[stop - start, m, d]``.

    The same counter-based numbers as the exact path (``heta_fast.rng.rademacher``).
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
    warn_if_over(budget, sequence_bytes(lm, rows, rows, 4), what)
    chunk = 1
    while chunk < limit and sequence_bytes(lm, rows, rows, 2 + 2 * (chunk + 1)) <= budget:
        chunk += 1
    return chunk


def target_log_prob(lm, X: torch.Tensor, y: int) -> torch.Tensor:
    """``g = log softmax(f(X)_p)[y]`` with ``X`` rows ``0 .. p`` (``[t, d]``); a scalar, float32."""
    hidden = lm.hidden(X[None]).last_hidden_state[0, -1]
    return torch.log_softmax(lm.unembed(hidden).float(), dim=-1)[y]


def factored_blocks(U: torch.Tensor, C: torch.Tensor, probes: torch.Tensor) -> torch.Tensor:
    """``S_i = (1/m) sum_k ||U_i C U_i^T r_{i,k}||_1`` for the positions of ``probes``.

    U: ``[n, d, k]`` (row ``i`` is ``U_i``); C: ``[k, k]`` symmetric; probes: ``[n, m, d]``.
    Returns ``[n]`` float32; the products run in ``probes``' dtype.
    """
    U = U.to(probes.dtype)
    coeff = torch.einsum("ndk,nmd->nmk", U, probes)  # U_i^T r
    coeff = coeff @ C.to(probes.dtype)  # C symmetric, so the row-vector form is the same product
    blocks = torch.einsum("ndk,nmk->nmd", U, coeff)
    return blocks.abs().sum(dim=-1).mean(dim=-1).float()


def factored_sensitivity(U: Callable[[int, int], torch.Tensor], C: torch.Tensor, t: int, d: int, config,
                         device: torch.device) -> torch.Tensor:
    """``S`` ``[t]`` float32 from a factored curvature model, a few hundred positions at a time.

    U: ``U(a, b)`` returns ``U_i`` for ``a <= i < b`` as ``[b - a, d, k]``; C: ``[k, k]``. The
    read-out is in float64: it is cheap next to the HVPs and keeps ``low_rank`` at full rank
    within rounding of exact ``S``.
    """
    S = torch.zeros(t, dtype=torch.float32, device=device)
    for a in range(0, t, READ_OUT_POSITIONS):
        b = min(t, a + READ_OUT_POSITIONS)
        probes = block_probes(config.seed, a, b, config.samples, d, dtype=torch.float64, device=device)
        S[a:b] = factored_blocks(U(a, b), C, probes)
    return S
