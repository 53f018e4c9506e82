"""Memory budget: how many masked variants or probe positions one batch may hold.

The fast backends batch work along the context; a batch's memory is dominated by activations,
so it is estimated per (row x layer) from the model's sizes and the batch is sized to fit.
The estimates are deliberately conservative; ``tests/test_memory.py`` measures the real peak.
"""

from __future__ import annotations

import os
import warnings

import torch

from heta_fast.attention import ATTENTION_NAME
from heta_fast.model import CausalLM
from heta_fast.semantic_flow import BLOCK_BYTES

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


class MemoryBudgetWarning(UserWarning):
    """A unit of work that cannot be split further is estimated above ``memory_budget`` (shown by default)."""


def warn_if_over(budget: int, needed: int, what: str) -> None:
    """One warning when even the smallest unit of work is estimated above the budget."""
    if needed > budget:
        warnings.warn(f"memory_budget {budget / 2**20:.1f} MiB is below the estimated "
                      f"{needed / 2**20:.1f} MiB that {what} needs; running it anyway", MemoryBudgetWarning,
                      stacklevel=3)


def upcast_bytes(lm: CausalLM) -> int:
    """Bytes of the float32 copies ``CausalLM.prepared`` makes of a bf16/fp16 model's weights (0 otherwise)."""
    model = lm.model
    return 4 * sum(p.numel() for p in model.parameters() if p.dtype in (torch.float16, torch.bfloat16))


def forward_bytes(lm: CausalLM, rows: int) -> int:
    """Estimated bytes of the shared forward over ``rows`` rows, which cannot be split into batches.

    It keeps the key/value cache and the captured value vectors (``3 N rows H_kv d_h``) and holds
    one layer's activations at a time, its attention scores and probabilities among them. For the
    semantic flow it keeps, where every attention call is recorded
    (``heta_fast.attention.record_attention``), each layer's queries (``N rows H d_h``; the keys and
    values are the cache's), two masks (``rows^2``) and one recomputed block; elsewhere every
    layer's attention probabilities (``N H rows^2``: ~18 GiB for SmolLM2-135M at 4,096 tokens).
    """
    n = lm.num_layers
    kept = 3 * n * rows * lm.num_kv_heads * lm.head_dim
    if lm.attention_implementation == ATTENTION_NAME:
        block = min(BLOCK_BYTES // 4, lm.num_heads * rows * rows)  # one recomputed block of attention rows
        kept += n * rows * lm.num_heads * lm.head_dim + 2 * rows * rows + block
    else:
        kept += n * lm.num_heads * rows * rows
    return 4 * (kept + _row_floats(lm, rows) * rows)


def largest_fitting_rows(lm: CausalLM, budget: int) -> int:
    """The most rows whose shared forward (with the weights' float32 copies) fits ``budget`` (0: not one)."""
    room = budget - upcast_bytes(lm)
    lo, hi = 0, 1
    while forward_bytes(lm, hi) <= room and hi < 1 << 24:
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if forward_bytes(lm, mid) <= room else (lo, mid)
    return lo


def check_fits(lm: CausalLM, rows: int, budget: int) -> None:
    """``ValueError`` before any model work when the shared forward over ``rows`` rows cannot fit ``budget``.

    The message gives the bytes needed and available and the longest window that fits.
    """
    copies = upcast_bytes(lm)
    needed = forward_bytes(lm, rows) + copies
    if needed <= budget:
        return
    fits = largest_fitting_rows(lm, budget) - 1  # a window of W context tokens runs W + 1 rows
    hint = (f"pass window_size <= {fits} to attribute it in windows" if fits >= 1 else
            "not even a one-token window fits")
    maps = ("one layer's attention maps" if lm.attention_implementation == ATTENTION_NAME else
            f"the attention maps of {lm.num_layers} layers")
    raise ValueError(f"{rows} tokens need about {needed / 2**20:,.0f} MiB for the shared forward ({maps} "
                     f"x {lm.num_heads} heads x {rows}^2 in float32, the key/value cache"
                     + (", float32 copies of the weights" if copies else "")
                     + f"), above memory_budget {budget / 2**20:,.0f} MiB ({available_bytes(lm.device) / 2**20:,.0f} "
                     f"MiB free on {lm.device.type}); {hint}, or raise memory_budget")
