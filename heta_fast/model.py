"""``CausalLM``: what HETA needs from a transformers decoder, found once per model.

HETA reads a model at four places: the token embeddings ``E``, each attention layer's
probabilities and value vectors (semantic flow), the output projection slices ``W_O`` per head
(value norms), and the unembedding at the prediction row (with the model's own logit scaling or
soft-capping). This module finds them for every family in ``heta_fast.families`` and refuses any
other with a ``TypeError`` that lists them.

The user's model is left as it was found. Each call runs inside ``CausalLM.prepared()``, which
for its duration puts the model in eval mode, freezes its parameters, selects eager attention
(attention probabilities are only returned by the eager kernel, and PyTorch's CPU ``sdpa`` has
no double backward, which the HVPs need; grouped-query families get ``heta_fast.attention``'s
kernel without key/value copies) and, for bf16/fp16 models, swaps the weights for float32 copies
so that curvature, KL and flow are computed in float32 (memory: 4 bytes per parameter more
while a call runs). Everything is restored when the block exits, also on an exception.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from heta_fast.attention import select as select_attention
from heta_fast.attention import stock_attention
from heta_fast.families import check_family, supported_text

HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass
class AttentionLayer:
    """One decoder layer as semantic flow sees it.

    The weights are read from the modules on every access (never cached), so they follow the
    float32 swap of ``CausalLM.prepared`` and any update the user makes to the model.
    value_weight: ``[H_kv * d_h, d]`` (out x in), value_bias: ``[H_kv * d_h]`` or None;
    out_heads: ``[H, d_h, d]``, the slice of the output projection each head writes through.
    """

    block: nn.Module
    attention: nn.Module
    value_module: nn.Module
    value_columns: slice | torch.Tensor | None  # where the values sit in the module's output (None: all of it)
    out_module: nn.Module
    heads: int

    @property
    def value_weight(self) -> torch.Tensor:
        weight = _out_in(self.value_module)
        return weight if self.value_columns is None else weight[self.value_columns]

    @property
    def value_bias(self) -> torch.Tensor | None:
        bias = self.value_module.bias
        return bias if bias is None or self.value_columns is None else bias[self.value_columns]

    @property
    def out_heads(self) -> torch.Tensor:
        out = _out_in(self.out_module)  # [d, H * d_h]
        return out.T.reshape(self.heads, out.shape[1] // self.heads, out.shape[0])


@dataclass(frozen=True)
class LogitMap:
    """What the model does to ``lm_head``'s output, from its config: ``z -> cap * tanh(scale * z / cap)``.

    scale: Cohere's ``logit_scale`` (times) or Granite's ``logits_scaling`` (divided by), else 1;
    softcap: Gemma 2/3's ``final_logit_softcapping`` or None. ``linear`` when there is no cap: the
    logits are then ``scale * (h W^T + b)``, which the fused KL reductions use directly.
    """

    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def from_config(cls, config) -> LogitMap:
        scale = 1.0
        if getattr(config, "logit_scale", None) is not None:
            scale *= float(config.logit_scale)
        if getattr(config, "logits_scaling", None) is not None:
            scale /= float(config.logits_scaling)
        softcap = getattr(config, "final_logit_softcapping", None)
        return cls(scale, None if softcap is None else float(softcap))

    @property
    def linear(self) -> bool:
        return self.softcap is None

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


class CausalLM:
    """A view of a transformers causal LM with what HETA reads from it.

    Attributes: ``num_layers`` (N), ``num_heads`` (H), ``num_kv_heads`` (H_kv), ``head_dim``
    (d_h), ``hidden_size`` (d), ``vocab_size`` (V), ``layers`` (one ``AttentionLayer`` each),
    ``family`` (the ``model_type``), ``position_limit`` (the longest input the model's positions
    allow, or None), ``logit_map``. Building it does not change the model; see ``prepared``.
    """

    def __init__(self, model: nn.Module):
        _check_causal(model)
        self.family = check_family(model)
        self.model = model
        self.config = model.config
        self.backbone = model.base_model
        self.lm_head = model.get_output_embeddings()
        if not isinstance(self.lm_head, nn.Linear):
            raise TypeError(f"{type(model).__name__}: expected an nn.Linear output embedding (lm_head), "
                            f"got {type(self.lm_head).__name__}")
        self.embedding = model.get_input_embeddings()
        self.blocks = _find_blocks(model)
        self.num_layers = len(self.blocks)
        self.layers = [_attention_layer(model, i, block) for i, block in enumerate(self.blocks)]
        heads = self.layers[0].out_heads
        self.num_heads, self.head_dim, self.hidden_size = heads.shape
        self.num_kv_heads = self.layers[0].value_weight.shape[0] // self.head_dim
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_heads} attention heads do not divide into {self.num_kv_heads} key/value heads")
        self.vocab_size = self.lm_head.weight.shape[0]
        self.position_limit = _position_limit(model.config)
        self.logit_map = LogitMap.from_config(model.config)
        # transformers renamed `past_key_values` to `cache`; accept both generations
        parameters = inspect.signature(self.backbone.forward).parameters
        self._cache_arg = "cache" if "cache" in parameters else "past_key_values"
        self.attention_implementation = select_attention(model)
        self._depth = 0
        self._lock = threading.RLock()
        with self.prepared():
            self._check_logits_path()

    @contextlib.contextmanager
    def prepared(self) -> Iterator[CausalLM]:
        """Within the block: eval mode, frozen parameters, eager attention, float32 weights; restored after.

        Re-entrant (nested blocks change and restore once, at the outermost). A bf16/fp16 model's
        parameters and buffers are swapped for float32 copies of themselves; the originals are put
        back, so nothing is rounded twice.
        """
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self
                finally:
                    self._depth -= 1
                return
            model = self.model
            modes = [(module, module.training) for module in model.modules()]
            frozen = [(p, p.requires_grad) for p in model.parameters()]
            attention = model.config._attn_implementation
            swapped: list[tuple[object, torch.Tensor]] = []
            try:
                model.eval()
                model.requires_grad_(False)
                _set_attention(model, self.attention_implementation)
                for p in model.parameters():
                    if p.dtype in HALF_DTYPES:
                        swapped.append((p, p.data))
                        p.data = p.data.float()
                for module in model.modules():
                    for name, buffer in module._buffers.items():
                        if buffer is not None and buffer.dtype in HALF_DTYPES:
                            swapped.append(((module, name), buffer))
                            module._buffers[name] = buffer.float()
                self._depth = 1
                yield self
            finally:
                self._depth = 0
                for owner, original in reversed(swapped):
                    if isinstance(owner, tuple):
                        owner[0]._buffers[owner[1]] = original
                    else:
                        owner.data = original
                _set_attention(model, attention)
                for p, flag in frozen:
                    p.requires_grad_(flag)
                for module, flag in modes:
                    module.training = flag

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
        if past is None and use_cache:
            # A cache of full-length layers: the model's own cache keeps only the last W - 1
            # positions of a sliding-window layer, and every masked forward and HVP slices this one
            # by absolute position. The window is still applied, by the attention mask.
            past = DynamicCache()
        kwargs = {} if past is None else {self._cache_arg: past}
        return self.backbone(inputs_embeds=embeddings, use_cache=use_cache or past is not None,
                             output_attentions=output_attentions, **kwargs)

    def unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of the rows given, as the model makes them: ``[..., d]`` -> ``[..., V]``."""
        return self.logit_map(self.lm_head(hidden))

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
                    store(index, output if layer.value_columns is None else output[..., layer.value_columns])
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
            raise TypeError(f"{type(self.model).__name__}: its logits are not lm_head(base_model(...)) with the "
                            f"config's scaling and soft-capping ({self.logit_map}); this model is not supported")


