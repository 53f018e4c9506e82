"""``CausalLM``: what HETA needs from a transformers decoder, found once per model.

HETA reads a model at four places: the token embeddings ``E``, each attention layer's
probabilities and value vectors (semantic flow), the output projection slices ``W_O`` per head
(value norms), and the unembedding at the prediction row. This module finds them for the
GPT-2 family (fused ``c_attn``/``c_proj`` Conv1D weights) and the Llama family naming
(``q/k/v/o_proj``; Llama, Mistral, Qwen 2/2.5/3, SmolLM2, with grouped-query attention), and
says exactly what is missing for any other architecture.

The model is switched to eager attention: attention probabilities are only returned by the
eager kernel, and PyTorch's CPU ``sdpa`` has no double backward, which the HVPs need. Grouped-
query families get ``heta_fast.attention``'s eager kernel without key/value copies instead.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from heta_fast.attention import install as install_attention
from heta_fast.attention import stock_attention


@dataclass
class AttentionLayer:
    """One decoder layer as semantic flow sees it.

    value_weight: ``[H_kv * d_h, d]`` (out x in), value_bias: ``[H_kv * d_h]`` or None;
    out_heads: ``[H, d_h, d]``, the slice of the output projection each head writes through.
    """

    block: nn.Module
    attention: nn.Module
    value_module: nn.Module
    value_slice: slice | None  # where the values sit in the module's output (fused qkv)
    value_weight: torch.Tensor
    value_bias: torch.Tensor | None
    out_heads: torch.Tensor


class CausalLM:
    """A frozen, eval-mode view of a transformers causal LM.

    Attributes: ``num_layers`` (N), ``num_heads`` (H), ``num_kv_heads`` (H_kv), ``head_dim``
    (d_h), ``hidden_size`` (d), ``vocab_size`` (V), ``layers`` (one ``AttentionLayer`` each).
    """

    def __init__(self, model: nn.Module):
        _check_causal(model)
        self.model = model
        self.config = model.config
        self.backbone = model.base_model
        self.lm_head = model.get_output_embeddings()
        if not isinstance(self.lm_head, nn.Linear):
            raise TypeError(f"{type(model).__name__}: expected an nn.Linear output embedding (lm_head), "
                            f"got {type(self.lm_head).__name__}")
        self.embedding = model.get_input_embeddings()
        blocks = _find_blocks(model)
        self.num_layers = len(blocks)
        self.layers = [_attention_layer(model, i, block) for i, block in enumerate(blocks)]
        first = self.layers[0]
        self.num_heads = first.out_heads.shape[0]
        self.head_dim = first.out_heads.shape[1]
        self.hidden_size = first.out_heads.shape[2]
        self.num_kv_heads = first.value_weight.shape[0] // self.head_dim
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_heads} attention heads do not divide into {self.num_kv_heads} key/value heads")
        self.vocab_size = self.lm_head.weight.shape[0]
        # transformers renamed `past_key_values` to `cache`; accept both generations
        parameters = inspect.signature(self.backbone.forward).parameters
        self._cache_arg = "cache" if "cache" in parameters else "past_key_values"
        model.eval()
        model.requires_grad_(False)
        self.attention_implementation = install_attention(model)
        self._check_logits_path()

    # -- the pieces every backend uses ---------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings only: ids ``[T]`` -> ``E`` ``[T, d]`` (positions are added inside)."""
        with torch.no_grad():
            return self.embedding(ids.to(self.device)[None])[0]

    def logits(self, embeddings: torch.Tensor) -> torch.Tensor:
        """All logits as the model returns them: ``[B, T, d]`` -> ``[B, T, V]`` (reference path).

        Runs the model's stock eager attention kernel, as the released code does.
        """
        with stock_attention():
            return self.model(inputs_embeds=embeddings, use_cache=False).logits

    def hidden(self, embeddings: torch.Tensor, past=None, output_attentions: bool = False, use_cache: bool = False):
        """The backbone's output (final norm applied): ``[B, T, d]`` in, ``BaseModelOutputWithPast`` out.

        With ``past`` (see ``prefix_cache``) the rows are positions ``past_len ..``.
        """
        kwargs = {} if past is None else {self._cache_arg: past}
        return self.backbone(inputs_embeds=embeddings, use_cache=use_cache or past is not None,
                             output_attentions=output_attentions, **kwargs)

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of the rows given: ``[..., d]`` -> ``[..., V]``."""
        return self.lm_head(hidden)

    @staticmethod
    def key_values(output) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(keys, values)``, each ``[B, H_kv, T, d_h]``, from ``hidden(..., use_cache=True)``."""
        cache = getattr(output, "cache", None) or output.past_key_values
        return [(layer.keys, layer.values) for layer in cache.layers]

    @staticmethod
    def prefix_cache(key_values: list[tuple[torch.Tensor, torch.Tensor]], length: int, batch: int):
        """A fresh cache holding the first ``length`` positions of ``key_values``, repeated ``batch`` times.

        The forward that consumes it appends to new tensors, so ``key_values`` stay untouched.
        """
        from transformers.cache_utils import DynamicCache  # imported on use: transformers takes seconds to load

        data = [(k[:1, :, :length].expand(batch, -1, -1, -1), v[:1, :, :length].expand(batch, -1, -1, -1))
                for k, v in key_values]
        return DynamicCache(ddp_cache_data=data)

    @contextlib.contextmanager
    def capture_values(self, source: str = "attention") -> Iterator[list[torch.Tensor]]:
        """Collect each layer's value vectors during a forward: ``[B, T, H_kv, d_h]`` per layer.

        ``attention``: what the value projection itself outputs (after the input norm, with bias).
        ``residual``: the layer's raw input hidden state times the value weight, no norm, no bias.
        """
        captured: list[torch.Tensor | None] = [None] * self.num_layers
        handles = []

        def store(index: int, values: torch.Tensor) -> None:
            b, t = values.shape[:2]
            captured[index] = values.reshape(b, t, self.num_kv_heads, self.head_dim)

        for index, layer in enumerate(self.layers):
            if source == "attention":
                def hook(_module, _args, output, index=index, layer=layer):
                    store(index, output if layer.value_slice is None else output[..., layer.value_slice])
                handles.append(layer.value_module.register_forward_hook(hook))
            elif source == "residual":
                def pre_hook(_module, args, kwargs, index=index, layer=layer):
                    hidden = args[0] if args else kwargs["hidden_states"]
                    store(index, hidden @ layer.value_weight.T)
                handles.append(layer.block.register_forward_pre_hook(pre_hook, with_kwargs=True))
            else:
                raise ValueError(f"unknown value_source {source!r}; expected 'attention' or 'residual'")
        try:
            yield captured
        finally:
            for handle in handles:
                handle.remove()

    def _check_logits_path(self) -> None:
        """The fast paths compute ``lm_head(backbone(E))``; refuse models whose head does more."""
        ids = torch.tensor([0, min(1, self.vocab_size - 1)], device=self.device)
        with torch.no_grad():
            e = self.embed(ids)[None]
            full = self.model(inputs_embeds=e, use_cache=False).logits
            ours = self.unembed(self.hidden(e).last_hidden_state)
        if not torch.allclose(full.float(), ours.float(), rtol=1e-4, atol=1e-4):
            raise TypeError(f"{type(self.model).__name__}: the logits are not lm_head(base_model(...)) "
                            "(logit scaling or soft-capping); this architecture is not supported")


