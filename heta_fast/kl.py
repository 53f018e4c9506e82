"""The KL arithmetic of ``I`` (docs/method.md §3): masks, and ``KL(P || Q)`` from log-probabilities or hidden states.

``I_i = KL(P || Q_i)`` where ``Q_i`` is the next-token distribution at the prediction row ``p``
with context row ``i`` replaced by the mask. How many ``Q_i`` are run, and which, is the
estimator's choice (``heta_fast.influence``); this module is what they share: the mask vectors,
and the reductions that make the logits at row ``p`` only and fold them over vocabulary chunks
(``linear_kl``, and its fused kernel) so no ``B x V`` buffer is needed.
"""

from __future__ import annotations

import torch

from heta_fast.config import MASKS
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