def _set_attention(model: nn.Module, name: str) -> None:
    if getattr(model.config, "_attn_implementation", None) == name:
        return
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # older transformers
        model.config._attn_implementation = name


def _position_limit(config) -> int | None:
    """The longest sequence the model's positions allow: ``max_position_embeddings`` (``n_positions``)."""
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def _check_causal(model) -> None:
    try:
        from transformers import PreTrainedModel
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
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
                    f"(expected {type(backbone).__name__}.layers or .h); {supported_text()}")


def _out_in(module: nn.Module) -> torch.Tensor:
    """A projection's weight as ``[out, in]``: ``nn.Linear`` stores it so, GPT-2's ``Conv1D`` transposed."""
    if isinstance(module, nn.Linear):
        return module.weight
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: y = x W + b, W [in, out]
        return module.weight.T
    raise TypeError(f"expected an nn.Linear or Conv1D projection, got {type(module).__name__}")


def _layer(block, attention, value_module, columns, out_module, heads: int) -> AttentionLayer:
    """An ``AttentionLayer`` whose values are ``columns`` of ``value_module``'s output (None: all of it)."""
    _out_in(value_module), _out_in(out_module)  # both must be projections this module can read
    return AttentionLayer(block, attention, value_module, columns, out_module, heads)


def _interleaved_values(heads: int, head_dim: int) -> torch.Tensor:
    """Value columns of a fused projection laid out per head as ``[q_h | k_h | v_h]`` (GPT-NeoX, GPTBigCode MHA)."""
    per_head = torch.arange(2 * head_dim, 3 * head_dim)
    return (torch.arange(heads)[:, None] * 3 * head_dim + per_head).reshape(-1)


