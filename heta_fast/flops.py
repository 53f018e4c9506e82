"""Analytical FLOP counts for HETA's components, for the reference's and the fast path's way of working.

Only matrix products are counted, at ``2 * M * N * K`` FLOPs each: the decoder layers' linear
maps (attention projections and MLP), the attention scores ``Q K^T`` and values ``A V``, the
unembedding (``lm_head``), the semantic-flow rollout products and the value-norm products
``v W_O``. Norms, activations, softmax, RoPE, masking and reductions are elementwise and are
left out; on the models here they are a few percent of the total.

Notation (as in ``docs/method.md`` §0): ``n = t`` context positions, ``T = t + 1`` input rows, the
prediction row ``p = t - 1``, ``m`` probes per position, ``N`` layers, ``H`` heads of size
``d_h``, hidden size ``d``, vocabulary ``V``, ``P_lin`` = weight entries of the linear maps a
row passes through in all decoder layers together.

One forward of ``q`` query rows attending to ``k`` keys costs

    body(q, k) = 2 q P_lin  +  4 N H d_h q k          (linears, then scores and values)
    head(r)    = 2 r d V                              (lm_head on r rows)

Attention is counted as the dense ``q x k`` rectangle the eager kernel multiplies, causal mask
included, not the triangle a causal kernel would need.

Reverse mode on frozen weights. A linear map with a frozen weight, ``Y = X W``, costs one
matmul forward and one backward (``dX = dY W^T``; no ``dW``). An HVP here is the backward of
that gradient: the cotangent runs forward through the backward graph (one matmul per linear,
through ``dX = dY W^T``) and then, through the nonlinearities' derivatives, back through the
forward graph (one more): **2x the forward's linear FLOPs**. Attention's two products have two
varying operands each: backward 2x (both operand gradients), HVP 6x (each of the two backward
products differentiated in both operands, 4x, plus both operands of the forward product, 2x).
So with ``L`` = linear FLOPs and ``A`` = attention FLOPs of the forward:

    graph build (forward + first backward with create_graph) = 2 L + 3 A
    one HVP (one probe, or one slice of a batched probe set)  = 2 L + 6 A

Reference (``heta_fast.reference``): every pass covers all ``T`` rows with full logits.

    forward        0                          (it has no shared forward; each component runs its own)
    semantic_flow  body(T, T) + head(T) + 2 H N_s T^3 (rollout R <- A_hat R per head and layer)
                   + 2 H N_s T d_h d (value norms)
    hessian        build(T rows, T keys, head(T)) + n m HVP(T rows, T keys, head(T))
    kl             (n + 1) (body(T, T) + head(T))  (P, then one masked forward per position)

Fast path (``heta_fast.pipeline``; the Triton backend does the same work): rows ``0 .. p``
only, logits at row ``p`` only, and position ``i`` runs rows ``i .. p`` (``r_i = n - i`` rows,
attending to all ``n`` keys) on the cached prefix.

    forward        body(n, n) + head(1)
    semantic_flow  sum_{r=1}^{N_s - 1} 2 H r n^2 (prediction rows carried down the layers)
                   + 2 H N_s n d_h d (value norms)
    hessian        sum_i [ build(r_i rows, n keys, head(1)) + m HVP(r_i rows, n keys, head(1)) ]
    kl             sum_i [ body(r_i, n) + head(1) ]

``sum_i r_i = n (n + 1) / 2``. This is the work of one position per batch. Batching positions
``[a, b)`` makes every variant (KL) or probe (Hessian) of the batch run rows ``a .. p``, so a
batch also recomputes rows ``a .. i - 1`` for position ``i`` (the rest of a rectangle); that
waste is **excluded** here, so a measured rate computed from these counts is a rate of useful
work. The Hessian's batches also share one graph build among their positions, which saves
work the count includes (at ``m = 10`` a build is ~1/11 of a position's work). ``N_s`` is the number of
layers the semantic flow uses (``flow_layers``; all by default).
"""

from __future__ import annotations

from dataclasses import dataclass

from heta_fast.config import BACKENDS

COMPONENTS = ("forward", "semantic_flow", "hessian", "kl")


