"""The ``torch`` backend: the numbers of docs/method.md with only the work they need.

One forward over rows ``0 .. p`` serves all three components: its attention probabilities and
value vectors give ``M``, its last row gives ``P``, and its keys/values are the cached prefix
that every masked variant (``I``) and every HVP (``S``) reuses, because a causal model's rows
before position ``i`` do not depend on row ``i``. Row ``t`` (the target's own embedding) never
reaches the logits at ``p``, so it is not run at all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from heta_fast import kl
from heta_fast.allocator import retained_heap
from heta_fast.components import Components, Progress, timed
from heta_fast.config import HETAConfig
from heta_fast.memory import default_budget
from heta_fast.model import CausalLM
from heta_fast.rng import rademacher
from heta_fast.semantic_flow import semantic_flow
from heta_fast.sensitivity import estimate_sensitivity as estimate
from heta_fast.sensitivity import exact as hessian


def estimate_sensitivity(lm: CausalLM, E: torch.Tensor, y: int, key_values, config: HETAConfig, budget: int,
                         progress: Progress | None = None) -> torch.Tensor:
    """``S`` ``[n]`` from an approximate curvature model (``config.hessian`` other than ``exact``).

    Dispatches to ``heta_fast.sensitivity`` (formulas and costs: docs/estimators.md).
    """
    return estimate(lm, E, y, key_values, config, budget, progress)


@dataclass(frozen=True)
class Ops:
    """The hot reductions, swappable for fused kernels (see ``heta_fast.kernels``)."""

    linear_kl: object = kl.linear_kl  # (hidden [B,d], weight [V,d], bias, log_p [V]) -> [B]
    block_l1_mean: object = hessian.block_l1_mean  # (hvp [B,d], positions [B], n, m) -> [n]
    rademacher: object = rademacher  # (seed, positions [B], samples [B], d, dtype, device) -> [B,d]


TORCH_OPS = Ops()


def components(lm: CausalLM, ids: torch.Tensor, config: HETAConfig, progress: Progress | None = None,
               ops: Ops = TORCH_OPS) -> Components:
    """``M, S, I`` for ids ``[t + 1]`` (context then target token)."""
    with retained_heap(config.retain_heap, lm.device):
        return _components(lm, ids, config, progress, ops)


def _components(lm: CausalLM, ids: torch.Tensor, config: HETAConfig, progress: Progress | None,
                ops: Ops) -> Components:
    E = lm.embed(ids)  # [t + 1, d]
    y = int(ids[-1])
    t = E.shape[0] - 1
    budget = config.memory_budget or default_budget(lm.device)
    timings: dict = {}
    with timed(timings, "forward"), torch.no_grad(), lm.capture_values(config.value_source) as values:
        out = lm.hidden(E[None, :t], output_attentions=True, use_cache=True)
        log_P = torch.log_softmax(lm.unembed(out.last_hidden_state[0, -1]).double(), dim=-1)
        key_values = lm.key_values(out)
    with timed(timings, "semantic_flow"), torch.no_grad():
        M = semantic_flow(lm, out.attentions, values, config.layer_subset).cpu()
    del out, values
    if progress is not None:
        progress("semantic_flow", 1, 1)
    with timed(timings, "hessian"):
        if config.hessian == "exact":
            S = hessian.hessian_sensitivity(lm, E, y, key_values, config, budget, ops.rademacher, ops.block_l1_mean,
                                            progress)
        else:
            S = estimate_sensitivity(lm, E, y, key_values, config, budget, progress)
        S = S.cpu()
    with timed(timings, "kl"):
        I = kl.kl_information(lm, E, log_P, key_values, config, budget, ops.linear_kl, progress).cpu()
    return Components(M=M, S=S, I=I, timings=timings)