def _attention_layer(model, index: int, block: nn.Module) -> AttentionLayer:
    name = type(model).__name__
    config = model.config
    attention = next((getattr(block, a) for a in ("self_attn", "attn", "attention") if hasattr(block, a)), None)
    if attention is None:
        raise TypeError(f"unsupported architecture {name}: layer {index} has no self_attn, attn or attention "
                        f"module; {supported_text()}")
    if getattr(attention, "is_cross_attention", False):
        raise TypeError(f"unsupported architecture {name}: layer {index} is cross-attention")
    heads = config.num_attention_heads
    if all(hasattr(attention, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj")):  # Llama naming
        return _layer(block, attention, attention.v_proj, None, attention.o_proj, heads)
    if hasattr(attention, "qkv_proj") and hasattr(attention, "o_proj"):  # Phi-3: [q | k | v] along the output
        head_dim = attention.head_dim
        kv = attention.num_key_value_heads * head_dim
        q = heads * head_dim
        return _layer(block, attention, attention.qkv_proj, slice(q + kv, q + 2 * kv), attention.o_proj, heads)
    if hasattr(attention, "query_key_value") and hasattr(attention, "dense"):  # GPT-NeoX: per-head [q|k|v]
        head_dim = attention.head_size
        return _layer(block, attention, attention.query_key_value, _interleaved_values(heads, head_dim),
                      attention.dense, heads)
    if hasattr(attention, "c_attn") and hasattr(attention, "c_proj"):
        d = _out_in(attention.c_proj).shape[0]
        if isinstance(attention.c_attn, nn.Linear):  # GPTBigCode
            head_dim = attention.head_dim
            if getattr(attention, "multi_query", False):  # [q (d) | k (d_h) | v (d_h)]
                columns = slice(d + head_dim, d + 2 * head_dim)
            else:
                columns = _interleaved_values(heads, head_dim)
            return _layer(block, attention, attention.c_attn, columns, attention.c_proj, heads)
        return _layer(block, attention, attention.c_attn, slice(2 * d, 3 * d), attention.c_proj, heads)  # GPT-2
    raise TypeError(f"unsupported architecture {name}: layer {index}'s attention {type(attention).__name__} has no "
                    f"projections this project knows; {supported_text()}")
