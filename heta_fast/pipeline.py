"""The fast path, top to bottom: one forward -> ``M`` -> ``S`` -> ``I``, for ``K >= 1`` targets of one text.

Every target ``t_k`` reads a prefix of the same token sequence, and a causal model's rows do not
depend on later rows. With ``T = max t_k`` and prediction rows ``p_k = t_k - 1``:

1. one forward over rows ``0 .. T - 1`` gives every target's attention probabilities and value
   vectors, its ``log P_k`` (the logits at its row ``p_k``), and a key/value cache of the prefix
   that every later pass reuses (rows before ``i`` do not change when row ``i`` does); the target
   rows themselves never reach a prediction row, so they are not run;
2. ``M`` (``semantic_flow.semantic_flows``): all prediction rows are carried down the layers together;
3. ``S`` (``sensitivity``: exact or an estimator, by ``config.hessian``): per target, on its rows
   ``0 .. t_k``, its ``y_k`` and the cache cut to ``t_k`` rows (each target's Hessian is of its own
   ``log P_k[y_k]``);
4. ``I`` (``influence``: exact or an estimator, by ``config.information``): on the exact path,
   masking row ``i`` and running rows ``i .. T - 1`` once gives the masked hidden state at every
   prediction row ``p_k >= i``, so one set of masked forwards serves every target (masks ``zero``
   and ``unk``; the ``mean`` mask averages a target's own rows, so each target runs its own); the
   estimators run per target and read the Jacobian that Gauss-Newton ``S`` reads (one
   ``LogitJacobian`` per target, computed at most once).

One target is the ``K = 1`` case; its numbers are the reference's up to floating-point order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from heta_fast import kl
from heta_fast.allocator import retained_heap
from heta_fast.attention import ATTENTION_NAME, record_attention
from heta_fast.checks import is_int
from heta_fast.components import Components, Progress, timed
from heta_fast.config import HETAConfig
from heta_fast.influence import estimate_information, masked_kl
from heta_fast.memory import default_budget
from heta_fast.model import CausalLM
from heta_fast.rng import rademacher
from heta_fast.semantic_flow import semantic_flows
from heta_fast.sensitivity import LogitJacobian, block_l1_mean, estimate_sensitivity


@dataclass(frozen=True)
class Ops:
    """The hot reductions, swappable for fused kernels (see ``heta_fast.kernels``)."""

    linear_kl: object = kl.linear_kl  # (hidden [B,d], weight [V,d], bias, log_p [V]) -> [B]
    block_l1_mean: object = block_l1_mean  # (hvp [B,d], positions [B], n, m) -> [n]
    rademacher: object = rademacher  # (seed, positions [B], samples [B], d, dtype, device) -> [B,d]


TORCH_OPS = Ops()


def check_targets(targets, length: int) -> list[int]:
    """Validated target positions (order kept) for a text of ``length`` tokens.

    Each must be an int in ``[1, length - 1]`` (position 0 has no context), none twice, at least one.
    """
    if isinstance(targets, (str, bytes)) or isinstance(targets, int):
        raise TypeError(f"targets must be a sequence of positions, got {type(targets).__name__}")
    if isinstance(targets, torch.Tensor):
        if targets.dtype.is_floating_point or targets.is_complex() or targets.dim() > 1:
            raise TypeError(f"targets must be a 1-D integer tensor, got shape {tuple(targets.shape)} and dtype "
                            f"{targets.dtype}")
        targets = targets.reshape(-1).tolist()
    try:
        targets = list(targets)
    except TypeError:
        raise TypeError(f"targets must be a sequence of positions, got {type(targets).__name__}") from None
    if not targets:
        raise ValueError("targets is empty: give at least one target position")
    for t in targets:
        if not is_int(t):
            raise TypeError(f"target positions must be ints, got {t!r} ({type(t).__name__})")
    if length < 2:
        raise ValueError(f"need at least 2 tokens (a context and a target), got {length}")
    for t in targets:
        if not 1 <= t <= length - 1:
            raise ValueError(f"target position {t} is out of range: it must lie in [1, {length - 1}] for {length} "
                             "tokens (position 0 has no context)")
    seen = set()
    for t in targets:
        if t in seen:
            raise ValueError(f"target position {t} is given twice; each target may appear once")
        seen.add(t)
    return targets


def run(lm: CausalLM, ids: torch.Tensor, targets: Sequence[int], config: HETAConfig,
        progress: Progress | None = None, ops: Ops = TORCH_OPS,
        sensitivity: bool = True) -> tuple[list[Components], dict]:
    """``M, S, I`` of every target of one text: one ``Components`` per target and the call's timings.

    ids: ``[L]`` token ids (``L > max(targets)``; rows after the last target are not used);
    targets: distinct positions in ``[1, L - 1]`` (validated by the caller, ``check_targets``);
    target ``k`` is the token ``ids[targets[k]]`` and its ``Components`` are ``[targets[k]]`` long.
    A row's ``timings`` hold that target's own work (all of the call's when it is the only one).
    sensitivity False skips ``S`` (zeros), for timing the shared parts alone.
    """
    with lm.prepared(), retained_heap(config.retain_heap, lm.device):
        parts, timings = _run(lm, ids, list(targets), config, progress, ops, sensitivity)
    if len(parts) == 1:
        parts[0].timings = dict(timings)
    return parts, timings


def components(lm: CausalLM, ids: torch.Tensor, config: HETAConfig, progress: Progress | None = None,
               ops: Ops = TORCH_OPS) -> Components:
    """``M, S, I`` for ids ``[t + 1]`` (context, then the target token): ``run`` with ``K = 1``."""
    parts, _ = run(lm, ids, [ids.numel() - 1], config, progress, ops)
    return parts[0]


def _cut(key_values, length: int):
    """The prefix cache restricted to its first ``length`` positions (views, no copy)."""
    return [(k[:, :, :length], v[:, :, :length]) for k, v in key_values]


def _run(lm: CausalLM, ids: torch.Tensor, targets: list[int], config: HETAConfig, progress: Progress | None,
         ops: Ops, sensitivity: bool) -> tuple[list[Components], dict]:
    T = max(targets)
    E = lm.embed(ids[:T + 1])  # [T + 1, d]
    budget = config.memory_budget or default_budget(lm.device)
    timings: dict = {}
    rows = [t - 1 for t in targets]
    # Where every attention call passes through heta_fast.attention, the forward keeps each call's
    # inputs and M recomputes the attention a block of rows at a time (memory linear in T beyond one
    # block); otherwise the forward returns every layer's maps.
    streamed = lm.attention_implementation == ATTENTION_NAME
    with (timed(timings, "forward"), torch.no_grad(), lm.capture_values(config.value_source) as values,
          record_attention() as calls):
        out = lm.hidden(E[None, :T], output_attentions=not streamed, use_cache=True)
        hidden = out.last_hidden_state[0, rows]  # [K, d]
        log_P = torch.log_softmax(lm.unembed(hidden).double(), dim=-1)  # [K, V]
        key_values = lm.key_values(out)
    with timed(timings, "semantic_flow"), torch.no_grad():
        if streamed and len(calls) != lm.num_layers:
            raise RuntimeError(f"{len(calls)} attention calls recorded for {lm.num_layers} layers")
        attentions = calls if streamed else out.attentions
        M = [m.cpu() for m in semantic_flows(lm, attentions, values, config.flow_layers, rows, config.flow)]
    del out, values, calls
    if progress is not None:
        progress("semantic_flow", 1, 1)
    own = [{} for _ in targets]  # per-target seconds
    done, total = 0, sum(targets)

    def report(stage: str, finished: int, _of: int) -> None:  # the targets' work as one stage
        progress(stage, done + finished, total)

    inner = report if progress is not None else None
    jacobians = [LogitJacobian(lm, E[:t + 1], int(ids[t]), config, budget) for t in targets]
    S = []
    with timed(timings, "hessian"):
        for k, t in enumerate(targets):
            with timed(own[k], "hessian"):
                if not sensitivity:
                    S.append(torch.zeros(t))
                    continue
                S_k = estimate_sensitivity(lm, E[:t + 1], int(ids[t]), _cut(key_values, t), config, budget, inner,
                                           ops.rademacher, ops.block_l1_mean, jacobians[k])
                S.append(S_k.cpu())
                if config.information == "exact":  # nothing reads the Jacobian after S
                    jacobians[k].release()
            done += t
    with timed(timings, "kl"):
        per_target = config.information != "exact" or (config.mask == "mean" and len(targets) > 1)
        if per_target:  # an estimator, or a replacement that depends on the target
            I, done = [], 0
            for k, t in enumerate(targets):
                with timed(own[k], "kl"):
                    I.append(estimate_information(lm, E[:t + 1], log_P[k], _cut(key_values, t), config, budget,
                                                  jacobians[k], ops.linear_kl, inner).cpu())
                jacobians[k].release()
                done += t
        else:
            I = [i.cpu() for i in masked_kl(lm, E, log_P, hidden, targets, key_values, config, budget,
                                            ops.linear_kl, progress)]
    parts = [Components(M=M[k], S=S[k], I=I[k], timings=own[k]) for k in range(len(targets))]
    return parts, timings
