"""Every supported model family, every backend, against explicit computations (issue 9).

One tiny random model per family (``heta_fast.families.SUPPORTED``; Qwen2 with and without its
sliding window), with a context of ``CONTEXT`` tokens, longer than every sliding window here
(``WINDOW``). Each backend's ``M``, ``S`` and ``I`` are compared with computations written out
from the definition on the model as transformers runs it (no cache, stock eager attention):

- ``S`` from the full Hessian of ``log softmax(logits[p])[y]`` with respect to ``E``
  (``torch.autograd.functional.hessian``), its diagonal blocks applied to the probes;
- ``I`` from one full forward per masked row;
- ``M`` from the attention probabilities and value vectors that the model's own attention
  function receives (a spy registered with transformers), rolled out head by head, with each
  head's value norm taken through the output projection module itself (``o(x) - o(0)``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from helpers import SPEC, rel_err
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from heta_fast import HETA, backends, families
from heta_fast.rng import rademacher

VOCAB, WINDOW, CONTEXT, SAMPLES = 97, 4, 11, 2
TOLERANCE = {"M": 1e-4, "I": 1e-4, "S": 1e-3}
_LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                   num_hidden_layers=3, intermediate_size=64, max_position_embeddings=256, initializer_range=0.2,
                   attn_implementation="eager")
_GPT2_LIKE = dict(n_layer=2, n_head=4, n_embd=32, vocab_size=VOCAB, n_positions=256, initializer_range=0.2,
                  bos_token_id=0, eos_token_id=0, attn_implementation="eager")

# case -> (model class, config); soft-capping and logit scales far from 1 so that they matter
CASES = {
    "gpt2": (tf.GPT2LMHeadModel, lambda: tf.GPT2Config(**_GPT2_LIKE)),
    "gpt_bigcode": (tf.GPTBigCodeForCausalLM, lambda: tf.GPTBigCodeConfig(multi_query=True, **_GPT2_LIKE)),
    "gpt_bigcode-mha": (tf.GPTBigCodeForCausalLM, lambda: tf.GPTBigCodeConfig(multi_query=False, **_GPT2_LIKE)),
    "gpt_neox": (tf.GPTNeoXForCausalLM, lambda: tf.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=32, num_attention_heads=4, num_hidden_layers=3, intermediate_size=64,
        max_position_embeddings=256, initializer_range=0.2, rotary_pct=0.5, attention_bias=True,
        bos_token_id=0, eos_token_id=0, attn_implementation="eager")),
    "llama": (tf.LlamaForCausalLM, lambda: tf.LlamaConfig(**_LLAMA_LIKE)),
    "mistral": (tf.MistralForCausalLM, lambda: tf.MistralConfig(sliding_window=WINDOW, **_LLAMA_LIKE)),
    "qwen2": (tf.Qwen2ForCausalLM, lambda: tf.Qwen2Config(**_LLAMA_LIKE)),
    "qwen2-sliding": (tf.Qwen2ForCausalLM, lambda: tf.Qwen2Config(
        use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1, **_LLAMA_LIKE)),
    "qwen3": (tf.Qwen3ForCausalLM, lambda: tf.Qwen3Config(head_dim=8, **_LLAMA_LIKE)),
    "gemma": (tf.GemmaForCausalLM, lambda: tf.GemmaConfig(head_dim=8, **_LLAMA_LIKE)),
    "gemma2": (tf.Gemma2ForCausalLM, lambda: tf.Gemma2Config(
        head_dim=8, sliding_window=WINDOW, final_logit_softcapping=2.0, attn_logit_softcapping=2.0, **_LLAMA_LIKE)),
    "gemma3_text": (tf.Gemma3ForCausalLM, lambda: tf.Gemma3TextConfig(
        head_dim=8, sliding_window=WINDOW, sliding_window_pattern=2, final_logit_softcapping=2.0, **_LLAMA_LIKE)),
    "phi3": (tf.Phi3ForCausalLM, lambda: tf.Phi3Config(sliding_window=WINDOW, pad_token_id=0, bos_token_id=0,
                                                        eos_token_id=0, **_LLAMA_LIKE)),
    "olmo2": (tf.Olmo2ForCausalLM, lambda: tf.Olmo2Config(pad_token_id=0, bos_token_id=0, eos_token_id=0,
                                                          **_LLAMA_LIKE)),
    "cohere": (tf.CohereForCausalLM, lambda: tf.CohereConfig(logit_scale=0.5, pad_token_id=0, bos_token_id=0,
                                                             eos_token_id=0, **_LLAMA_LIKE)),
    "granite": (tf.GraniteForCausalLM, lambda: tf.GraniteConfig(
        logits_scaling=2.0, embedding_multiplier=2.0, attention_multiplier=0.3, residual_multiplier=0.5,
        pad_token_id=0, bos_token_id=0, eos_token_id=0, **_LLAMA_LIKE)),
}
# the module each family's attention writes its heads through (read by name here, not by the adapter)
OUTPUT_PROJECTION = {"gpt2": "attn.c_proj", "gpt_bigcode": "attn.c_proj", "gpt_neox": "attention.dense"}


def build(case: str, seed: int) -> torch.nn.Module:
    cls, config = CASES[case]
    torch.manual_seed(seed)
    return cls(config()).eval()


def test_the_matrix_covers_exactly_the_supported_families():
    assert {cls.config_class.model_type for cls, _ in CASES.values()} == set(families.SUPPORTED)


def test_sliding_windows_are_shorter_than_the_context():
    windowed = {case for case, (_, config) in CASES.items() if getattr(config(), "sliding_window", None)}
    assert windowed == {"mistral", "qwen2-sliding", "gemma2", "gemma3_text", "phi3"}
    assert all(CASES[case][1]().sliding_window < CONTEXT for case in windowed)


# --- explicit computations ---------------------------------------------------------------------


def _blocks(model) -> list[torch.nn.Module]:
    base = model.base_model
    return list(base.layers if hasattr(base, "layers") else base.h)


def explicit_flow(model, E: torch.Tensor) -> torch.Tensor:
    """``M`` from what the model's attention function receives: ``[t]`` for ``E`` ``[t + 1, d]``."""
    seen = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        eager = sys.modules[type(module).__module__].eager_attention_forward
        out, weights = eager(module, query, key, value, attention_mask, **kwargs)
        seen.append((value[0].detach(), weights[0].detach()))
        return out, weights

    AttentionInterface.register("heta_test_spy", spy)
    AttentionMaskInterface.register("heta_test_spy", eager_mask)
    previous = model.config._attn_implementation
    model.set_attn_implementation("heta_test_spy")
    try:
        with torch.no_grad():
            model(inputs_embeds=E[None], use_cache=False)
    finally:
        model.set_attn_implementation(previous)
    family = model.config.model_type
    path = OUTPUT_PROJECTION.get(family, "self_attn.o_proj")
    T = E.shape[0]
    p = T - 2
    heads = model.config.num_attention_heads
    m = torch.zeros(T, dtype=torch.float64)
    rollout = None
    for block, (value, A) in zip(_blocks(model), seen, strict=True):
        out = block.get_submodule(path)
        head_dim = value.shape[-1]
        group = heads // value.shape[0]
        eye = torch.eye(T, dtype=torch.float64)
        A_hat = 0.5 * A.double() + 0.5 * eye
        A_hat = A_hat / A_hat.sum(dim=-1, keepdim=True)
        rollout = A_hat if rollout is None else A_hat @ rollout  # [H, T, T], one chain per head
        for h in range(heads):
            x = torch.zeros(T, heads * head_dim)
            x[:, h * head_dim:(h + 1) * head_dim] = value[h // group]
            with torch.no_grad():
                nu = (out(x) - out(torch.zeros_like(x))).double().abs().sum(dim=-1)
            m += rollout[h, p] * nu
    m = m[:T - 1].clamp_min(0)
    return (m / m.sum()).float()


def explicit_sensitivity(model, E: torch.Tensor, y: int, samples: int, seed: int) -> torch.Tensor:
    """``S`` from the full Hessian of ``g(E) = log softmax(f(E)_p)[y]``: ``[t]``."""
    p = E.shape[0] - 2

    def g(x):
        return torch.log_softmax(model(inputs_embeds=x[None], use_cache=False).logits[0, p].double(), dim=-1)[y]

    H = torch.autograd.functional.hessian(g, E.detach(), vectorize=True)  # [T, d, T, d]
    t, d = E.shape[0] - 1, E.shape[1]
    S = torch.zeros(t, dtype=torch.float64)
    for i in range(t):
        for k in range(samples):
            r = rademacher(seed, torch.tensor([i]), torch.tensor([k]), d)[0]
            S[i] += (H[i, :, i, :].double() @ r.double()).abs().sum()
    return (S / samples).float()


def explicit_kl(model, E: torch.Tensor) -> torch.Tensor:
    """``I`` with the zero mask, one full forward per masked row: ``[t]``."""
    p = E.shape[0] - 2
    with torch.no_grad():
        log_P = torch.log_softmax(model(inputs_embeds=E[None], use_cache=False).logits[0, p].double(), dim=-1)
        out = []
        for i in range(E.shape[0] - 1):
            masked = E.clone()
            masked[i] = 0
            log_Q = torch.log_softmax(model(inputs_embeds=masked[None], use_cache=False).logits[0, p].double(), -1)
            out.append(float((log_P.exp() * (log_P - log_Q)).sum().clamp_min(0)))
    return torch.tensor(out)


def explicit(model, ids: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        E = model.get_input_embeddings()(ids[None])[0].detach()
    return {"M": explicit_flow(model, E), "S": explicit_sensitivity(model, E, int(ids[-1]), SAMPLES, seed),
            "I": explicit_kl(model, E)}


def errors(attribution, oracle: dict[str, torch.Tensor]) -> dict[str, float]:
    return {name: rel_err(getattr(attribution, name), oracle[name]) for name in TOLERANCE}


# --- the matrix ----------------------------------------------------------------------------------

BACKENDS = ["reference", "torch", "triton"]


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    seed = int.from_bytes(os.urandom(4), "little")
    model = build(request.param, seed % 1000)
    ids = torch.randint(0, VOCAB, (CONTEXT + 1,), generator=torch.Generator().manual_seed(seed))
    return request.param, model, ids, seed, explicit(model, ids, seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_matches_explicit_computations(case, backend):
    name, model, ids, seed, oracle = case
    if backend == "triton" and not backends.triton_status(torch.device("cpu"))[0]:
        pytest.skip(backends.triton_status(torch.device("cpu"))[1])
    got = HETA(model, config=SPEC).attribute(ids, backend=backend, samples=SAMPLES, seed=seed)
    assert got.backend == backend
    err = errors(got, oracle)
    assert all(err[k] < TOLERANCE[k] for k in TOLERANCE), f"{name} / {backend} (seed {seed}): {err}"


def test_several_targets_share_the_work_and_match_one_by_one(case):
    name, model, ids, seed, _ = case
    heta = HETA(model, config=SPEC)
    several = heta.attribute(ids, targets=[CONTEXT, 6], backend="torch", samples=1, seed=seed, mask="unk")
    for k, t in enumerate([CONTEXT, 6]):
        row = several[k]
        one = heta.attribute(ids, target_pos=t, backend="torch", samples=1, seed=seed, mask="unk")
        for part in ("M", "S", "I"):
            assert rel_err(getattr(row, part), getattr(one, part)) < 1e-4, (name, t, part)


def test_a_cache_that_keeps_only_the_window_is_caught(monkeypatch):
    """The mutation the matrix exists for: a generation-style cache (last W - 1 positions) fails it."""
    import transformers.cache_utils as cache_module

    model = build("mistral", 3)
    ids = torch.randint(0, VOCAB, (CONTEXT + 1,), generator=torch.Generator().manual_seed(3))
    oracle = explicit(model, ids, 3)
    real = cache_module.DynamicCache

    def generation_cache(*args, **kwargs):
        return real(*args, **kwargs) if args or kwargs else real(config=model.config)

    monkeypatch.setattr(cache_module, "DynamicCache", generation_cache)
    err = errors(HETA(model, config=SPEC).attribute(ids, backend="torch", samples=SAMPLES, seed=3), oracle)
    assert err["S"] > 10 * TOLERANCE["S"] and err["I"] > 10 * TOLERANCE["I"], err


def test_a_token_outside_a_layers_window_receives_no_attention_there():
    model = build("mistral", 1)
    heta = HETA(model, config=SPEC)
    ids = torch.randint(0, VOCAB, (CONTEXT,), generator=torch.Generator().manual_seed(1))
    with heta.lm.prepared(), torch.no_grad():
        out = heta.lm.hidden(heta.lm.embed(ids)[None], output_attentions=True, use_cache=True)
    for A in out.attentions:
        rows, cols = torch.meshgrid(torch.arange(CONTEXT), torch.arange(CONTEXT), indexing="ij")
        assert torch.all(A[0][:, rows - cols >= WINDOW] == 0)
        assert torch.all(A[0][:, (rows - cols < WINDOW) & (rows >= cols)] > 0)


def test_readme_lists_the_supported_families_as_the_module_prints_them():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    listed = readme.split("<!-- families:begin -->\n", 1)[1].split("\n<!-- families:end -->", 1)[0]
    assert listed == families.markdown_table(), "README is stale: paste `python -m heta_fast.families`"
