"""Memory budget: how many masked variants or probe positions one batch may hold.

The fast backends batch work along the context; a batch's memory is dominated by activations,
so it is estimated per (row x layer) from the model's sizes and the batch is sized to fit.
The estimates are deliberately conservative; ``tests/test_memory.py`` measures the real peak.
"""

from __future__ import annotations

import os
import warnings

import torch

from heta_fast.model import CausalLM

GiB = 1 << 30


def available_bytes(device: torch.device) -> int:
    """Free memory on ``device`` (CUDA: free device memory; CPU: the OS's MemAvailable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 4 * GiB


def default_budget(device: torch.device) -> int:
    """A quarter of free memory, at most 8 GiB, at least 256 MiB."""
    return int(min(8 * GiB, max(256 << 20, available_bytes(device) // 4)))


def _row_floats(lm: CausalLM, total_len: int) -> int:
    """Floats one sequence row keeps per layer in a forward: projections, MLP, attention row."""
    d = lm.hidden_size
    ffn = 4 * d
    for name in ("intermediate_size", "n_inner"):
        value = getattr(lm.config, name, None)
        if value:
            ffn = value
    return 8 * d + 3 * ffn + 3 * lm.num_heads * total_len


def sequence_bytes(lm: CausalLM, rows: int, total_len: int, copies: float) -> int:
    """Estimated bytes of one batch element of ``rows`` rows attending over ``total_len`` positions.

    copies: how many sets of activations a row costs (1 for a plain forward; an HVP's graph
    about 2, plus about 2 per probe evaluated at once; measured on tiny models, the real
    figure is 40-60% of this estimate).
    """
    return int(_row_floats(lm, total_len) * rows * lm.num_layers * copies * 4)


def batch_size(lm: CausalLM, budget: int, rows: int, total_len: int, copies: float, limit: int) -> int:
    """Largest batch ``b <= limit`` whose ``b * rows`` rows fit the budget (at least 1, see ``fits``)."""
    return int(max(1, min(limit, budget // max(1, sequence_bytes(lm, rows, total_len, copies)))))


def warn_if_over(budget: int, needed: int, what: str) -> None:
    """One warning when even the smallest unit of work is estimated above the budget."""
    if needed > budget:
        warnings.warn(f"memory_budget {budget / 2**20:.1f} MiB is below the estimated "
                      f"{needed / 2**20:.1f} MiB that {what} needs; running it anyway", ResourceWarning, stacklevel=3)
