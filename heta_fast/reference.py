"""The reference backend: docs/method.md §1-§3 line by line, plain autograd, one thing at a time.

It keeps the released code's way of working (one forward whose graph is reused for every HVP,
one masked forward per context token, logits as the model returns them) and is the oracle
every faster backend is tested against. Read it beside ``docs/method.md``; the fast modules
(``semantic_flow``, ``sensitivity.exact``, ``kl``) use the same names.

All functions take ``E``: ``[t + 1, d]``, the token embeddings of ``x_0 .. x_{t-1}, y``, so the
target sits at ``t = T - 1`` and the prediction row is ``p = t - 1``.
"""

from __future__ import annotations

import torch

from heta_fast.attention import stock_attention
from heta_fast.components import Components, Progress, normalise_flow, timed
from heta_fast.config import HETAConfig
from heta_fast.kl import kl_from_log_probs, mask_rows
from heta_fast.model import CausalLM
from heta_fast.rng import rademacher


def semantic_flow(lm: CausalLM, E: torch.Tensor, config: HETAConfig) -> torch.Tensor:
    """``M``: ``[n]``, the attention-value rollout at the prediction row, on the simplex."""
    T = E.shape[0]
    t, p = T - 1, T - 2
    with torch.no_grad(), lm.capture_values(config.value_source) as values, stock_attention():
        attentions = lm.model(inputs_embeds=E[None], output_attentions=True, use_cache=False).attentions
    first = 0 if config.flow_layers is None else max(0, lm.num_layers - config.flow_layers)
    group = lm.num_heads // lm.num_kv_heads
    eye = torch.eye(T, dtype=torch.float32, device=E.device)
    m = torch.zeros(T, dtype=torch.float32, device=E.device)
    for h in range(lm.num_heads):
        R = eye  # R^{(s-1,h)} = I
        for layer in range(first, lm.num_layers):
            A = attentions[layer][0, h].float()
            A_hat = 0.5 * A + 0.5 * eye
            A_hat = A_hat / A_hat.sum(dim=-1, keepdim=True)
            R = A_hat @ R
            phi = R[p]
            v = values[layer][0, :, h // group].float()  # [T, d_h]; GQA: head h reads kv head h // group
            W_O = lm.layers[layer].out_heads[h].float()  # [d_h, d]
            nu = (v @ W_O).abs().sum(dim=-1)  # [T]
            m += phi * nu
    if config.flow == "position_normalised":  # divided by the rollout of uniform causal attention
        U = torch.tril(torch.ones(T, T, device=E.device))
        U_hat = 0.5 * U / U.sum(dim=-1, keepdim=True) + 0.5 * eye
        R, u = eye, torch.zeros(T, device=E.device)
        for _ in range(first, lm.num_layers):
            R = U_hat @ R
            u += R[p]
        m = m / u
    return normalise_flow(m[:t])


def hessian_sensitivity(lm: CausalLM, E: torch.Tensor, y: int, config: HETAConfig,
                        progress: Progress | None = None) -> torch.Tensor:
    """``S``: ``[n]``, ``S_i = (1/m) sum_k ||(H r_{i,k})_i||_1`` with ``H = d^2 log P[y] / dE^2``."""
    T, d = E.shape
    t, p = T - 1, T - 2
    E = E.detach().clone().requires_grad_(True)
    logits = lm.logits(E[None])[0]
    g = torch.log_softmax(logits[p].float(), dim=-1)[y]
    (grad,) = torch.autograd.grad(g, E, create_graph=True)
    S = torch.zeros(t, dtype=torch.float32)
    for i in range(t):
        for k in range(config.samples):
            r = torch.zeros_like(E)
            r[i] = rademacher(config.seed, torch.tensor([i]), torch.tensor([k]), d, dtype=E.dtype, device=E.device)[0]
            (Hr,) = torch.autograd.grad(grad, E, grad_outputs=r, retain_graph=True)
            S[i] += Hr[i].detach().float().abs().sum().cpu()
        if progress is not None:
            progress("hessian", i + 1, t)
    return S / config.samples


def kl_information(lm: CausalLM, E: torch.Tensor, config: HETAConfig,
                   progress: Progress | None = None) -> torch.Tensor:
    """``I``: ``[n]``, ``I_i = KL(P || Q_i)`` with row ``i`` of ``E`` replaced by the mask."""
    T = E.shape[0]
    t, p = T - 1, T - 2
    with torch.no_grad():
        # float64 log-softmax: tiny KLs are differences of O(10) numbers
        log_P = torch.log_softmax(lm.logits(E[None])[0, p].double(), dim=-1)
        I = torch.zeros(t, dtype=torch.float32)
        for i in range(t):
            E_i = E.clone()
            E_i[i] = mask_rows(config.mask, E, torch.tensor([i]), config.seed)[0]
            log_Q = torch.log_softmax(lm.logits(E_i[None])[0, p].double(), dim=-1)
            I[i] = kl_from_log_probs(log_P, log_Q[None])[0].float().cpu()
            if progress is not None:
                progress("kl", i + 1, t)
    return I


def components(lm: CausalLM, ids: torch.Tensor, config: HETAConfig, progress: Progress | None = None) -> Components:
    """``M, S, I`` for ids ``[t + 1]`` (context then target token)."""
    if config.hessian != "exact":
        raise ValueError(f"the reference backend computes the exact Hessian only (hessian={config.hessian!r}); "
                         "use backend='torch' for approximate estimators")
    if config.information != "exact":
        raise ValueError(f"the reference backend computes the exact I only (information={config.information!r}); "
                         "use backend='torch' for approximate estimators")
    with lm.prepared():
        return _components(lm, ids, config, progress)


def _components(lm: CausalLM, ids: torch.Tensor, config: HETAConfig, progress: Progress | None) -> Components:
    E = lm.embed(ids)
    y = int(ids[-1])
    timings = {}
    with timed(timings, "semantic_flow"):
        M = semantic_flow(lm, E, config).cpu()
    if progress is not None:
        progress("semantic_flow", 1, 1)
    with timed(timings, "hessian"):
        S = hessian_sensitivity(lm, E, y, config, progress)
    with timed(timings, "kl"):
        I = kl_information(lm, E, config, progress)
    return Components(M=M, S=S, I=I, timings=timings)
