"""Attribution methods behind one signature: ``method(heta, prompt_ids, target) -> scores [n]``.

``n = len(prompt_ids)``; ``scores[i]`` explains how prompt token ``i`` bears on ``target``, the
token after the prompt. HETA variants call ``HETA.attribute``; its parts (``M``, ``S``, ``I``,
``beta S + gamma I`` without ``M``) come from the same ``Attribution`` (cached per input).

Baselines, on the model's log-probability of the target, ``g(E) = log softmax(f(E)_{n-1})[y]``,
as a function of the input embeddings ``E`` ``[n, d]``:

- ``integrated_gradients``: Captum ``IntegratedGradients`` from the vocabulary's mean
  embedding (every row), Gauss-Legendre with ``IG_STEPS`` steps; per token the signed sum over
  ``d``. Its completeness error ``|sum a - (g(E) - g(B))|`` (Captum's convergence delta) is kept
  in ``LAST_IG_DELTA``. Why not the zero embedding: on SmolLM2 ``g`` along ``alpha E`` jumps
  near 0 (``g`` = -10.8, -9.4, -15.7, -12.3 at alpha = 0, 1e-4, 1e-3, 1e-2: the first RMSNorm
  rescales any nonzero row), and 32 steps left a completeness error of 297 against a change of
  2.8; from the mean embedding the error at 32 steps was 10.6 against 4.1. It is still not
  small, and more steps do not make it so: along the path ``g`` has dips a few nats deep and
  ~0.002 wide in ``alpha`` that a Gauss-Legendre node either misses or lands on
  (``benchmarks/bench_ig_convergence.py``; EVALUATION.md gives the figures).
- ``saliency``: Captum ``Saliency``; per token the L2 norm of ``dg/dE_i``.
- ``input_x_gradient``: Captum ``InputXGradient``; per token the signed sum of ``E_i * dg/dE_i``.
- ``occlusion``: Captum ``FeatureAblation`` with one feature per token and the zero embedding
  as the baseline (HETA's default mask): ``g(E) - g(E with row i zeroed)``.
- ``rollout``: attention rollout (Abnar & Zuidema 2020) on head-averaged attention,
  ``e_p^T Â_{N-1} ... Â_0``, ``Â = rownorm(A / 2 + I / 2)``.
- ``last_attention``: the last layer's head-averaged attention row of ``p``.
- ``random``: uniform scores, seeded by the input.

Captum is the optional extra ``[eval]``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence

import torch

from heta_fast.components import Components
from heta_fast.config import HETAConfig
from heta_fast.mix import mixed
from heta_fast.semantic_flow import prediction_rows

Method = Callable[..., torch.Tensor]
IG_STEPS = 64
LAST_IG_DELTA: dict[str, float] = {}  # the last IG call: {"delta": ..., "change": g(E) - g(B)}, B the baseline


def _captum():
    try:
        import captum.attr
    except ImportError:
        raise ModuleNotFoundError("the baselines need Captum: pip install 'heta_fast[eval]'") from None
    return captum.attr


def target_log_prob(heta, target: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``g``: embeddings ``[B, n, d]`` -> the target's log-probability at the last row ``[B]``."""
    def forward(inputs: torch.Tensor) -> torch.Tensor:
        hidden = heta.lm.hidden(inputs).last_hidden_state[:, -1]
        return torch.log_softmax(heta.lm.unembed(hidden).float(), dim=-1)[:, target]
    return forward


def embeddings(heta, ids: Sequence[int]) -> torch.Tensor:
    """The input embeddings of ``ids``, ``[1, n, d]``, a copy the caller may mark ``requires_grad``."""
    return heta.lm.embed(torch.tensor(list(ids), dtype=torch.long))[None].clone()  # [1, n, d]


# --- HETA ------------------------------------------------------------------------------------

_cache: dict[tuple, object] = {}


def _attribution(heta, ids: Sequence[int], target: int, config: HETAConfig):
    """``HETA.attribute`` of one input, kept while that input is evaluated: the parts and the
    mixes of one configuration share a call (the mix does not change ``M``, ``S``, ``I``).
    Nothing is kept or reused while a hook sits on the embedding layer (``metrics.embedding_noise``)."""
    config = config.replace(mix="raw")  # so sink_share is the sink's share under the raw mix
    if heta.lm.embedding._forward_hooks:  # a hook (the sensitivity metric's noise) changes E for the same ids
        return heta.attribute(list(ids), target_pos=len(ids), target_token=int(target), config=config)
    input_key = (id(heta), tuple(ids), int(target))
    key = (*input_key, config)
    if key not in _cache:
        for old in [k for k in _cache if k[:3] != input_key]:
            del _cache[old]
        _cache[key] = heta.attribute(list(ids), target_pos=len(ids), target_token=int(target), config=config)
    return _cache[key]


