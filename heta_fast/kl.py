"""KL information impact ``I`` (docs/method.md §3), fast path.

``I_i = KL(P || Q_i)`` where ``Q_i`` is the next-token distribution at the prediction row ``p``
with context row ``i`` replaced by the mask. A causal model's rows before ``i`` do not change
when row ``i`` is masked, so each masked variant runs only rows ``i .. p`` on top of the
prefix's cached keys and values, variants are batched, and the logits are made at row ``p``
only and reduced over vocabulary chunks (``linear_kl``) so no ``B x V`` buffer is needed.
"""

from __future__ import annotations

import torch

from heta_fast.config import MASKS
from heta_fast.memory import batch_size, sequence_bytes, warn_if_over
from heta_fast.rng import unk_vectors


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


def kl_information(lm, E: torch.Tensor, log_P: torch.Tensor, key_values, config, budget: int,
                   linear_kl_fn=linear_kl, progress=None) -> torch.Tensor:
    """``I``: ``[n]``. E: ``[t + 1, d]``; log_P: ``[V]`` at row ``p``; key_values: the prefix cache.

    Variants are batched by context position; a batch ``[a, b)`` runs rows ``a .. p`` on the
    cached keys/values of rows ``< a`` and unembeds row ``p`` only.
    """
    t = E.shape[0] - 1
    I = torch.zeros(t, dtype=torch.float32, device=E.device)
    weight, bias = lm.lm_head.weight, lm.lm_head.bias
    vocab_chunk = max(1024, budget // (4 * 8 * 64))  # 64 rows of float64 logits per chunk at most
    warn_if_over(budget, sequence_bytes(lm, t, t, 1), "one masked forward")
    a = 0
    with torch.no_grad():
        while a < t:
            c = batch_size(lm, budget, t - a, t, copies=1, limit=variants_per_batch(t - a, t))
            b = min(t, a + c)
            positions = torch.arange(a, b, device=E.device)
            batch = masked_batch(E, a, b, mask_rows(config.mask, E, positions, config.seed))
            past = lm.prefix_cache(key_values, a, b - a)
            hidden = lm.hidden(batch, past=past).last_hidden_state[:, -1]
            I[a:b] = linear_kl_fn(hidden, weight, bias, log_P, vocab_chunk=vocab_chunk)
            if progress is not None:
                progress("kl", b, t)
            a = b
    return I
