"""``layer_subset``: ``S`` from the curvature with respect to the residual stream entering layer ``s = N - k``.

``h = h^{(s)}`` ``[t, d]`` is the hidden state entering decoder layer ``s`` at rows ``0 .. p``;
``G(h)`` runs layers ``s .. N-1``, the final norm and the unembedding at row ``p`` and returns
``log P[y]``. With ``H^{(s)} = d^2 G / dh^2`` (block ``i``: row ``i`` of ``h``):

    S_i = (1/m) sum_k || (H^{(s)} r_{i,k})_i ||_1,

the method's formula with ``E`` replaced by ``h`` and the same probes. The earlier layers are
treated as fixed: ``h`` is computed once (no grad) and becomes the leaf, so each HVP runs
through ``k`` layers only. The exact path's code (``exact.hessian_sensitivity``) does the HVPs on a view of
the model whose input is ``h`` (layers before ``s`` removed for the call, and layer ``s`` fed
``h`` as given); the prefix cache of the shared forward serves unchanged, because rows before
``i`` of ``h`` and their keys/values do not depend on row ``i``.

With ``k = N`` the leaf is the input of layer 0: ``E`` itself for models that add nothing to
it (Llama family), ``E + position embeddings`` for GPT-2. A constant shift does not change
second derivatives, so ``S`` then equals the exact ``S``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from heta_fast.components import Progress
from heta_fast.rng import rademacher
from heta_fast.sensitivity.exact import block_l1_mean, hessian_sensitivity


class _Stop(Exception):
    """Raised by the capture hook: nothing after layer ``s`` is needed."""


def _blocks_attribute(lm) -> str:
    """The backbone attribute holding the decoder layers that ``CausalLM`` found (``lm.layers``)."""
    first = lm.layers[0].block
    for name, child in lm.backbone.named_children():
        if isinstance(child, nn.ModuleList) and len(child) and child[0] is first:
            return name
    raise TypeError(f"the decoder layers of {type(lm.backbone).__name__} are not one of its module lists")


def _with_hidden_states(args: tuple, kwargs: dict, hidden: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def residual_stream(lm, E: torch.Tensor, start: int) -> torch.Tensor:
    """The hidden state entering decoder layer ``start`` at rows ``0 .. p``: ``[t, d]`` (no grad).

    E: ``[t + 1, d]``. Layers from ``start`` on are not run.
    """
    captured = {}

    def hook(_module, args, kwargs):
        captured["h"] = (args[0] if args else kwargs["hidden_states"])[0].detach().clone()
        raise _Stop

    handle = lm.layers[start].block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad(), contextlib.suppress(_Stop):
            lm.hidden(E[None, :-1])
    finally:
        handle.remove()
    return captured["h"]


class LastLayers:
    """A ``CausalLM`` view whose ``hidden`` takes the residual stream entering layer ``start``.

    ``hidden(h [B, T, d], past)`` runs layers ``start .. N-1`` (and the final norm) with ``h`` as
    layer ``start``'s input; everything else is the wrapped model's. ``num_layers`` is ``N - start``
    so memory estimates count the layers that run. ``past`` is a full ``N``-layer cache; the
    layers before ``start`` neither read nor extend it.
    """

    def __init__(self, lm, start: int):
        self._lm = lm
        self.start = start
        self.num_layers = lm.num_layers - start
        self._attribute = _blocks_attribute(lm)

    def __getattr__(self, name):
        return getattr(self._lm, name)

    @contextlib.contextmanager
    def _from_layer(self, h: torch.Tensor) -> Iterator[None]:
        backbone = self._lm.backbone
        full = getattr(backbone, self._attribute)
        first = self._lm.layers[self.start].block
        # the backbone may add to its input before layer 0 (GPT-2: position embeddings), so layer
        # `start` is handed h itself; the layers before it are left out of the list for the call
        handle = first.register_forward_pre_hook(lambda _m, args, kwargs: _with_hidden_states(args, kwargs, h),
                                                 with_kwargs=True)
        if self.start:
            setattr(backbone, self._attribute, nn.ModuleList(list(full)[self.start:]))
        try:
            yield
        finally:
            handle.remove()
            if self.start:
                setattr(backbone, self._attribute, full)

    def hidden(self, embeddings: torch.Tensor, past=None, output_attentions: bool = False, use_cache: bool = False):
        with self._from_layer(embeddings):
            return self._lm.hidden(embeddings, past=past, output_attentions=output_attentions, use_cache=use_cache)


def layer_subset_sensitivity(lm, E: torch.Tensor, y: int, key_values, config, budget: int,
                             progress: Progress | None = None, rademacher_fn=rademacher,
                             block_l1_fn=block_l1_mean) -> torch.Tensor:
    """``S`` ``[n]`` with respect to the residual stream entering the last ``config.hessian_layers`` layers.

    E: ``[t + 1, d]``; key_values: the shared forward's prefix cache of rows ``0 .. p``;
    rademacher_fn, block_l1_fn: as for ``exact.hessian_sensitivity``, which does the HVPs.
    """
    k = min(config.hessian_layers, lm.num_layers)
    start = lm.num_layers - k
    h = residual_stream(lm, E, start)
    # the exact path reads rows a .. p as E[a:-1]; a placeholder row t keeps its indexing
    h = torch.cat([h, h.new_zeros(1, h.shape[1])])
    return hessian_sensitivity(LastLayers(lm, start), h, y, key_values, config, budget, rademacher_fn, block_l1_fn,
                               progress)
