"""How ``S`` and ``I`` are weighed against each other before the gate ``M``.

``raw`` is docs/method.md §4: ``Attr_i = M_i (beta S_i + gamma I_i)``. On SmolLM2-135M ``S`` is
10^3-10^4 times ``I`` (context sums 3.6e4 / 1.5e5 against 15 / 18 on two curated examples,
issue 11), so with beta = gamma = 0.5 the ranking is that of ``S`` alone. ``normalised``
scales each to sum 1 over the context first:

    Attr_i = M_i (beta S_i / sum_j S_j + gamma I_i / sum_j I_j)

(a term whose sum is 0 stays 0), so beta and gamma weigh the two signals as written.
"""

from __future__ import annotations

import torch

from heta_fast.components import Components, combine


def unit_sum(x: torch.Tensor) -> torch.Tensor:
    """``x / sum x`` (``[n] -> [n]``); all zeros when the sum is not positive."""
    total = x.sum()
    return x / total if total > 0 else torch.zeros_like(x)


def mixed(c: Components, beta: float, gamma: float, mix: str) -> torch.Tensor:
    """The attribution ``[n]`` of components ``c`` under ``mix`` (``raw`` or ``normalised``)."""
    if mix == "raw":
        return combine(c, beta, gamma)
    if mix == "normalised":
        return combine(Components(c.M, unit_sum(c.S), unit_sum(c.I)), beta, gamma)
    raise ValueError(f"unknown mix {mix!r}; expected raw or normalised")


def terms(c: Components, beta: float, gamma: float, mix: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The Hessian and KL summands of ``mixed`` (``[n]`` each; they add up to it):
    ``M beta S`` and ``M gamma I`` under ``raw``; ``S`` and ``I`` scaled to unit sum under ``normalised``."""
    if mix == "raw":
        return c.M * beta * c.S, c.M * gamma * c.I
    if mix == "normalised":
        return c.M * beta * unit_sum(c.S), c.M * gamma * unit_sum(c.I)
    raise ValueError(f"unknown mix {mix!r}; expected raw or normalised")


def formula(beta: float, gamma: float, mix: str) -> str:
    """The score's formula under ``mix``, with the weights written in (for result pages)."""
    if mix == "normalised":
        return f"M × ({beta} × S/ΣS + {gamma} × I/ΣI)"
    return f"M × ({beta} × S + {gamma} × I)"

