"""``exact`` I: one masked forward per context token (docs/method.md §3), for one or several targets.

A causal model's rows before ``i`` do not change when row ``i`` is masked, so each masked variant
runs only rows ``i .. p`` on top of the prefix's cached keys and values, variants are batched,
and the logits are made at row ``p`` only (``heta_fast.kl``). ``masked_kl`` runs every context
position, or a given subset of them (the screened estimator's exact part).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from heta_fast.kl import kl_at_rows, linear_kl, mask_rows
from heta_fast.memory import batch_size, sequence_bytes, warn_if_over


def masked_batch(E: torch.Tensor, start: int, positions: torch.Tensor, replacement: torch.Tensor) -> torch.Tensor:
    """Rows ``start .. p`` of ``E`` once per position in ``positions`` (each ``>= start``), that row replaced.

    E: ``[t + 1, d]``; positions: int ``[c]``; replacement: ``[c, d]``. Returns ``[c, t - start, d]``;
    variant ``j`` holds ``replacement[j]`` at its row ``positions[j] - start``.
    """
    c = positions.numel()
    batch = E[start:-1].expand(c, -1, -1).clone()
    j = torch.arange(c, device=E.device)
    return batch.index_put((j, positions - start), replacement)


# A batch of variants [a, b) runs rows a .. p for every variant, so variant i also recomputes
# rows a .. i - 1, which masking i does not change: (c - 1) / 2 wasted rows per variant of a
# batch of c. Batches hold about BATCH_ROWS rows, enough for the matmuls to run near peak, and at
# most a quarter of the context. On SmolLM2 this beat a quarter of the context per batch (23%
# waste at n = 128) by 13% at n = 128, 12% at 256 and 9% at 64; capping the waste at 5% as well
# made batches too small at n = 64 (15% slower there).
BATCH_ROWS = 1024


def variants_per_batch(rows: int, context: int) -> int:
    """Masked variants per batch when each runs ``rows`` of ``context`` rows (before the budget's cap)."""
    return max(1, min(-(-context // 4), -(-BATCH_ROWS // rows)))


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


def masked_kl(lm, E: torch.Tensor, log_P: torch.Tensor, reference: torch.Tensor | None, targets: Sequence[int],
              key_values, config, budget: int, linear_kl_fn=linear_kl, progress=None,
              positions: Sequence[int] | None = None) -> list[torch.Tensor]:
    """``I`` of every target from one set of masked forwards: a list of ``[targets[k]]`` float32 tensors.

    positions: the context positions to mask (ascending, distinct; default all ``0 .. T - 1``);
    the entries of other positions stay 0.

    E: ``[T + 1, d]`` (rows ``0 .. T``, ``T = max(targets)``); log_P: ``[K, V]`` float64, row ``k`` the
    unmasked log-probabilities at ``p_k = targets[k] - 1``; reference: ``[K, d]``, the unmasked hidden
    states there (read only when several targets share one unembedding); key_values: the prefix cache
    of rows ``0 .. T - 1``; linear_kl_fn: the per-row reduction (``linear_kl`` or its fused kernel).

    A causal model's rows before ``i`` do not change when row ``i`` is masked, so masked variants are
    batched by position: a batch whose first position is ``a`` runs rows ``a .. T - 1`` on the cached
    rows ``< a`` (every variant must reach the last prediction row), and target ``k`` reads the
    variants of positions ``< t_k`` at its row ``p_k``. With several targets, the torch reduction and logits
    linear in the hidden state, all targets' rows share one unembedding (``shifted_kl``); otherwise
    each target's rows are reduced by ``kl_at_rows``. The replacement vector must not depend on
    the target (masks ``zero`` and ``unk``; ``mean`` averages the rows given, so a caller passes one
    target's rows at a time).
    """
    T = E.shape[0] - 1
    if config.mask == "mean" and len(targets) > 1:
        raise ValueError("the mean mask depends on the target; it cannot share masked forwards")
    I = [torch.zeros(t, dtype=torch.float32, device=E.device) for t in targets]
    weight = lm.lm_head.weight
    shifted = len(targets) > 1 and linear_kl_fn is linear_kl and lm.logit_map.linear
    vocab_chunk = max(1024, budget // (4 * 8 * 64))  # 64 rows of float64 logits per chunk at most
    max_rows = max(1, budget // (24 * weight.shape[0]))  # a [rows, V] float32 product, its float64 copy, a temp
    warn_if_over(budget, sequence_bytes(lm, T, T, 1), "one masked forward")
    order = torch.arange(T) if positions is None else torch.as_tensor(list(positions), dtype=torch.long)
    start = 0
    with torch.no_grad():
        while start < order.numel():
            a = int(order[start])
            c = batch_size(lm, budget, T - a, T, copies=1, limit=variants_per_batch(T - a, T))
            chunk = order[start:start + c].to(E.device)
            batch = masked_batch(E, a, chunk, mask_rows(config.mask, E, chunk, config.seed))
            past = lm.prefix_cache(key_values, a, chunk.numel())
            hidden = lm.hidden(batch, past=past).last_hidden_state  # [c, T - a, d]: rows a .. T - 1
            # target k reads the variants of positions < t_k: a prefix of the ascending chunk
            reads = [(k, int((chunk < t).sum())) for k, t in enumerate(targets) if t > a]
            if shifted:
                shift = torch.cat([hidden[:count, targets[k] - 1 - a] - reference[k] for k, count in reads])
                shift = shift * lm.logit_map.scale if lm.logit_map.scale != 1.0 else shift
                owner = torch.cat([torch.full((count,), k, device=E.device) for k, count in reads])
                values = shifted_kl(shift, weight, log_P, owner, max_rows).split([count for _, count in reads])
                for (k, count), value in zip(reads, values, strict=True):
                    I[k][chunk[:count]] = value
            else:
                for k, count in reads:
                    I[k][chunk[:count]] = kl_at_rows(lm, hidden[:count, targets[k] - 1 - a], log_P[k],
                                                     linear_kl_fn, vocab_chunk)
            del hidden, batch, past
            start += chunk.numel()
            if progress is not None:
                progress("kl", start, order.numel())
    return I


def kl_information(lm, E: torch.Tensor, log_P: torch.Tensor, key_values, config, budget: int,
                   linear_kl_fn=linear_kl, progress=None) -> torch.Tensor:
    """``I``: ``[n]`` for one target. E: ``[t + 1, d]``; log_P: ``[V]`` at row ``p``; key_values: the prefix cache.

    ``masked_kl`` with ``K = 1``.
    """
    t = E.shape[0] - 1
    return masked_kl(lm, E, log_P[None], None, [t], key_values, config, budget, linear_kl_fn, progress)[0]
