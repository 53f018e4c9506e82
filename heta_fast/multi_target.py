"""Several targets of one text at once: the shared fast path (torch and triton backends).

Every target ``t_k`` of a text reads a prefix of the same token sequence, and a causal model's
rows do not depend on later rows. So for targets ``t_1 .. t_K`` with ``T = max t_k`` and
prediction rows ``p_k = t_k - 1``:

- one forward over rows ``0 .. T - 1`` gives every target's attention, value vectors and
  ``log P_k`` (the logits at its row ``p_k``), and a prefix key/value cache valid for all of them;
- the semantic flow carries all prediction rows down the layers together
  (``semantic_flow.semantic_flows``);
- ``I`` (masks ``zero`` and ``unk``, whose replacement vector does not depend on the target):
  masking row ``i`` and running rows ``i .. T - 1`` on the cached prefix once gives the masked
  hidden state at every prediction row ``p_k >= i``, so one masked forward serves every target
  whose context holds ``i``; each target's KL is read at its own row against its own ``log P_k``.
  The ``mean`` mask replaces row ``i`` by the mean of target ``k``'s own rows ``0 .. t_k``, a
  different vector per target, so there each target runs its own masked forwards (on the shared
  prefix cache);
- ``S`` cannot be shared (each target's Hessian is of its own ``log P_k[y_k]``): the same ``S``
  function as the single-target path runs per target on its rows ``0 .. t_k``, its ``y_k`` and the
  shared cache cut to its ``t_k`` rows (an approximate estimator is likewise called per target).

The numbers equal single-target attributions up to floating-point reordering.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from heta_fast import kernels, kl
from heta_fast.allocator import retained_heap
from heta_fast.components import Components, Progress, timed
from heta_fast.config import HETAConfig
from heta_fast.memory import batch_size, default_budget
from heta_fast.model import CausalLM
from heta_fast.semantic_flow import semantic_flows
from heta_fast.sensitivity import exact as hessian
from heta_fast.torch_backend import TORCH_OPS, Ops, estimate_sensitivity


def ops_for(backend_name: str) -> Ops:
    """The reductions a backend uses: fused Triton kernels for ``triton``, plain torch otherwise.

    Mirrors ``backends._triton``, which keeps its ``Ops`` inside a closure.
    """
    if backend_name != "triton":
        return TORCH_OPS
    return Ops(linear_kl=kernels.fused_linear_kl, block_l1_mean=kernels.hvp_block_l1_mean,
               rademacher=kernels.rademacher_triton)


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
        if isinstance(t, bool) or not isinstance(t, int):
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


def _cut(key_values, length: int):
    """The prefix cache restricted to its first ``length`` positions (views, no copy)."""
    return [(k[:, :, :length], v[:, :, :length]) for k, v in key_values]


def shifted_kl(shift: torch.Tensor, weight: torch.Tensor, log_p: torch.Tensor, owner: torch.Tensor,
               max_rows: int) -> torch.Tensor:
    """``KL(P_k || Q_b)`` where ``Q_b`` moves ``P_k``'s hidden state by ``shift_b``: ``[B]`` float32.

    shift: ``[B, d]``, row ``b`` the masked minus the unmasked hidden state at its target's
    prediction row; weight: ``[V, d]`` (the unembedding); log_p: ``[K, V]`` float64, the unmasked
    log-probabilities; owner: ``[B]`` int, the target ``k`` of each row (rows of one target
    contiguous); max_rows: rows per ``[rows, V]`` block (memory bound).

    With ``delta = shift W^T`` (the logit change; a bias cancels) and ``log P = log_softmax(z)``,
    ``KL(P || softmax(z + delta)) = logsumexp(log P + delta) - sum_v P_v delta_v``. Rows of all
    targets share one unembedding matmul, and the two terms are of the size of ``delta``, not of
    the logits, so float64 on ``delta`` keeps small KLs exact without the logits' cancellation.
    """
    out = torch.empty(shift.shape[0], dtype=torch.float32, device=shift.device)
    p = log_p.exp()
    for start in range(0, shift.shape[0], max_rows):
        stop = min(shift.shape[0], start + max_rows)
        delta = (shift[start:stop] @ weight.T).double()  # [r, V]
        mean = torch.empty(stop - start, dtype=torch.float64, device=shift.device)
        ks, counts = owner[start:stop].unique_consecutive(return_counts=True)
        a = 0
        for k, count in zip(ks.tolist(), counts.tolist(), strict=True):  # one slice per target
            mean[a:a + count] = delta[a:a + count] @ p[k]
            delta[a:a + count] += log_p[k]
            a += count
        out[start:stop] = (torch.logsumexp(delta, dim=-1) - mean).clamp_min(0.0).float()
    return out


def shared_kl(lm: CausalLM, E: torch.Tensor, log_P: torch.Tensor, reference: torch.Tensor, targets: Sequence[int],
              key_values, config: HETAConfig, budget: int, linear_kl_fn=None,
              progress: Progress | None = None) -> list[torch.Tensor]:
    """``I`` of every target from one set of masked forwards (masks ``zero`` and ``unk``).

    E: ``[T + 1, d]`` (rows ``0 .. T``, ``T = max(targets)``); log_P: ``[K, V]`` float64, row ``k``
    the unmasked log-probabilities at ``p_k = targets[k] - 1``; reference: ``[K, d]``, the unmasked
    hidden states there; key_values: the prefix cache of rows ``0 .. T - 1``. linear_kl_fn: None
    for ``shifted_kl`` over all targets at once, or a ``kl.linear_kl``-like reduction (the fused
    kernel) called per target. Returns a list of ``[targets[k]]`` float32 tensors.

    Masked positions are batched as in ``kl.kl_information``: a batch ``[a, b)`` runs rows
    ``a .. T - 1`` (every variant must reach the last prediction row, since the longest target's
    context holds every position) on the cached rows ``< a``; target ``k`` reads the variants
    ``[a, min(b, t_k))`` at its row ``p_k``.
    """
    if config.mask == "mean":
        raise ValueError("the mean mask depends on the target; it cannot share masked forwards")
    T = E.shape[0] - 1
    I = [torch.zeros(t, dtype=torch.float32, device=E.device) for t in targets]
    weight, bias = lm.lm_head.weight, lm.lm_head.bias
    vocab_chunk = max(1024, budget // (4 * 8 * 64))  # as kl.kl_information: bounded float64 logit chunks
    max_rows = max(1, budget // (24 * weight.shape[0]))  # a [rows, V] float32 product, its float64 copy, a temp
    a = 0
    with torch.no_grad():
        while a < T:
            c = batch_size(lm, budget, T - a, T, copies=1, limit=kl.variants_per_batch(T - a, T))
            b = min(T, a + c)
            positions = torch.arange(a, b, device=E.device)
            batch = kl.masked_batch(E, a, b, kl.mask_rows(config.mask, E, positions, config.seed))
            past = lm.prefix_cache(key_values, a, b - a)
            hidden = lm.hidden(batch, past=past).last_hidden_state  # [b - a, T - a, d]: rows a .. T - 1
            reads = [(k, min(b, t)) for k, t in enumerate(targets) if t > a]  # targets whose context meets [a, b)
            if linear_kl_fn is None:
                shift = torch.cat([hidden[:stop - a, targets[k] - 1 - a] - reference[k] for k, stop in reads])
                owner = torch.cat([torch.full((stop - a,), k, device=E.device) for k, stop in reads])
                values = shifted_kl(shift, weight, log_P, owner, max_rows).split([stop - a for _, stop in reads])
                for (k, stop), value in zip(reads, values, strict=True):
                    I[k][a:stop] = value
            else:
                for k, stop in reads:
                    I[k][a:stop] = linear_kl_fn(hidden[:stop - a, targets[k] - 1 - a], weight, bias, log_P[k],
                                                vocab_chunk=vocab_chunk)
            del hidden, batch, past
            if progress is not None:
                progress("kl", b, T)
            a = b
    return I


def components_many(lm: CausalLM, ids: torch.Tensor, targets: Sequence[int], config: HETAConfig,
                    progress: Progress | None = None, ops: Ops = TORCH_OPS,
                    sensitivity: bool = True) -> tuple[list[Components], dict]:
    """``M, S, I`` of every target of one text, sharing the work the method allows.

    ids: ``[L]`` token ids (``L > max(targets)``; rows after the last target are not used);
    targets: distinct positions in ``[1, L - 1]`` (validated by the caller), target ``k`` is the
    token ``ids[targets[k]]``. Returns one ``Components`` per target (``[targets[k]]`` each, in the
    order given; their ``timings`` hold that target's own work) and the timings of the whole call.
    sensitivity False skips ``S`` (zeros) - for timing the shared parts alone.
    """
    with retained_heap(config.retain_heap, lm.device):
        return _components_many(lm, ids, targets, config, progress, ops, sensitivity)


def _components_many(lm: CausalLM, ids: torch.Tensor, targets: Sequence[int], config: HETAConfig,
                     progress: Progress | None, ops: Ops, sensitivity: bool) -> tuple[list[Components], dict]:
    targets = list(targets)
    T = max(targets)
    E = lm.embed(ids[:T + 1])  # [T + 1, d]
    budget = config.memory_budget or default_budget(lm.device)
    timings: dict = {}
    rows = [t - 1 for t in targets]
    with timed(timings, "forward"), torch.no_grad(), lm.capture_values(config.value_source) as values:
        out = lm.hidden(E[None, :T], output_attentions=True, use_cache=True)
        hidden = out.last_hidden_state[0, rows]  # [K, d]
        log_P = torch.log_softmax(lm.unembed(hidden).double(), dim=-1)  # [K, V]
        key_values = lm.key_values(out)
    with timed(timings, "semantic_flow"), torch.no_grad():
        M = [m.cpu() for m in semantic_flows(lm, out.attentions, values, config.layer_subset, rows)]
    del out, values
    if progress is not None:
        progress("semantic_flow", 1, 1)
    own = [{} for _ in targets]  # per-target seconds
    S = []
    done, total = 0, sum(targets)

    def report(stage: str, finished: int, _of: int) -> None:  # the targets' S as one stage
        progress(stage, done + finished, total)

    with timed(timings, "hessian"):
        for k, t in enumerate(targets):
            with timed(own[k], "hessian"):
                if not sensitivity:
                    S.append(torch.zeros(t))
                    continue
                E_k, y_k, kv_k = E[:t + 1], int(ids[t]), _cut(key_values, t)
                inner = report if progress is not None else None
                if config.hessian == "exact":
                    S_k = hessian.hessian_sensitivity(lm, E_k, y_k, kv_k, config, budget, ops.rademacher,
                                                      ops.block_l1_mean, inner)
                else:
                    S_k = estimate_sensitivity(lm, E_k, y_k, kv_k, config, budget, inner)
                S.append(S_k.cpu())
            done += t
    with timed(timings, "kl"):
        if config.mask == "mean":  # the replacement depends on the target: no masked forward is shared
            I = []
            done = 0
            for k, t in enumerate(targets):
                with timed(own[k], "kl"):
                    I.append(kl.kl_information(lm, E[:t + 1], log_P[k], _cut(key_values, t), config, budget,
                                               ops.linear_kl, report if progress is not None else None).cpu())
                done += t
        else:
            fused = None if ops.linear_kl is kl.linear_kl else ops.linear_kl  # torch: all targets in one matmul
            I = [i.cpu() for i in shared_kl(lm, E, log_P, hidden, targets, key_values, config, budget, fused,
                                            progress)]
    parts = [Components(M=M[k], S=S[k], I=I[k], timings=own[k]) for k in range(len(targets))]
    return parts, timings
