"""The attention sink: a token put before the context to take the first position's role.

A causal model's first position is an attention sink: heads with nothing to attend to park
their mass there, and the rollout ``M`` follows it. Without a BOS token (SmolLM2's tokenizer
adds none) the first word of the text is the sink; measured on SmolLM2-135M with the curated
protocol it took 69-74% of the default attribution (issue 11). ``sink="bos"`` gives the model
its own sink token, explains the context after it, and reports the sink's share of the score.

    ids, target_pos, added = prepend(ids, target_pos, "bos", sink_token_id(tokenizer, model, vocab_size))
    components, share = strip(components, added, beta, gamma, mix)
"""

from __future__ import annotations

import torch

from heta_fast.checks import is_int
from heta_fast.components import Components, normalise_flow
from heta_fast.mix import mixed


def sink_token_id(tokenizer, model, vocab_size: int) -> int:
    """The token ``sink="bos"`` puts first: the first id in ``[0, vocab_size)`` among the
    tokenizer's BOS, the model config's BOS and (the substitute, for models without a BOS) the
    config's EOS.

    A stock config reused for a small or random model keeps ids its vocabulary lacks
    (``GPT2Config(vocab_size=97)`` keeps ``bos_token_id=50256``), and some models have neither
    token: then ``ValueError`` names the option and the fix, before any model work, rather than
    an ``IndexError`` from the embedding lookup or a silently chosen token.
    """
    config = getattr(model, "config", None)
    candidates = [("config.bos_token_id", getattr(config, "bos_token_id", None)),
                  ("config.eos_token_id", getattr(config, "eos_token_id", None))]
    if tokenizer is not None:
        candidates.insert(0, ("the tokenizer's bos_token_id", getattr(tokenizer, "bos_token_id", None)))
    for _, value in candidates:
        token = value[0] if isinstance(value, (list, tuple)) and value else value
        if is_int(token) and 0 <= token < vocab_size:
            return token
    found = ", ".join(f"{name} is {value!r}" for name, value in candidates)
    raise ValueError(f"sink='bos' needs a BOS (or EOS) token id inside the vocabulary [0, {vocab_size}), and this "
                     f"model has none: {found}; pass sink='none' (no sink token, the method as defined) or give the "
                     "model's config a bos_token_id inside its vocabulary")


def prepend(ids: list[int], target_pos: int, sink: str, token: int | None) -> tuple[list[int], int, bool]:
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
