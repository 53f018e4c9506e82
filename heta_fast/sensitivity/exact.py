"""Exact Hessian sensitivity ``S`` (docs/method.md §2), fast path: HVPs with the method's own probes."""

from __future__ import annotations

import torch

from heta_fast.memory import batch_size, sequence_bytes, warn_if_over
from heta_fast.rng import rademacher
from heta_fast.second_order import fused_hvps


def block_l1_mean(hvp: torch.Tensor, positions: torch.Tensor, n: int, samples: int) -> torch.Tensor:
    """Reduce HVP results to ``S``: ``S_i = (1/m) sum_k ||(H r_{i,k})_i||_1``.

    hvp: ``[B, d]`` (each row already the probe's own block) or ``[B, T, d]`` (whole HVPs, the
    block is read at row ``positions[b]``); positions: int ``[B]``, the position ``i`` of each
    probe; n: number of context positions; samples: ``m``. Returns ``[n]`` float32; positions
    with no probe in the batch get 0, so partial batches can be summed.
    """
    positions = positions.to(device=hvp.device, dtype=torch.int64).reshape(-1)
    if hvp.dim() == 3:
        hvp = hvp[torch.arange(hvp.shape[0], device=hvp.device), positions]
    l1 = hvp.float().abs().sum(dim=-1)
    out = torch.zeros(n, dtype=torch.float32, device=hvp.device)
    return out.index_add_(0, positions, l1) / samples


@fused_hvps
def hessian_sensitivity(lm, E: torch.Tensor, y: int, key_values, config, budget: int,
                        rademacher_fn=rademacher, block_l1_fn=block_l1_mean, progress=None) -> torch.Tensor:
    """``S``: ``[n]``. E: ``[t + 1, d]``; y: target id; key_values: the prefix cache of rows ``0 .. p``.

    Only the diagonal block ``H_ii`` meets a probe placed in block ``i``, and ``g`` depends on
    row ``i`` only through rows ``i .. p``. So a batch of positions ``[a, b)`` runs rows
    ``a .. p`` once on the cached prefix, every row a leaf, and takes one gradient ``grad g``
    with ``create_graph``; one backward of it, batched over the ``c m`` probes of the batch
    (probe ``(i, k)`` is ``r_{i,k}`` at row ``i`` and zero elsewhere), gives ``H r`` per probe,
    whose row ``i`` is ``H_ii r_{i,k}``. The graph is built once per batch, not once per position:
    its forward and first backward cost ``2 / (2 + 2m)`` of a position's work, so sharing it
    saves most of that (BENCHMARKS "Shared graph build": 1.34x at m = 2, n = 64 on SmolLM2).
    """
    t, d = E.shape[0] - 1, E.shape[1]
    m = config.samples
    S = torch.zeros(t, dtype=torch.float32, device=E.device)
    # probes go through the backward in groups: all m at once unless one position would not fit
    group = m
    while group > 1 and sequence_bytes(lm, t, t, 2 + 2 * group) > budget:
        group = (group + 1) // 2
    warn_if_over(budget, sequence_bytes(lm, t, t, 2 + 2 * group), "the HVPs of the first position")
    a = 0
    while a < t:
        rows = t - a
        # the shared graph costs about 2 sets of the rows' activations, each probe about 2 more
        spare = budget - sequence_bytes(lm, rows, t, 2)
        c = batch_size(lm, spare, rows, t, copies=2 * group, limit=max(1, -(-t // 8)))
        b = min(t, a + c)
        c = b - a
        leaves = E[a:-1].detach().clone().requires_grad_(True)  # rows a .. p
        past = lm.prefix_cache(key_values, a, 1)
        hidden = lm.hidden(leaves[None], past=past).last_hidden_state[0, -1]  # row p
        g = torch.log_softmax(lm.unembed(hidden).float(), dim=-1)[y]
        (grad,) = torch.autograd.grad(g, leaves, create_graph=True)
        for k0 in range(0, m, group):
            k1 = min(m, k0 + group)
            positions = torch.arange(a, b, device=E.device).repeat(k1 - k0)  # sample-major: row k * c + j
            samples = torch.arange(k0, k1, device=E.device).repeat_interleave(c)
            probes = rademacher_fn(config.seed, positions, samples, d, dtype=E.dtype, device=E.device)
            at = (torch.arange(positions.shape[0], device=E.device), positions - a)  # (probe, its row)
            placed = probes.new_zeros(positions.shape[0], rows, d).index_put_(at, probes)
            (Hr,) = torch.autograd.grad(grad, leaves, grad_outputs=placed, is_grads_batched=True,
                                        retain_graph=k1 < m)
            S += block_l1_fn(Hr[at], positions, t, m)
            del Hr, placed
        del grad, g, hidden, past, leaves
        if progress is not None:
            progress("hessian", b, t)
        a = b
    return S
