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
    row ``i`` only through rows ``i .. p``. So position ``i`` runs rows ``i .. p`` on the cached
    prefix with row ``i`` as the only leaf; a batch of positions ``[a, b)`` shares rows
    ``a .. p`` (variant ``j`` carries its leaf at row ``j``); variants are independent, so one
    gradient of ``sum_j g_j`` and one batched backward per probe set give every ``H_ii r_{i,k}``.
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
        c = batch_size(lm, budget, t - a, t, copies=2 + 2 * group, limit=max(1, -(-t // 8)))
        b = min(t, a + c)
        c = b - a
        leaves = E[a:b].detach().clone().requires_grad_(True)  # x_i for i in [a, b)
        j = torch.arange(c, device=E.device)
        batch = E[a:-1].expand(c, -1, -1).index_put((j, j), leaves)
        past = lm.prefix_cache(key_values, a, c)
        hidden = lm.hidden(batch, past=past).last_hidden_state[:, -1]  # row p of every variant
        g = torch.log_softmax(lm.unembed(hidden).float(), dim=-1)[:, y].sum()
        (grad,) = torch.autograd.grad(g, leaves, create_graph=True)
        for k0 in range(0, m, group):
            k1 = min(m, k0 + group)
            positions = torch.arange(a, b, device=E.device).repeat(k1 - k0)  # sample-major: row k * c + j
            samples = torch.arange(k0, k1, device=E.device).repeat_interleave(c)
            probes = rademacher_fn(config.seed, positions, samples, d, dtype=E.dtype, device=E.device)
            (Hr,) = torch.autograd.grad(grad, leaves, grad_outputs=probes.view(k1 - k0, c, d), is_grads_batched=True,
                                        retain_graph=k1 < m)
            S += block_l1_fn(Hr.reshape(-1, d), positions, t, m)
            del Hr
        del grad, g, hidden, batch, past
        if progress is not None:
            progress("hessian", b, t)
        a = b
    return S