HETA_PARTS = ("scores", "M", "S", "I", "SI")


def heta_method(config: HETAConfig, part: str = "scores") -> Method:
    """HETA under ``config``; ``part``: ``scores``, ``M``, ``S``, ``I`` or ``SI``
    (``beta S + gamma I`` without ``M``, mixed as ``config.mix`` says)."""
    if part not in HETA_PARTS:
        raise ValueError(f"unknown HETA part {part!r}; expected one of {', '.join(HETA_PARTS)}")

    def method(heta, ids: Sequence[int], target: int) -> torch.Tensor:
        a = _attribution(heta, ids, target, config)
        if part in ("M", "S", "I"):
            return getattr(a, part)
        gate = a.M if part == "scores" else torch.ones_like(a.M)
        return mixed(Components(gate, a.S, a.I), config.beta, config.gamma, config.mix)

    method.sink_share = lambda heta, ids, target: _attribution(heta, ids, target, config).sink_share
    return method


# --- baselines -------------------------------------------------------------------------------


def mean_embedding_baseline(heta, ids: Sequence[int], keep: int = 0) -> torch.Tensor:
    """IG's baseline ``B`` ``[1, n, d]``: the vocabulary's mean embedding in every row but the
    first ``keep`` rows, which keep their own embedding (and so get no attribution)."""
    E = embeddings(heta, ids)
    B = heta.lm.embedding.weight.detach().mean(dim=0).expand_as(E).clone()
    B[0, :keep] = E[0, :keep]
    return B


def integrated_gradients_with_delta(heta, ids: Sequence[int], target: int, baseline: torch.Tensor,
                                    steps: int = IG_STEPS) -> tuple[torch.Tensor, float, float]:
    """Captum IG of ``g`` from ``baseline`` ``[1, n, d]``: ``(a [n], |delta|, g(E) - g(B))``, with
    ``delta = sum a - (g(E) - g(B))`` (Captum's convergence delta, Gauss-Legendre, ``steps``)."""
    E = embeddings(heta, ids)
    g = target_log_prob(heta, target)
    attributions, delta = _captum().IntegratedGradients(g).attribute(
        E, baselines=baseline, n_steps=steps, internal_batch_size=32, return_convergence_delta=True)
    with torch.no_grad():
        change = float(g(E)[0] - g(baseline)[0])
    return attributions[0].sum(dim=-1).detach().float(), float(delta.abs().max()), change


def integrated_gradients(heta, ids: Sequence[int], target: int) -> torch.Tensor:
    scores, delta, change = integrated_gradients_with_delta(heta, ids, target, mean_embedding_baseline(heta, ids))
    LAST_IG_DELTA.clear()
    LAST_IG_DELTA.update(delta=delta, change=change)
    return scores


def saliency(heta, ids: Sequence[int], target: int) -> torch.Tensor:
    E = embeddings(heta, ids).requires_grad_(True)
    grads = _captum().Saliency(target_log_prob(heta, target)).attribute(E, abs=False)
    return grads[0].norm(dim=-1).detach().float()


def input_x_gradient(heta, ids: Sequence[int], target: int) -> torch.Tensor:
    E = embeddings(heta, ids).requires_grad_(True)
    return _captum().InputXGradient(target_log_prob(heta, target)).attribute(E)[0].sum(dim=-1).detach().float()


def occlusion(heta, ids: Sequence[int], target: int) -> torch.Tensor:
    E = embeddings(heta, ids)
    n, d = E.shape[1], E.shape[2]
    features = torch.arange(n)[None, :, None].expand(1, n, d)
    ablation = _captum().FeatureAblation(target_log_prob(heta, target))
    with torch.no_grad():
        out = ablation.attribute(E, baselines=0.0, feature_mask=features, perturbations_per_eval=16)
    return out[0, :, 0].detach().float()


