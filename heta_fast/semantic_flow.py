"""Semantic transition vector ``M`` (HETA_SPEC §1), fast path.

The reference multiplies full ``T x T`` rollout matrices per head. Only the prediction row
``Phi^{(l,h)} = e_p^T A_hat^{(l)} ... A_hat^{(s)}`` is ever read, so the rows are carried from
the top layer down instead: at layer ``j`` every row started above is multiplied by
``A_hat^{(j)}`` and the row ``A_hat^{(j)}[p]`` joins them. All heads go in one batched matmul;
the cost is ``sum_r r H T^2`` multiply-adds instead of ``N H T^3``. Columns and rows after ``p``
are dropped: the attention is causal, so they never reach row ``p``.

Several targets of one text (``semantic_flows``) share the forward and the descent: their
prediction rows are carried down together, ``K`` rows per starting layer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from heta_fast.components import normalise_flow
from heta_fast.model import CausalLM


def flow_layers(lm: CausalLM, layer_subset: int | None) -> range:
    """The layers the rollout runs over: all, or the last ``layer_subset``."""
    first = 0 if layer_subset is None else max(0, lm.num_layers - layer_subset)
    return range(first, lm.num_layers)


def prediction_rows(A: torch.Tensor, rows: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
    """``Phi`` from the selected layers' attention ``A``: ``[Ls, H, P, P]``.

    rows None: the last row ``p = P - 1`` only, returned as ``[Ls, H, P]``. rows: ``K`` row
    indices (prediction rows of several targets), returned as ``[Ls, H, K, P]``.
    ``Phi[l, :, k] = e_{rows[k]}^T A_hat[l] A_hat[l-1] ... A_hat[0]`` with ``A_hat = rownorm(A / 2 + I / 2)``.
    All rows travel down the layers together, so ``K`` rows cost one batched matmul per layer.
    """
    single = rows is None
    size = A.shape[-1]
    index = torch.as_tensor([size - 1] if single else rows, dtype=torch.long, device=A.device)
    eye = torch.eye(size, dtype=A.dtype, device=A.device)
    A_hat = 0.5 * A + 0.5 * eye
    A_hat = A_hat / A_hat.sum(dim=-1, keepdim=True)
    carried = A_hat[-1][:, index, :]  # [H, K, P]: the top layer's own rows
    for layer in range(A.shape[0] - 2, -1, -1):
        carried = torch.cat([carried @ A_hat[layer], A_hat[layer][:, index, :]], dim=1)
    # carried[:, r * K + k] is row k started at layer Ls - 1 - r; put layer order back
    heads, k = carried.shape[0], index.numel()
    phi = carried.view(heads, A.shape[0], k, size).flip(1).transpose(0, 1)  # [Ls, H, K, P]
    return phi[:, :, 0] if single else phi


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


def semantic_flows(lm: CausalLM, attentions: tuple[torch.Tensor, ...], values: list[torch.Tensor],
                   layer_subset: int | None, rows: Sequence[int]) -> list[torch.Tensor]:
    """``M`` of several targets from one forward over rows ``0 .. P - 1``: a list of ``[rows[k] + 1]``.

    Target ``k`` predicts from row ``rows[k]`` (its ``p``), so its context is rows
    ``0 .. rows[k]``. attentions: per layer ``[1, H, P, P]``; values: per layer
    ``[1, P, H_kv, d_h]``. A causal model's attention and values at a row do not depend on later
    rows, so the longest forward serves every target; value norms are computed once.
    """
    layers = flow_layers(lm, layer_subset)
    A = torch.stack([attentions[layer][0] for layer in layers]).float()
    phi = prediction_rows(A, rows)  # [Ls, H, K, P]
    nu = torch.stack([value_norms(lm, values[layer][0].float(), layer) for layer in layers])  # [Ls, H, P]
    m = (phi * nu[:, :, None]).sum(dim=(0, 1))  # [K, P]
    return [normalise_flow(m[k, :row + 1]) for k, row in enumerate(rows)]
