"""The attention sink: a token put before the context to take the first position's role.

A causal model's first position is an attention sink: heads with nothing to attend to park
their mass there, and the rollout ``M`` follows it. Without a BOS token (SmolLM2's tokenizer
adds none) the first word of the text is the sink; measured on SmolLM2-135M with the curated
protocol it took 69-74% of the default attribution (issue 11). ``sink="bos"`` gives the model
its own sink token, explains the context after it, and reports the sink's share of the score.

    ids, target_pos, added = prepend(ids, target_pos, "bos", sink_token_id(tokenizer, model))
    components, share = strip(components, added, beta, gamma, mix)
"""

from __future__ import annotations

import torch

from heta_fast.components import Components, normalise_flow
from heta_fast.mix import mixed


def sink_token_id(tokenizer, model) -> int:
    """The sink token: the tokenizer's BOS, else the model config's BOS, else its EOS, else id 0."""
    for owner in (tokenizer, getattr(model, "config", None)):
        bos = getattr(owner, "bos_token_id", None) if owner is not None else None
        if isinstance(bos, int):
            return bos
    eos = getattr(getattr(model, "config", None), "eos_token_id", None)
    if isinstance(eos, (list, tuple)) and eos:
        eos = eos[0]
    return eos if isinstance(eos, int) else 0


def prepend(ids: list[int], target_pos: int, sink: str, token: int) -> tuple[list[int], int, bool]:
    """``(ids, target_pos, added)``: the sink token put first when ``sink == "bos"`` and absent.

    Input that already starts with the sink token (a tokenizer that adds BOS itself) is left
    as it is and nothing is stripped later (``added`` False).
    """
    if sink == "none" or (ids and ids[0] == token):
        return ids, target_pos, False
    return [token, *ids], target_pos + 1, True


def strip(c: Components, added: bool, beta: float, gamma: float, mix: str) -> tuple[Components, float | None]:
    """Drop the sink's row from ``M``, ``S``, ``I`` (``[n + 1] -> [n]``) and renormalise ``M``.

    Returns the components and the sink's share of the combined score before it was dropped,
    ``a_0 / sum_i a_i`` (None when no sink was added).
    """
    if not added:
        return c, None
    scores = mixed(c, beta, gamma, mix)
    total = float(scores.sum())
    share = float(scores[0]) / total if total > 0 else 0.0
    rest = Components(M=normalise_flow(c.M[1:].clone()), S=c.S[1:].clone(), I=c.I[1:].clone(), timings=c.timings)
    return rest, share


def first_share(scores: torch.Tensor) -> float:
    """``a_0 / sum_i a_i`` for a ``[n]`` score vector (0 when the sum is not positive)."""
    total = float(scores.sum())
    return float(scores[0]) / total if total > 0 else 0.0
