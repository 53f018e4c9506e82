"""Hessian sensitivity ``S`` (HETA_SPEC §2), fast path."""

from __future__ import annotations

import torch


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