@dataclass(frozen=True)
class ModelSizes:
    """The sizes a FLOP count needs.

    linear_params: weight entries of all the matmul weights one row passes through in the decoder
    layers (summed over layers; q/k/v/o or fused qkv, and the MLP), i.e. multiply-adds per row.
    """

    num_layers: int
    hidden_size: int
    num_heads: int
    head_dim: int
    vocab_size: int
    linear_params: int

    @classmethod
    def of(cls, lm) -> ModelSizes:
        """Sizes of a ``heta_fast.model.CausalLM`` (linear weights counted from its modules)."""
        total = 0
        for layer in lm.layers:
            for module in layer.block.modules():
                weight = getattr(module, "weight", None)
                # nn.Linear and transformers' Conv1D (GPT-2): the 2-D weights a row is multiplied by
                if type(module).__name__ in ("Linear", "Conv1D") and weight is not None and weight.dim() == 2:
                    total += weight.numel()
        return cls(num_layers=lm.num_layers, hidden_size=lm.hidden_size, num_heads=lm.num_heads,
                   head_dim=lm.head_dim, vocab_size=lm.vocab_size, linear_params=total)


def forward_flops(sizes: ModelSizes, rows: float, keys: float, head_rows: float) -> tuple[float, float]:
    """``(linear, attention)`` FLOPs of one forward: ``rows`` query rows over ``keys`` keys,
    ``lm_head`` on ``head_rows`` rows (counted with the linears)."""
    s = sizes
    linear = 2.0 * rows * s.linear_params + 2.0 * head_rows * s.hidden_size * s.vocab_size
    attention = 4.0 * s.num_layers * s.num_heads * s.head_dim * rows * keys
    return linear, attention


def component_flops(lm_or_sizes, n: int, m: int = 10, backend: str = "torch",
                    flow_layers: int | None = None) -> dict[str, float]:
    """FLOPs per component for ``n`` context tokens and ``m`` probes per position.

    lm_or_sizes: a ``CausalLM`` or ``ModelSizes``; backend: any of ``HETAConfig``'s backends:
    ``reference``, or the fast path's work for the others (``triton`` does the torch backend's
    work with fused kernels, and ``auto`` resolves to one of the two). Returns ``{"forward",
    "semantic_flow", "hessian", "kl"}`` in FLOPs (floats); the model and its assumptions are in
    this module's docstring.
    """
    sizes = lm_or_sizes if isinstance(lm_or_sizes, ModelSizes) else ModelSizes.of(lm_or_sizes)
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    if n < 1 or m < 1:
        raise ValueError(f"need n >= 1 and m >= 1, got n={n}, m={m}")
    s = sizes
    flow_layers = s.num_layers if flow_layers is None else min(s.num_layers, max(1, flow_layers))
    norms_per_row = 2.0 * s.num_heads * flow_layers * s.head_dim * s.hidden_size

    if backend == "reference":
        T = n + 1
        lin, att = forward_flops(s, T, T, T)
        rollout = 2.0 * s.num_heads * flow_layers * T**3
        return {
            "forward": 0.0,
            "semantic_flow": lin + att + rollout + norms_per_row * T,
            "hessian": (2 * lin + 3 * att) + n * m * (2 * lin + 6 * att),
            "kl": (n + 1) * (lin + att),
        }

    # fast path: position i runs r_i = n - i rows over n keys; everything is linear in rows, so
    # summing over positions is one pass of sum_i r_i rows with n head rows (one per position)
    rows = n * (n + 1) / 2.0
    lin, att = forward_flops(s, rows, n, n)
    f_lin, f_att = forward_flops(s, n, n, 1)
    carried = flow_layers * (flow_layers - 1) / 2.0  # sum of r over 1 .. N_s - 1
    return {
        "forward": f_lin + f_att,
        "semantic_flow": 2.0 * s.num_heads * carried * n**2 + norms_per_row * n,
        "hessian": (2 * lin + 3 * att) + m * (2 * lin + 6 * att),
        "kl": lin + att,
    }


def total_flops(flops: dict[str, float]) -> float:
    """End-to-end FLOPs: the sum over components."""
    return float(sum(flops[name] for name in COMPONENTS))
