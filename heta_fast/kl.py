"""KL information impact ``I`` (HETA_SPEC §3), fast path, for one or several targets of one text.

``I_i = KL(P || Q_i)`` where ``Q_i`` is the next-token distribution at the prediction row ``p``
with context row ``i`` replaced by the mask. A causal model's rows before ``i`` do not change
when row ``i`` is masked, so each masked variant runs only rows ``i .. p`` on top of the
prefix's cached keys and values, variants are batched, and the logits are made at row ``p``
only and reduced over vocabulary chunks (``linear_kl``) so no ``B x V`` buffer is needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from heta_fast.config import MASKS
from heta_fast.memory import batch_size, sequence_bytes, warn_if_over
from heta_fast.probes import unk_vectors


def mask_rows(mask: str, embeddings: torch.Tensor, positions: torch.Tensor, seed: int) -> torch.Tensor:
    """The vectors that replace the rows ``positions`` of ``embeddings``.

    embeddings: ``[T, d]`` (all ``t + 1`` rows: the ``mean`` mask averages them);
    positions: int ``[B]``. Returns ``[B, d]`` in the embeddings' dtype.
    """
    b, d = positions.numel(), embeddings.shape[-1]
    if mask == "zero":
        return embeddings.new_zeros(b, d)
    if mask == "mean":
        return embeddings.mean(dim=0, keepdim=True).expand(b, d)
    if mask == "unk":
        return unk_vectors(seed, positions, d, dtype=embeddings.dtype, device=embeddings.device)
    raise ValueError(f"unknown mask {mask!r}; expected one of {MASKS}")


def kl_from_log_probs(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """``sum_v P_v (log P_v - log Q_v)`` clamped at 0. log_p: ``[V]``; log_q: ``[B, V]`` -> ``[B]``."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).clamp_min(0.0)


def linear_kl(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, log_p: torch.Tensor,
              vocab_chunk: int | None = None) -> torch.Tensor:
    """``KL(P || Q_b)`` for every row ``b``, ``Q_b = softmax(hidden_b @ weight.T + bias)``.

    hidden: ``[B, d]``; weight: ``[V, d]`` (the unembedding); bias: ``[V]`` or None;
    log_p: ``[V]``, the unmasked distribution's log-probabilities. Returns ``[B]`` float32,
    clamped at 0.

    Logits are made ``vocab_chunk`` columns at a time (all at once when None) and folded into an
    online log-sum-exp in float64, so extra memory is ``O(B * vocab_chunk)``. It uses
    ``KL_b = sum_v P_v (log P_v - z_bv) + (sum_v P_v) * LSE_b(z)``, which is the log-softmax form
    rearranged; float64 accumulation keeps the cancellation far below fp32 rounding.
    """
    b, v = hidden.shape[0], weight.shape[0]
    chunk = v if vocab_chunk is None else max(1, int(vocab_chunk))
    p64 = log_p.double().exp()
    cross = hidden.new_zeros(b, dtype=torch.float64)  # sum_v P_v (log P_v - z_v)
    run_max = hidden.new_full((b,), -torch.inf, dtype=torch.float64)
    run_sum = hidden.new_zeros(b, dtype=torch.float64)
    for start in range(0, v, chunk):
        stop = min(v, start + chunk)
        z = hidden @ weight[start:stop].T
        if bias is not None:
            z = z + bias[start:stop]
        z = z.double()
        cross += (p64[start:stop] * (log_p[start:stop].double() - z)).sum(dim=-1)
        new_max = torch.maximum(run_max, z.max(dim=-1).values)
        run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(z - new_max[:, None]).sum(dim=-1)
        run_max = new_max
    lse = run_max + torch.log(run_sum)
    return (cross + p64.sum() * lse).clamp_min(0.0).float()


def kl_at_rows(lm, hidden: torch.Tensor, log_p: torch.Tensor, linear_kl_fn=linear_kl,
               vocab_chunk: int | None = None) -> torch.Tensor:
    """``KL(P || Q_b)`` with ``Q_b`` the model's next-token distribution at hidden state ``hidden[b]``: ``[B]``.

    hidden: ``[B, d]`` (after the final norm); log_p: ``[V]``. Where the model's logits are linear in
    the hidden state (``scale * (h W^T + b)``) the scale is folded into ``h`` and ``b`` and
    ``linear_kl_fn`` (``linear_kl`` or its fused kernel) reduces over vocabulary chunks. Soft-capped
    logits (Gemma 2/3) are not linear: those rows are unembedded in full, ``[B, V]`` float64.
    """
    logit_map = lm.logit_map
    if not logit_map.linear:
        return kl_from_log_probs(log_p, torch.log_softmax(lm.unembed(hidden).double(), dim=-1)).float()
    weight, bias = lm.lm_head.weight, lm.lm_head.bias
    if logit_map.scale != 1.0:
        hidden = hidden * logit_map.scale
        bias = None if bias is None else bias * logit_map.scale
    return linear_kl_fn(hidden, weight, bias, log_p, vocab_chunk=vocab_chunk)


