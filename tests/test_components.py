"""Every component of every backend against an independent computation (docs/method.md §1-§3).

Independent means: attention probabilities from the model's own ``output_attentions``, value
vectors caught with this file's hooks on the attention modules, full rollout matrices, the
explicit Hessian from ``torch.autograd.functional.hessian`` and explicit masked forwards.
"""

from __future__ import annotations

import pytest
import torch
from helpers import SPEC, VOCAB, random_ids, rel_err

from heta_fast import HETA, HETAConfig
from heta_fast.components import window_spans
from heta_fast.rng import rademacher, unk_vectors

BACKENDS = ["reference", "torch"]


def embeddings(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.get_input_embeddings()(ids[None])[0]


def captured_values(model, E: torch.Tensor, source: str):
    """Attention probabilities ``[N][H, T, T]`` and values ``[N][T, H_kv, d_h]`` via this test's own hooks."""
    blocks = model.transformer.h if hasattr(model, "transformer") else model.model.layers
    values, hooks = [], []
    for block in blocks:
        if hasattr(block, "self_attn"):  # Llama: v_proj output, or the block's raw input times W_v (no bias)
            attn = block.self_attn
            if source == "attention":
                hooks.append(attn.v_proj.register_forward_hook(lambda m, a, out: values.append(out[0])))
            else:
                hooks.append(block.register_forward_pre_hook(
                    lambda m, a, kw, w=attn.v_proj.weight: values.append((a[0] if a else kw["hidden_states"])[0] @ w.T),
                    with_kwargs=True))
        else:  # GPT-2: the third of c_attn's output
            d = block.attn.c_proj.weight.shape[0]
            if source == "attention":
                hooks.append(block.attn.c_attn.register_forward_hook(
                    lambda m, a, out, d=d: values.append(out[0, :, 2 * d:])))
            else:
                hooks.append(block.register_forward_pre_hook(
                    lambda m, a, kw, w=block.attn.c_attn.weight, d=d: values.append(
                        (a[0] if a else kw["hidden_states"])[0] @ w[:, 2 * d:]), with_kwargs=True))
    with torch.no_grad():
        attentions = model(inputs_embeds=E[None], output_attentions=True).attentions
    for h in hooks:
        h.remove()
    return [a[0] for a in attentions], values


def out_projection_heads(model, layer: int, heads: int) -> torch.Tensor:
    """``W_O`` per head: ``[H, d_h, d]``."""
    if hasattr(model, "transformer"):
        W = model.transformer.h[layer].attn.c_proj.weight  # Conv1D: [in, out]
    else:
        W = model.model.layers[layer].self_attn.o_proj.weight.T  # Linear stores [out, in]
    return W.reshape(heads, -1, W.shape[1])


def explicit_flow(model, E: torch.Tensor, source: str, layer_subset: int | None) -> torch.Tensor:
    cfg = model.config
    H = cfg.num_attention_heads
    H_kv = getattr(cfg, "num_key_value_heads", None) or H
    attentions, values = captured_values(model, E, source)
    T = E.shape[0]
    t, p = T - 1, T - 2
    N = len(attentions)
    layers = list(range(N))[-layer_subset:] if layer_subset else list(range(N))
    m = torch.zeros(T, dtype=torch.float64)
    for h in range(H):
        hats = []
        for layer in layers:
            A = attentions[layer][h].double()
            A_hat = 0.5 * A + 0.5 * torch.eye(T, dtype=torch.float64)
            hats.append(A_hat / A_hat.sum(-1, keepdim=True))
        W_O = [out_projection_heads(model, layer, H)[h].double() for layer in layers]
        for depth, layer in enumerate(layers):
            R = torch.linalg.multi_dot(hats[:depth + 1][::-1]) if depth else hats[0]
            v = values[layer].double().reshape(T, H_kv, -1)[:, h // (H // H_kv)]
            m += R[p] * (v @ W_O[depth]).abs().sum(-1)
    m = m[:t].clamp_min(0)
    return m / m.sum()


def explicit_sensitivity(model, E: torch.Tensor, y: int, samples: int, seed: int) -> torch.Tensor:
    T, d = E.shape
    p = T - 2

    def g(flat):
        return torch.log_softmax(model(inputs_embeds=flat.view(1, T, d)).logits[0, p].float(), -1)[y]

    Hess = torch.autograd.functional.hessian(g, E.flatten(), vectorize=True).view(T, d, T, d)
    S = torch.zeros(T - 1, dtype=torch.float64)
    for i in range(T - 1):
        for k in range(samples):
            r = rademacher(seed, torch.tensor([i]), torch.tensor([k]), d)[0]
            S[i] += (Hess[i, :, i, :] @ r).abs().sum()
    return S / samples


def explicit_information(model, E: torch.Tensor, mask: str, seed: int) -> torch.Tensor:
    T, d = E.shape
    p = T - 2
    with torch.no_grad():
        log_P = torch.log_softmax(model(inputs_embeds=E[None]).logits[0, p].double(), -1)
        out = []
        for i in range(T - 1):
            E_i = E.clone()
            unk = unk_vectors(seed, torch.tensor([i]), d)[0]
            E_i[i] = {"zero": torch.zeros(d), "mean": E.mean(0), "unk": unk}[mask]
            log_Q = torch.log_softmax(model(inputs_embeds=E_i[None]).logits[0, p].double(), -1)
            out.append(torch.nn.functional.kl_div(log_Q, log_P, log_target=True, reduction="sum").clamp_min(0))
    return torch.stack(out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("source", ["attention", "residual"])
@pytest.mark.parametrize("flow_layers", [None, 2])
def test_semantic_flow_matches_explicit_rollout(model, fresh_seed, backend, source, flow_layers):
    ids = random_ids(fresh_seed, 11)
    a = HETA(model, config=SPEC).attribute(ids, samples=1, backend=backend, value_source=source,
                                           flow_layers=flow_layers)
    expected = explicit_flow(model, embeddings(model, ids), source, flow_layers)
    assert rel_err(a.M, expected) < 1e-5
    assert abs(float(a.M.sum()) - 1) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_hessian_sensitivity_matches_full_hessian(model, fresh_seed, backend):
    ids = random_ids(fresh_seed, 9)
    seed = fresh_seed
    a = HETA(model, config=SPEC).attribute(ids, samples=3, seed=seed, backend=backend)
    expected = explicit_sensitivity(model, embeddings(model, ids), int(ids[-1]), 3, seed)
    assert rel_err(a.S, expected) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask", ["zero", "mean", "unk"])
def test_kl_information_matches_masked_forwards(model, fresh_seed, backend, mask):
    ids = random_ids(fresh_seed, 10)
    a = HETA(model, config=SPEC).attribute(ids, samples=1, backend=backend, mask=mask, seed=fresh_seed)
    expected = explicit_information(model, embeddings(model, ids), mask, fresh_seed)
    assert rel_err(a.I, expected) < 1e-4
    assert (a.I >= 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_scores_combine_components(model, fresh_seed, backend):
    g = torch.Generator().manual_seed(fresh_seed)
    beta, gamma = (float(x) for x in torch.rand(2, generator=g) * 2)
    a = HETA(model, config=SPEC).attribute(random_ids(fresh_seed, 8), samples=2, beta=beta, gamma=gamma,
                                           backend=backend)
    assert torch.equal(a.scores, a.M * (beta * a.S + gamma * a.I))


@pytest.mark.parametrize("backend", BACKENDS)
def test_windows_average_hand_computed_windows(model, fresh_seed, backend):
    heta = HETA(model, config=HETAConfig.paper(samples=2, backend=backend, seed=7))
    ids = random_ids(fresh_seed, 11)  # n = 10 context tokens
    y = int(ids[-1])
    got = heta.attribute(ids, window_size=4, overlap=0.5)
    # stride floor(4 * 0.5) = 2: windows [0,4) [2,6) [4,8) [6,10)
    spans = [(0, 4), (2, 6), (4, 8), (6, 10)]
    total = {k: torch.zeros(10, dtype=torch.float64) for k in "MSI"}
    count = torch.zeros(10, dtype=torch.float64)
    for a, b in spans:
        part = heta.attribute(torch.cat([ids[a:b], ids[-1:]]))
        assert part.target_id == y
        for k in "MSI":
            total[k][a:b] += getattr(part, k).double()
        count[a:b] += 1
    M = total["M"] / count
    M = M / M.sum()
    assert rel_err(got.M, M) < 1e-6
    assert rel_err(got.S, total["S"] / count) < 1e-6
    assert rel_err(got.I, total["I"] / count) < 1e-6
    assert torch.equal(got.scores, got.M * (0.5 * got.S + 0.5 * got.I))


def test_window_spans_follow_the_method():
    assert window_spans(10, None, 0.0) == [(0, 10)]
    assert window_spans(10, 10, 0.0) == [(0, 10)]
    assert window_spans(10, 4, 0.0) == [(0, 4), (4, 8), (6, 10)]
    assert window_spans(10, 4, 0.5) == [(0, 4), (2, 6), (4, 8), (6, 10)]
    assert window_spans(9, 4, 0.9) == [(0, 4), (1, 5), (2, 6), (3, 7), (4, 8), (5, 9)]  # stride max(1, 0)


def test_target_token_override_explains_another_token(model, fresh_seed):
    ids = random_ids(fresh_seed, 8)
    other = (int(ids[-1]) + 1) % VOCAB
    heta = HETA(model, config=SPEC)
    a = heta.attribute(ids, target_token=other, samples=2)
    b = heta.attribute(torch.cat([ids[:-1], torch.tensor([other])]), samples=2)
    assert a.target_id == other and a.target_pos == 7
    assert torch.equal(a.scores, b.scores)
    appended = heta.attribute(ids, target_pos=8, target_token=other, samples=2)
    assert appended.context_ids == ids.tolist() and appended.target_pos == 8