def _attentions(heta, ids: Sequence[int]) -> list[torch.Tensor]:
    """Per layer the head-averaged attention ``[1, n, n]`` (one head, for ``prediction_rows``)."""
    with torch.no_grad():
        out = heta.lm.hidden(embeddings(heta, ids), output_attentions=True)
    return [a[0].float().mean(dim=0, keepdim=True) for a in out.attentions]


def rollout(heta, ids: Sequence[int], target: int) -> torch.Tensor:
    phi = prediction_rows(_attentions(heta, ids))  # [N, 1, n]: row l is the chain from layer l down
    return phi[-1, 0].cpu()


def last_attention(heta, ids: Sequence[int], target: int) -> torch.Tensor:
    return _attentions(heta, ids)[-1][0, -1].cpu()


def random_scores(heta, ids: Sequence[int], target: int) -> torch.Tensor:
    seed = zlib.crc32(repr((list(ids), int(target))).encode())
    return torch.rand(len(ids), generator=torch.Generator().manual_seed(seed))


BASELINES: dict[str, Method] = {
    "integrated_gradients": integrated_gradients,
    "saliency": saliency,
    "input_x_gradient": input_x_gradient,
    "occlusion": occlusion,
    "rollout": rollout,
    "last_attention": last_attention,
    "random": random_scores,
}


def heta_variants(samples: int = 10) -> dict[str, tuple[HETAConfig, str]]:
    """Named HETA methods: ``name -> (config, part)``. ``heta_exact`` is the spec (``HETAConfig.paper()``)."""
    paper = HETAConfig.paper(samples=samples)
    gn = paper.replace(hessian="gauss_newton")
    default = HETAConfig(samples=samples)
    return {
        "heta_exact": (paper, "scores"),
        "heta_exact_seed1": (paper.replace(seed=1), "scores"),
        "heta_exact_M": (paper, "M"),
        "heta_exact_S": (paper, "S"),
        "heta_exact_I": (paper, "I"),
        "heta_exact_SI": (paper, "SI"),
        "heta_exact_sink_mix": (paper.replace(sink="bos", mix="normalised"), "scores"),
        "heta_gauss_newton": (gn, "scores"),
        "heta_low_rank": (paper.replace(hessian="low_rank"), "scores"),
        "heta_layer_subset": (paper.replace(hessian="layer_subset"), "scores"),
        "heta_gn_M": (gn, "M"),
        "heta_gn_S": (gn, "S"),
        "heta_gn_I": (gn, "I"),
        "heta_gn_SI": (gn, "SI"),
        "heta_gn_sink": (gn.replace(sink="bos"), "scores"),
        "heta_gn_mix": (gn.replace(mix="normalised"), "scores"),
        "heta_gn_mix_SI": (gn.replace(mix="normalised"), "SI"),
        "heta_gn_sink_mix": (gn.replace(sink="bos", mix="normalised"), "scores"),
        # the library's defaults (sink, normalised mix, exact Hessian) and the M variants of issue 25
        "heta_default": (default, "scores"),
        "heta_default_M": (default, "M"),
        "heta_default_S": (default, "S"),
        "heta_default_I": (default, "I"),
        "heta_default_SI": (default, "SI"),
        "heta_default_posnorm": (default.replace(flow="position_normalised"), "scores"),
        "heta_default_posnorm_M": (default.replace(flow="position_normalised"), "M"),
        "heta_default_last4": (default.replace(flow_layers=4), "scores"),
        "heta_fixed": (HETAConfig.preset("fixed", samples=samples), "scores"),
    }


def is_slow(name: str) -> bool:
    """Methods run on the first ``slow_limit`` examples only: the exact Hessian (~4x the cost of
    ``gauss_newton``), the other estimators, and integrated gradients (``IG_STEPS`` backwards)."""
    return (name.startswith(("heta_exact", "heta_default", "heta_low_rank", "heta_layer_subset"))
            or name == "integrated_gradients")


def resolve(names: Sequence[str], samples: int = 10) -> dict[str, Method]:
    """Method names -> callables (ValueError naming an unknown one)."""
    variants = heta_variants(samples)
    out = {}
    for name in names:
        if name in BASELINES:
            out[name] = BASELINES[name]
        elif name in variants:
            out[name] = heta_method(*variants[name])
        else:
            known = ", ".join([*variants, *BASELINES])
            raise ValueError(f"unknown method {name!r}; expected one of {known}")
    return out


def available() -> list[str]:
    """Every method name, HETA variants first."""
    return [*heta_variants(), *BASELINES]