def masked_batch(E: torch.Tensor, start: int, stop: int, replacement: torch.Tensor) -> torch.Tensor:
    """Rows ``start .. p`` of ``E`` once per position ``i`` in ``[start, stop)``, row ``i`` replaced.

    E: ``[t + 1, d]``; replacement: ``[stop - start, d]``. Returns ``[stop - start, t - start, d]``;
    variant ``j`` holds ``replacement[j]`` at its row ``j`` (position ``start + j``).
    """
    c = stop - start
    batch = E[start:-1].expand(c, -1, -1).clone()
    j = torch.arange(c, device=E.device)
    return batch.index_put((j, j), replacement)


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
              key_values, config, budget: int, linear_kl_fn=linear_kl, progress=None) -> list[torch.Tensor]:
    """``I`` of every target from one set of masked forwards: a list of ``[targets[k]]`` float32 tensors.

    E: ``[T + 1, d]`` (rows ``0 .. T``, ``T = max(targets)``); log_P: ``[K, V]`` float64, row ``k`` the
    unmasked log-probabilities at ``p_k = targets[k] - 1``; reference: ``[K, d]``, the unmasked hidden
    states there (read only when several targets share one unembedding); key_values: the prefix cache
    of rows ``0 .. T - 1``; linear_kl_fn: the per-row reduction (``linear_kl`` or its fused kernel).

    A causal model's rows before ``i`` do not change when row ``i`` is masked, so masked variants are
    batched by position: a batch ``[a, b)`` runs rows ``a .. T - 1`` on the cached rows ``< a`` (every
    variant must reach the last prediction row), and target ``k`` reads the variants
    ``[a, min(b, t_k))`` at its row ``p_k``. With several targets, the torch reduction and logits
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
    a = 0
    with torch.no_grad():
        while a < T:
            c = batch_size(lm, budget, T - a, T, copies=1, limit=variants_per_batch(T - a, T))
            b = min(T, a + c)
            positions = torch.arange(a, b, device=E.device)
            batch = masked_batch(E, a, b, mask_rows(config.mask, E, positions, config.seed))
            past = lm.prefix_cache(key_values, a, b - a)
            hidden = lm.hidden(batch, past=past).last_hidden_state  # [b - a, T - a, d]: rows a .. T - 1
            reads = [(k, min(b, t)) for k, t in enumerate(targets) if t > a]  # targets whose context meets [a, b)
            if shifted:
                shift = torch.cat([hidden[:stop - a, targets[k] - 1 - a] - reference[k] for k, stop in reads])
                shift = shift * lm.logit_map.scale if lm.logit_map.scale != 1.0 else shift
                owner = torch.cat([torch.full((stop - a,), k, device=E.device) for k, stop in reads])
                values = shifted_kl(shift, weight, log_P, owner, max_rows).split([stop - a for _, stop in reads])
                for (k, stop), value in zip(reads, values, strict=True):
                    I[k][a:stop] = value
            else:
                for k, stop in reads:
                    I[k][a:stop] = kl_at_rows(lm, hidden[:stop - a, targets[k] - 1 - a], log_P[k], linear_kl_fn,
                                              vocab_chunk)
            del hidden, batch, past
            if progress is not None:
                progress("kl", b, T)
            a = b
    return I


def kl_information(lm, E: torch.Tensor, log_P: torch.Tensor, key_values, config, budget: int,
                   linear_kl_fn=linear_kl, progress=None) -> torch.Tensor:
    """``I``: ``[n]`` for one target. E: ``[t + 1, d]``; log_P: ``[V]`` at row ``p``; key_values: the prefix cache.

    ``masked_kl`` with ``K = 1``.
    """
    t = E.shape[0] - 1
    return masked_kl(lm, E, log_P[None], None, [t], key_values, config, budget, linear_kl_fn, progress)[0]
