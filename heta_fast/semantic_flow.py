"""Semantic transition vector ``M`` (docs/method.md §1), fast path.

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

from collections.abc import Callable, Iterator, Sequence

import torch

from heta_fast.attention import AttentionCall
from heta_fast.components import normalise_flow
from heta_fast.model import CausalLM


def rollout_layers(lm: CausalLM, flow_layers: int | None) -> range:
    """The layers the rollout runs over: all, or the last ``flow_layers``."""
    first = 0 if flow_layers is None else max(0, lm.num_layers - flow_layers)
    return range(first, lm.num_layers)


Blocks = Callable[[int], Iterator[tuple[int, torch.Tensor]]]
"""``blocks(layer)`` -> ``(start, A[:, start:start + b, :])`` pairs covering that layer's ``[H, P, P]`` attention."""

BLOCK_BYTES = 64 << 20  # one recomputed block of attention rows, float32


def stored_blocks(A: Sequence[torch.Tensor] | torch.Tensor) -> Blocks:
    """``Blocks`` of attention kept whole, ``Ls`` tensors ``[H, P, P]``: one block per layer."""
    return lambda layer: iter([(0, A[layer])])


def recomputed_blocks(calls: Sequence[AttentionCall]) -> Blocks:
    """``Blocks`` recomputed from recorded attention calls (``heta_fast.attention.record_attention``),
    ``BLOCK_BYTES`` of rows at a time: memory for one block, not for ``Ls`` layers of ``[H, P, P]``."""
    def blocks(layer: int) -> Iterator[tuple[int, torch.Tensor]]:
        call = calls[layer]
        heads, size = call.query.shape[1], call.key.shape[2]
        step = max(1, BLOCK_BYTES // (4 * heads * size))
        for start in range(0, call.query.shape[2], step):
            yield start, call.rows(start, min(call.query.shape[2], start + step))[0]
    return blocks


def prediction_rows(A: Sequence[torch.Tensor] | torch.Tensor,
                    rows: Sequence[int] | torch.Tensor | None = None) -> torch.Tensor:
    """``Phi`` from the selected layers' attention ``A``: ``Ls`` tensors ``[H, P, P]`` (or one ``[Ls, H, P, P]``).

    rows None: the last row ``p = P - 1`` only, returned as ``[Ls, H, P]``. rows: ``K`` row
    indices (prediction rows of several targets), returned as ``[Ls, H, K, P]``. See ``descend``.
    """
    single = rows is None
    size = A[0].shape[-1]
    phi = descend(stored_blocks(A), len(A), A[0].shape[0], size, [size - 1] if single else rows, A[0].device)
    return phi[:, :, 0] if single else phi


def descend(blocks: Blocks, n_layers: int, heads: int, size: int, rows: Sequence[int] | torch.Tensor,
            device: torch.device | str | None = None) -> torch.Tensor:
    """``Phi`` ``[Ls, H, K, P]``: ``Phi[l, :, k] = e_{rows[k]}^T A_hat[l] A_hat[l-1] ... A_hat[0]``,
    ``A_hat = rownorm(A / 2 + I / 2)``, from each layer's attention read block by block (``blocks``).

    All rows travel down the layers together, so ``K`` rows cost one batched matmul per layer.
    ``A_hat`` is never built: with ``c = rowsum(A) / 2 + 1 / 2``, ``x A_hat = (x / c) A / 2 + (x / c) / 2``,
    and a block of rows ``[s, e)`` of ``A`` meets only columns ``[s, e)`` of ``x`` and their ``c``, so
    each block is read once (row sums, matmul) and dropped; no ``[H, P, P]`` copy is made.
    """
    index = torch.as_tensor(rows, dtype=torch.long, device=device)
    k = index.numel()
    carried = None  # [H, r * K, P]: rows started at layers above, carried down to the current one
    for layer in range(n_layers - 1, -1, -1):
        own = torch.zeros(heads, k, size, device=device)
        moved = None if carried is None else torch.zeros_like(carried)
        for start, block in blocks(layer):
            a = block.float()  # [H, b, P]: rows start .. start + b - 1
            stop = start + a.shape[1]
            c = 0.5 * a.sum(dim=-1) + 0.5  # [H, b]: row sums of A / 2 + I / 2
            mine = ((index >= start) & (index < stop)).nonzero().flatten()
            if mine.numel():  # this layer's own rows of A_hat that fall in the block
                local = index[mine] - start
                own[:, mine] = 0.5 * a[:, local, :]
                own[:, mine, index[mine]] += 0.5
                own[:, mine] /= c[:, local, None]
            if moved is not None:
                x = carried[:, :, start:stop] / c[:, None, :]
                moved.baddbmm_(x, a, alpha=0.5)
                moved[:, :, start:stop] += 0.5 * x
        carried = own if moved is None else torch.cat([moved, own], dim=1)
        # carried[:, r * K + k] is row k started r layers above `layer`; all of them end here at the bottom
    return carried.view(heads, n_layers, k, size).flip(1).transpose(0, 1)  # [Ls, H, K, P]


def value_norms(lm: CausalLM, values: torch.Tensor, layer: int) -> torch.Tensor:
    """``nu[h, j] = ||v_j^{(h)} W_O^{(h)}||_1``: values ``[P, H_kv, d_h]`` -> ``[H, P]``.

    With grouped-query attention head ``h`` reads key/value head ``h // (H / H_kv)``: the heads of a
    group share their values, so each key/value head makes one matmul with its group's
    ``[d_h, group * d]`` slices side by side (no repeated values, wider matmuls).
    """
    kv_heads, head_dim = values.shape[1], values.shape[2]
    group = lm.num_heads // kv_heads
    w = lm.layers[layer].out_heads.to(values.dtype)  # [H, d_h, d]
    d = w.shape[-1]
    w = w.view(kv_heads, group, head_dim, d).transpose(1, 2).reshape(kv_heads, head_dim, group * d)
    v = values.transpose(0, 1)  # [H_kv, P, d_h]
    # The products (d_h = 64 deep, group * d wide) are cheap to make and costly to store: tiles of
    # 64 tokens keep each block in cache between the matmul and its |.| sum.
    tiles = [torch.bmm(v[:, start:start + 64], w).abs().view(kv_heads, -1, group, d).sum(dim=-1)
             for start in range(0, v.shape[1], 64)]  # [H_kv, tile, group] each
    return torch.cat(tiles, dim=1).permute(0, 2, 1).reshape(lm.num_heads, -1)


def semantic_flow(lm: CausalLM, attentions: tuple[torch.Tensor, ...], values: list[torch.Tensor],
                  flow_layers: int | None) -> torch.Tensor:
    """``M``: ``[n]`` from one forward over rows ``0 .. p`` (``n = p + 1``).

    attentions: per layer ``[1, H, n, n]``; values: per layer ``[1, n, H_kv, d_h]``.
    """
    layers = rollout_layers(lm, flow_layers)
    phi = prediction_rows([attentions[layer][0] for layer in layers])  # [Ls, H, n]
    nu = torch.stack([value_norms(lm, values[layer][0].float(), layer) for layer in layers])
    return normalise_flow((phi * nu).sum(dim=(0, 1)))


def uniform_flow(size: int, rows: Sequence[int], n_layers: int, device: torch.device | str | None = None
                 ) -> torch.Tensor:
    """The rollout mass uniform causal attention gives each position: ``[K, size]`` float32.

    ``U[i, j] = 1 / (i + 1)`` for ``j <= i``, the same ``n_layers`` rows carried down as ``prediction_rows``
    carries the model's, summed over the starting layers, value norms 1. Rollout's mass drifts to
    early positions as layers compound whatever the model attends to; this is that drift alone, the
    denominator of ``flow="position_normalised"``. Positive at every position ``<= rows[k]``.
    """
    U = torch.tril(torch.ones(size, size, device=device))
    U /= U.sum(dim=-1, keepdim=True)
    return prediction_rows([U[None]] * n_layers, rows).sum(dim=(0, 1))  # [Ls, 1, K, P] -> [K, P]


def semantic_flows(lm: CausalLM, attentions: Sequence[torch.Tensor] | Sequence[AttentionCall],
                   values: list[torch.Tensor], flow_layers: int | None, rows: Sequence[int],
                   flow: str = "rollout") -> list[torch.Tensor]:
    """``M`` of several targets from one forward over rows ``0 .. P - 1``: a list of ``[rows[k] + 1]``.

    Target ``k`` predicts from row ``rows[k]`` (its ``p``), so its context is rows
    ``0 .. rows[k]``. attentions: per layer ``[1, H, P, P]`` (kept by the forward), or per layer
    the ``AttentionCall`` that ``record_attention`` kept (recomputed block by block: the memory of
    one block instead of every layer's maps); values: per layer ``[1, P, H_kv, d_h]``. A causal
    model's attention and values at a row do not depend on later rows, so the longest forward
    serves every target; value norms are computed once. flow ``position_normalised`` divides
    ``m_j`` by ``uniform_flow``'s ``u_j`` before the simplex.
    """
    layers = list(rollout_layers(lm, flow_layers))
    if isinstance(attentions[0], AttentionCall):
        calls = [attentions[layer] for layer in layers]
        size = calls[0].key.shape[2]
        blocks = recomputed_blocks(calls)
    else:
        maps = [attentions[layer][0] for layer in layers]
        size = maps[0].shape[-1]
        blocks = stored_blocks(maps)
    phi = descend(blocks, len(layers), lm.num_heads, size, rows, values[0].device)  # [Ls, H, K, P]
    nu = torch.stack([value_norms(lm, values[layer][0].float(), layer) for layer in layers])  # [Ls, H, P]
    m = (phi * nu[:, :, None]).sum(dim=(0, 1))  # [K, P]
    if flow == "position_normalised":  # m_j / u_j: the drift of rollout itself divided out
        m = m / uniform_flow(m.shape[-1], rows, len(layers), m.device).clamp_min(torch.finfo(m.dtype).tiny)
    return [normalise_flow(m[k, :row + 1]) for k, row in enumerate(rows)]
