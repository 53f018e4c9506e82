"""``screened`` I: the linearised ``I`` ranks every token, and the ``R`` it ranks highest are run exactly.

    I_i = exact I_i (one masked forward)          for the R tokens of largest linearised I,
    I_i = s * linearised I_i,  s = sum_R exact / sum_R linearised,   for the others.

``R = config.screened_tokens`` is fixed, so the masked forwards are at most ``R`` whatever the
context's length; where the ranking matters most, at the top, the values are the method's own.
The scale ``s`` puts the rest on the exact values' scale (the expansion's size is not exact
``I``'s), so the normalised mix weighs them as it would weigh exact values. A context of at most
``R`` tokens is run exactly in full and equals ``exact``.

Cost: the Jacobian (shared with Gauss-Newton ``S``) and ``R`` masked forwards, each over the rows
from its token to the prediction row: at most ``R`` forwards of the whole context.
"""

from __future__ import annotations

import torch

from heta_fast.influence.exact import masked_kl
from heta_fast.influence.linearised import linearised_information
from heta_fast.kl import linear_kl
from heta_fast.sensitivity.gauss_newton import LogitJacobian


def screened_information(lm, E: torch.Tensor, log_P: torch.Tensor, key_values, config, budget: int,
                         jacobian: LogitJacobian, linear_kl_fn=linear_kl, progress=None) -> torch.Tensor:
    """``I`` ``[t]`` float32. E: ``[t + 1, d]``; log_P: ``[V]`` at row ``p``; key_values: the prefix cache."""
    t = E.shape[0] - 1
    r = min(config.screened_tokens, t)
    if r == t:  # nothing to screen
        return masked_kl(lm, E, log_P[None], None, [t], key_values, config, budget, linear_kl_fn, progress)[0]
    approx = linearised_information(jacobian, E, config)
    chosen = torch.sort(torch.topk(approx, r).indices).values
    exact = masked_kl(lm, E, log_P[None], None, [t], key_values, config, budget, linear_kl_fn, progress,
                      positions=chosen.tolist())[0]
    denominator = float(approx[chosen].double().sum())
    scale = float(exact[chosen].double().sum()) / denominator if denominator > 0 else 0.0
    out = approx * scale
    out[chosen] = exact[chosen]
    return out
