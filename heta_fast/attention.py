"""Eager attention for grouped-query models without copying keys and values per head.

transformers' eager kernel expands every key/value head to the ``H / H_kv`` query heads that
share it (``repeat_kv``: a copy of K and V per layer), and under the HVPs' double backward that
copy, its gradient (a sum back over the group) and the zero-filled buffers behind it run once
per probe. Here the query heads of a group are stacked along the rows instead:
``[B, H_kv, G * T, d_h] @ [B, H_kv, d_h, S]`` is the same set of dot products, with no copy.
Same probabilities and outputs as the eager kernel (up to fp32 summation order); on
SmolLM2-135M (G = 3) it makes the fast Hessian ~13% faster.

It is registered with transformers under ``ATTENTION_NAME`` and ``CausalLM`` selects it for every
model that can switch its attention: the families whose eager kernel is exactly
``softmax(q k^T * scaling + mask) v`` with repeated key/value heads (``GROUPED_FAMILIES``) take
the grouped path; every other call goes to the model's own eager kernel, as does everything
inside ``stock_attention()``: the reference backend runs the model's stock kernel, as the
released code does.

Because every attention call passes through here, ``record_attention()`` can keep what a call
was given (``AttentionCall``: its queries, keys, mask and options, which grow linearly with the
length) instead of the probabilities it returns (``H x T x S`` per layer): ``AttentionCall.rows``
recomputes any block of rows later with the same kernel. The semantic flow reads the attention
that way, one layer and one block of rows at a time.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

ATTENTION_NAME = "heta_eager"
GROUPED_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3"})

_grouped = contextvars.ContextVar("heta_grouped_attention", default=True)
_recorder: contextvars.ContextVar[list | None] = contextvars.ContextVar("heta_attention_recorder", default=None)


@dataclass(frozen=True)
class AttentionCall:
    """One attention call's inputs, enough to recompute any block of its probability rows."""

    kernel: Callable
    module: nn.Module
    query: torch.Tensor  # [B, H, T, d_h]
    key: torch.Tensor  # [B, H_kv, S, d_h]
    value: torch.Tensor
    attention_mask: torch.Tensor | None  # additive, [B, 1 or H, T, S]
    scaling: float
    kwargs: dict

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """The probabilities of query rows ``start .. stop - 1``: ``[B, H, stop - start, S]``, as the call made them."""
        mask = self.attention_mask
        if mask is None:
            raise RuntimeError("this attention call had no mask; its rows cannot be recomputed one block at a time")
        mask = mask[:, :, start:stop] if mask.shape[2] > 1 else mask
        return self.kernel(self.module, self.query[:, :, start:stop], self.key, self.value, mask,
                           scaling=self.scaling, dropout=0.0, **self.kwargs)[1]


@contextlib.contextmanager
def record_attention() -> Iterator[list[AttentionCall]]:
    """Within the block, every attention call through ``ATTENTION_NAME`` is appended, in call order."""
    calls: list[AttentionCall] = []
    token = _recorder.set(calls)
    try:
        yield calls
    finally:
        _recorder.reset(token)


@contextlib.contextmanager
def stock_attention() -> Iterator[None]:
    """Within the block, every model runs its own eager attention kernel."""
    token = _grouped.set(False)
    try:
        yield
    finally:
        _grouped.reset(token)


def grouped_eager_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                            **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' attention-function signature.

    query: ``[B, H, T, d_h]``; key, value: ``[B, H_kv, S, d_h]``; attention_mask: additive,
    broadcastable to ``[B, H, T, S]``. Returns the output ``[B, T, H, d_h]`` and the
    probabilities ``[B, H, T, S]``.
    """
    h, h_kv = query.shape[1], key.shape[1]
    family = getattr(getattr(module, "config", None), "model_type", None)
    kernel = _grouped_kernel
    if not _grouped.get() or h == h_kv or family not in GROUPED_FAMILIES:
        kernel = sys.modules[type(module).__module__].eager_attention_forward
    calls = _recorder.get()
    if calls is not None:
        calls.append(AttentionCall(kernel, module, query, key, value, attention_mask, scaling, kwargs))
    return kernel(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def _grouped_kernel(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                    attention_mask: torch.Tensor | None, scaling: float, dropout: float = 0.0,
                    **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """The grouped path of ``grouped_eager_attention`` (a group's query heads stacked along the rows)."""
    b, h, t, d_h = query.shape
    h_kv, s = key.shape[1], key.shape[2]
    g = h // h_kv
    # head j*g + r reads key/value head j (repeat_kv's order), so a group's queries are consecutive
    scores = torch.matmul(query.reshape(b, h_kv, g * t, d_h), key.transpose(2, 3)).view(b, h, t, s) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights.view(b, h_kv, g * t, s), value).view(b, h, t, d_h)
    return out.transpose(1, 2).contiguous(), weights


def select(model: nn.Module) -> str:
    """The attention implementation HETA runs ``model`` with: ``ATTENTION_NAME`` where the model can
    switch to it (the grouped path where it helps, the model's own eager kernel otherwise), else ``eager``.

    Registers ``ATTENTION_NAME`` with transformers when chosen; does not change the model
    (``CausalLM.prepared`` switches to it for the duration of a call).
    """
    if not hasattr(model, "set_attn_implementation"):
        return "eager"
    # transformers' model code takes seconds to import (1.5-9 s each, measured at load 6): load it on use
    from transformers.masking_utils import AttentionMaskInterface, eager_mask
    from transformers.modeling_utils import AttentionInterface  # (as above)

    AttentionInterface.register(ATTENTION_NAME, grouped_eager_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, eager_mask)
    return ATTENTION_NAME
