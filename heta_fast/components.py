"""The three per-token signals and how HETA combines them (docs/method.md §4, §5)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: called as work on a component advances."""


@dataclass
class Components:
    """``M``, ``S``, ``I``: each ``[n]`` float32 on the CPU, one entry per context position."""

    M: torch.Tensor
    S: torch.Tensor
    I: torch.Tensor  # noqa: E741 - the name in docs/method.md
    timings: dict = field(default_factory=dict)  # seconds per component


def normalise_flow(m: torch.Tensor) -> torch.Tensor:
    """Clamp at 0 and put on the simplex; uniform ``1/n`` when nothing is left. ``[n] -> [n]``."""
    m = m.clamp_min(0.0)
    total = m.sum()
    if total > 0:
        return m / total
    return torch.full_like(m, 1.0 / m.numel())


def combine(c: Components, beta: float, gamma: float) -> torch.Tensor:
    """``Attr_i = M_i (beta S_i + gamma I_i)``: ``[n]``."""
    return c.M * (beta * c.S + gamma * c.I)


def window_spans(n: int, window_size: int | None, overlap: float) -> list[tuple[int, int]]:
    """The windows ``[a, b)`` over ``n`` context positions (one ``[0, n)`` when none apply).

    Stride ``max(1, floor(W (1 - overlap)))`` from 0; every window has length ``W`` and the last
    one ends at ``n``.
    """
    if not window_size or n <= window_size:
        return [(0, n)]
    stride = max(1, int(window_size * (1.0 - overlap)))
    spans = []
    a = 0
    while a + window_size < n:
        spans.append((a, a + window_size))
        a += stride
    spans.append((n - window_size, n))
    return spans


def windowed(compute: Callable[[torch.Tensor], Components], context: torch.Tensor, target: int,
             window_size: int | None, overlap: float) -> Components:
    """Run ``compute`` on each window's ids (``x_a .. x_{b-1}, y``) and average per token.

    context: ids ``[n]``; ``compute`` takes ids ``[w + 1]`` and returns components of length ``w``.
    ``M`` is renormalised to sum 1 after averaging.
    """
    n = context.numel()
    spans = window_spans(n, window_size, overlap)
    y = torch.tensor([target], dtype=context.dtype)
    if len(spans) == 1:
        return compute(torch.cat([context, y]))
    total = Components(*(torch.zeros(n) for _ in range(3)))
    count = torch.zeros(n)
    for a, b in spans:
        part = compute(torch.cat([context[a:b], y]))
        for name in ("M", "S", "I"):
            getattr(total, name)[a:b] += getattr(part, name)
        for name, seconds in part.timings.items():
            total.timings[name] = total.timings.get(name, 0.0) + seconds
        count[a:b] += 1
    M, S, I = (getattr(total, name) / count for name in ("M", "S", "I"))
    return Components(M=M / M.sum(), S=S, I=I, timings=total.timings)


@contextlib.contextmanager
def timed(timings: dict, name: str) -> Iterator[None]:
    """Add the wall-clock seconds of the block to ``timings[name]``."""
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