def _check_causal(model) -> None:
    try:
        # transformers' model code takes seconds to import (1.5-9 s each, measured at load 6): load it on use
        from transformers.modeling_utils import PreTrainedModel
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # (as above)
    except ImportError as error:  # pragma: no cover - transformers is a dependency
        raise ImportError("heta_fast needs transformers: pip install transformers") from error
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"expected a transformers causal language model, got {type(model).__name__}")
    if getattr(model.config, "is_encoder_decoder", False):
        raise TypeError(f"{type(model).__name__} is an encoder-decoder model; HETA explains decoder-only causal LMs")
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if type(model).__name__ not in causal:
        raise TypeError(f"{type(model).__name__} is not a causal language model (not an AutoModelForCausalLM "
                        "class); HETA explains decoder-only causal LMs")


def _find_blocks(model) -> list[nn.Module]:
    backbone = model.base_model
    for name in ("layers", "h"):
        blocks = getattr(backbone, name, None)
        if isinstance(blocks, nn.ModuleList) and len(blocks):
            return list(blocks)
    raise TypeError(f"unsupported architecture {type(model).__name__}: no decoder layer list "
                    f"(expected {type(backbone).__name__}.layers or .h)")


def _attention_layer(model, index: int, block: nn.Module) -> AttentionLayer:
    name = type(model).__name__
    config = model.config
    attention = getattr(block, "self_attn", None) or getattr(block, "attn", None)
    if attention is None:
        raise TypeError(f"unsupported architecture {name}: layer {index} has no self_attn or attn module")
    if all(hasattr(attention, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):  # Llama family
        v_proj, o_proj = attention.v_proj, attention.o_proj
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or o_proj.weight.shape[1] // heads
        d = o_proj.weight.shape[0]
        out_heads = o_proj.weight.T.reshape(heads, head_dim, d)  # o_proj: y = x W^T, x = concat of heads
        return AttentionLayer(block, attention, v_proj, None, v_proj.weight, v_proj.bias, out_heads)
    if hasattr(attention, "c_attn") and hasattr(attention, "c_proj"):  # GPT-2 family: Conv1D, y = x W + b
        if getattr(attention, "is_cross_attention", False):
            raise TypeError(f"unsupported architecture {name}: layer {index} is cross-attention")
        d = attention.c_proj.weight.shape[1]
        heads = attention.num_heads
        value_slice = slice(2 * d, 3 * d)
        bias = attention.c_attn.bias
        return AttentionLayer(block, attention, attention.c_attn, value_slice,
                              attention.c_attn.weight[:, value_slice].T, None if bias is None else bias[value_slice],
                              attention.c_proj.weight.reshape(heads, d // heads, d))
    raise TypeError(f"unsupported architecture {name}: layer {index}'s attention {type(attention).__name__} has "
                    "neither q_proj/k_proj/v_proj/o_proj (Llama family) nor c_attn/c_proj (GPT-2 family)")
