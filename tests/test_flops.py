"""``heta_fast.flops`` against ``torch.utils.flop_counter.FlopCounterMode`` on tiny random models.

FlopCounterMode counts the matmuls (mm/addmm/bmm) the code actually dispatches, which is what
the analytical model counts. The fast path runs with ``memory_budget=1`` so every batch holds
one position and there is no batching waste, which the analytical count excludes.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from heta_fast import influence, reference
from heta_fast import semantic_flow as flow
from heta_fast.backends import resolve
from heta_fast.config import HETAConfig
from heta_fast.flops import COMPONENTS, ModelSizes, component_flops, total_flops
from heta_fast.model import CausalLM

N_CONTEXT, SAMPLES = 6, 2
TOLERANCE = 0.15  # the brief allows 10-20%; today the counts agree exactly


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=97, n_positions=32,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=97, max_position_embeddings=32,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def tiny(request):
    torch.manual_seed(0)
    lm = CausalLM(_gpt2() if request.param == "gpt2" else _llama())
    ids = torch.randint(0, lm.vocab_size, (N_CONTEXT + 1,))
    with lm.prepared():
        yield lm, ids


def _counted(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def _close(predicted: float, measured: float, tolerance: float = TOLERANCE) -> None:
    assert measured > 0
    assert abs(predicted - measured) <= tolerance * measured, (predicted, measured)


CONFIG = HETAConfig(samples=SAMPLES, memory_budget=1)


def test_fast_forward_and_kl(tiny):
    lm, ids = tiny
    E, t = lm.embed(ids), N_CONTEXT
    predicted = component_flops(lm, N_CONTEXT, SAMPLES, backend="torch")
    state = {}

    def forward():  # the fast backend's shared forward: rows 0 .. p, logits at row p
        out = lm.hidden(E[None, :t], output_attentions=True, use_cache=True)
        state["log_P"] = torch.log_softmax(lm.unembed(out.last_hidden_state[0, -1]).double(), dim=-1)
        state["key_values"] = lm.key_values(out)

    with torch.no_grad():
        _close(predicted["forward"], _counted(forward))
    measured_kl = _counted(lambda: influence.kl_information(lm, E, state["log_P"], state["key_values"], CONFIG, 1))
    _close(predicted["kl"], measured_kl)


def test_reference_kl(tiny):
    lm, ids = tiny
    E = lm.embed(ids)
    predicted = component_flops(lm, N_CONTEXT, SAMPLES, backend="reference")
    _close(predicted["kl"], _counted(lambda: reference.kl_information(lm, E, CONFIG)))


def test_semantic_flow(tiny):
    lm, ids = tiny
    E, t = lm.embed(ids), N_CONTEXT
    with torch.no_grad(), lm.capture_values("attention") as values:
        out = lm.hidden(E[None, :t], output_attentions=True)
    fast = _counted(lambda: flow.semantic_flow(lm, out.attentions, values, None))
    _close(component_flops(lm, N_CONTEXT, SAMPLES, backend="torch")["semantic_flow"], fast)
    ref = _counted(lambda: reference.semantic_flow(lm, E, CONFIG))
    _close(component_flops(lm, N_CONTEXT, SAMPLES, backend="reference")["semantic_flow"], ref)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_components_end_to_end(tiny, backend):
    """A whole backend run, split at its progress calls: checks the Hessian's reverse-mode model
    (build 2L + 3A, HVP 2L + 6A) and that the four components cover everything dispatched."""
    lm, ids = tiny
    marks = {}
    with FlopCounterMode(display=False) as counter:
        def progress(stage, done, total):
            if done == total:
                marks[stage] = float(counter.get_total_flops())

        resolve(backend, lm).components(lm, ids, CONFIG, progress)
        measured_total = float(counter.get_total_flops())
    predicted = component_flops(lm, N_CONTEXT, SAMPLES, backend=backend)
    # progress("semantic_flow") comes after the shared forward and the flow, then hessian, then kl
    _close(predicted["forward"] + predicted["semantic_flow"], marks["semantic_flow"])
    _close(predicted["hessian"], marks["hessian"] - marks["semantic_flow"], 0.2)
    _close(predicted["kl"], measured_total - marks["hessian"])
    _close(total_flops(predicted), measured_total)


def test_shape_of_the_counts():
    # SmolLM2-135M: d=576, 30 layers, 9 heads of 64 (3 kv heads), MLP 1536, V=49152
    d, ffn, layers = 576, 1536, 30
    per_layer = d * d + 2 * d * 192 + d * d + 3 * d * ffn
    sizes = ModelSizes(num_layers=layers, hidden_size=d, num_heads=9, head_dim=64, vocab_size=49152,
                       linear_params=layers * per_layer)
    fast = component_flops(sizes, 64, 10, backend="torch")
    ref = component_flops(sizes, 64, 10, backend="reference")
    assert set(fast) == set(ref) == set(COMPONENTS)
    assert component_flops(sizes, 64, 10, backend="triton") == fast
    assert ref["forward"] == 0.0
    for name in ("semantic_flow", "hessian", "kl"):
        assert ref[name] > fast[name] > 0
    # the fast Hessian and KL run n (n + 1) / 2 rows: about 4x from n to 2n
    for name in ("hessian", "kl"):
        ratio = component_flops(sizes, 128, 10)[name] / fast[name]
        assert 3.5 < ratio < 4.5
    # one fast forward: 2 * 64 rows * P_lin plus one lm_head row, plus attention
    expected = 2 * 64 * layers * per_layer + 2 * d * 49152 + 4 * layers * 9 * 64 * 64 * 64
    assert fast["forward"] == pytest.approx(expected)
    with pytest.raises(ValueError):
        component_flops(sizes, 64, 10, backend="jax")
    with pytest.raises(ValueError):
        component_flops(sizes, 0, 10)
