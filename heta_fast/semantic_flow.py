"""Semantic transition vector ``M`` (HETA_SPEC §1), fast path.

The reference multiplies full ``T x T`` rollout matrices per head. Only the prediction row
``Phi^{(l,h)} = e_p^T A_hat^{(l)} ... A_hat^{(s)}`` is ever read, so the rows are carried from
the top layer down instead: at layer ``j`` every row started above is multiplied by
``A_hat^{(j)}`` and the row ``A_hat^{(j)}[p]`` joins them. All heads go in one batched matmul;
the cost is ``sum_r r H T^2`` multiply-adds instead of ``N H T^3``. Columns and rows after ``p``
are dropped: the attention is causal, so they never reach row ``p``.
"""

from __future__ import annotations

import torch

from heta_fast.components import normalise_flow
from heta_fast.model import CausalLM


def flow_layers(lm: CausalLM, layer_subset: int | None) -> range:
    """The layers the rollout runs over: all, or the last ``layer_subset``."""
    first = 0 if layer_subset is None else max(0, lm.num_layers - layer_subset)
    return range(first, lm.num_layers)


def prediction_rows(A: torch.Tensor) -> torch.Tensor:
    """``Phi``: ``[Ls, H, P]`` from the selected layers' attention ``A``: ``[Ls, H, P, P]`` (``p = P - 1``).

    ``Phi[l] = e_p^T A_hat[l] A_hat[l-1] ... A_hat[0]`` with ``A_hat = rownorm(A / 2 + I / 2)``.
    """
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    A_hat = 0.5 * A + 0.5 * eye
    A_hat = A_hat / A_hat.sum(dim=-1, keepdim=True)
    rows = A_hat[-1, :, -1:, :]  # [H, 1, P]: the top layer's own row
    for layer in range(A.shape[0] - 2, -1, -1):
        rows = torch.cat([rows @ A_hat[layer], A_hat[layer, :, -1:, :]], dim=1)
    # rows[:, r] started at layer Ls - 1 - r; put layer order back
    return rows.flip(1).transpose(0, 1)


def value_norms(lm: CausalLM, values: torch.Tensor, layer: int) -> torch.Tensor:
    """``nu[h, j] = ||v_j^{(h)} W_O^{(h)}||_1``: values ``[P, H_kv, d_h]`` -> ``[H, P]``.

    With grouped-query attention head ``h`` reads key/value head ``h // (H / H_kv)``.
    """
    group = lm.num_heads // lm.num_kv_heads
    v = values.repeat_interleave(group, dim=1).transpose(0, 1)  # [H, P, d_h]
    return torch.bmm(v, lm.layers[layer].out_heads.to(v.dtype)).abs().sum(dim=-1)


def semantic_flow(lm: CausalLM, attentions: tuple[torch.Tensor, ...], values: list[torch.Tensor],
                  layer_subset: int | None) -> torch.Tensor:
    """``M``: ``[n]`` from one forward over rows ``0 .. p`` (``n = p + 1``).

    attentions: per layer ``[1, H, n, n]``; values: per layer ``[1, n, H_kv, d_h]``.
    """
    layers = flow_layers(lm, layer_subset)
    A = torch.stack([attentions[layer][0] for layer in layers]).float()
    phi = prediction_rows(A)  # [Ls, H, n]
    nu = torch.stack([value_norms(lm, values[layer][0].float(), layer) for layer in layers])
    return normalise_flow((phi * nu).sum(dim=(0, 1)))
