"""What the tests share: tiny random models (no download), random token ids and a relative error.

Import with ``from helpers import ...``; conftest.py keeps only fixtures and chooses Triton's
interpreter mode before transformers (imported here) loads triton.
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from heta_fast import HETAConfig

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


def random_ids(seed: int, length: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|b|``: the relative error of a vector, scaled by its largest entry."""
    scale = b.abs().max().clamp_min(1e-30)
    return float((a.double() - b.double()).abs().max() / scale)


# The method exactly as docs/method.md defines it. Tests that compare against an explicit
# computation of the definition say so by using it, whatever the library's defaults are.
SPEC = HETAConfig.paper()
