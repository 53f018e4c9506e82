"""Tiny random models (no download) and a fresh random seed per test."""

from __future__ import annotations

import os

import pytest
import torch

# Triton's interpreter mode is fixed when triton is first imported, and transformers imports it with
# its model classes: without a GPU, choose the interpreter now so the kernel tests can run on CPU.
if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

VOCAB = 97


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """2 layers, 4 heads, d = 32; GPT-2's fused c_attn/c_proj Conv1D weights, biases, absolute positions."""
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=VOCAB, n_positions=512, bos_token_id=0,
                        eos_token_id=0, initializer_range=0.2, attn_implementation="eager")
    return GPT2LMHeadModel(config).eval()


def tiny_llama(seed: int = 0, layers: int = 3) -> LlamaForCausalLM:
    """3 layers, 4 heads over 2 key/value heads (grouped-query attention), d = 32, RoPE, RMSNorm."""
    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=layers,
                         intermediate_size=64, vocab_size=VOCAB, max_position_embeddings=1024,
                         initializer_range=0.2, attn_implementation="eager")
    return LlamaForCausalLM(config).eval()


MODELS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


@pytest.fixture
def fresh_seed(request) -> int:
    """A new seed every run (fresh random inputs); shown in the failure report."""
    seed = int.from_bytes(os.urandom(4), "little")
    request.node.user_properties.append(("seed", seed))
    print(f"fresh seed: {seed}")
    return seed


@pytest.fixture(params=sorted(MODELS))
def model(request, fresh_seed):
    return MODELS[request.param](fresh_seed % 1000)


def random_ids(seed: int, length: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|b|``: the relative error of a vector, scaled by its largest entry."""
    scale = b.abs().max().clamp_min(1e-30)
    return float((a.double() - b.double()).abs().max() / scale)
