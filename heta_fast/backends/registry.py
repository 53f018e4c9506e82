"""The backend registry: each backend's name, its hot reductions (``ops``) and how it runs.

A backend computes ``M, S, I`` for one target (``run``) and, where it shares work between
targets, for several (``run_many``):

- ``reference``: the method written out plainly, one HVP per probe and one masked forward per
  token (``heta_fast.reference``); the oracle. It has no multi-target path (``run_many`` None:
  ``HETA.attribute_targets`` explains its targets one by one).
- ``torch``: the fast path (``heta_fast.torch_backend``, ``heta_fast.multi_target``) with
  ``TORCH_OPS``, the plain torch reductions.
- ``triton``: the same path with ``TRITON_OPS``, the fused kernels of ``heta_fast.kernels``
  (built here, once; the kernels load triton on their first call).

``auto`` is not a backend but a choice: ``resolve`` picks triton for a CUDA model where it can
run, else torch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

from heta_fast import kernels, multi_target, reference, torch_backend
from heta_fast.backends.availability import check, triton_status
from heta_fast.components import Components
from heta_fast.model import CausalLM
from heta_fast.torch_backend import TORCH_OPS, Ops

TRITON_OPS = Ops(linear_kl=kernels.fused_linear_kl, block_l1_mean=kernels.hvp_block_l1_mean,
                 rademacher=kernels.rademacher_triton)


@dataclass(frozen=True)
class Backend:
    """One backend.

    name: as in ``HETAConfig.backend``; ops: the swappable reductions of the fast path (None
    for the reference, which has none); run: ``(lm, ids [t + 1], config, progress) ->
    Components`` for one target; run_many: ``(lm, ids [L], targets, config, progress) ->
    (list[Components], timings)`` for several targets of one text, or None when the backend
    has no shared path.
    """

    name: str
    ops: Ops | None
    run: Callable[..., Components]
    run_many: Callable[..., tuple[list[Components], dict]] | None

    def components(self, lm: CausalLM, ids, config, progress=None) -> Components:
        """``M, S, I`` for ids ``[t + 1]`` (context then target token): ``run``."""
        return self.run(lm, ids, config, progress)

    __call__ = components


def _fast(name: str, ops: Ops) -> Backend:
    return Backend(name, ops, functools.partial(torch_backend.components, ops=ops),
                   functools.partial(multi_target.components_many, ops=ops))


REGISTRY: dict[str, Backend] = {
    "reference": Backend("reference", None, reference.components, None),
    "torch": _fast("torch", TORCH_OPS),
    "triton": _fast("triton", TRITON_OPS),
}
"""Every backend by name (``heta_fast.config.BACKENDS`` without ``auto``)."""


def resolve(name: str, lm: CausalLM) -> Backend:
    """The backend called ``name``; ``auto`` picks triton for CUDA models where it can run, else torch."""
    check(name, lm.device)
    if name == "auto":
        name = "triton" if lm.device.type == "cuda" and triton_status(lm.device)[0] else "torch"
    return REGISTRY[name]
