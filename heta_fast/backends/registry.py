"""The backend registry: each backend's name, its hot reductions (``ops``) and how it runs.

A backend computes ``M, S, I`` for the targets of one text: ``run_many(lm, ids [L], targets,
config, progress) -> (list[Components], timings)``; ``components`` is its one-target case.

- ``reference``: the method written out plainly, one HVP per probe and one masked forward per
  token (``heta_fast.reference``); the oracle. It explains several targets one by one.
- ``torch``: the fast path (``heta_fast.pipeline``) with ``TORCH_OPS``, the plain torch reductions.
- ``triton``: the same pipeline with ``TRITON_OPS``, the fused kernels of ``heta_fast.kernels``
  through ``heta_fast.backends.triton_kernels`` (built here, once; the kernels load triton on
  their first call).

``auto`` is not a backend but a choice: ``resolve`` picks triton for a CUDA model where it can
run, else torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from heta_fast import pipeline, reference
from heta_fast.backends import triton_kernels as kernels
from heta_fast.backends.availability import check, triton_status
from heta_fast.components import Components, Progress
from heta_fast.config import HETAConfig
from heta_fast.model import CausalLM
from heta_fast.pipeline import TORCH_OPS, Ops

TRITON_OPS = Ops(linear_kl=kernels.fused_linear_kl, block_l1_mean=kernels.hvp_block_l1_mean,
                 rademacher=kernels.rademacher_triton)


@dataclass(frozen=True)
class Backend:
    """One backend: ``name`` as in ``HETAConfig.backend``, and the reductions it runs the pipeline
    with (``ops`` None: the reference, which runs ``heta_fast.reference`` target by target)."""

    name: str
    ops: Ops | None

    def run_many(self, lm: CausalLM, ids: torch.Tensor, targets: Sequence[int], config: HETAConfig,
                 progress: Progress | None = None) -> tuple[list[Components], dict]:
        """Components of the tokens at ``targets`` of ``ids`` ``[L]``, each explained by the tokens before it,
        and the call's timings."""
        if self.ops is not None:
            return pipeline.run(lm, ids, targets, config, progress, self.ops)
        parts = [reference.components(lm, ids[:t + 1], config, progress) for t in targets]
        timings: dict = {}
        for part in parts:
            for stage, seconds in part.timings.items():
                timings[stage] = timings.get(stage, 0.0) + seconds
        return parts, timings

    def components(self, lm: CausalLM, ids: torch.Tensor, config: HETAConfig,
                   progress: Progress | None = None) -> Components:
        """``M, S, I`` for ids ``[t + 1]`` (context, then the target token): ``run_many`` with one target."""
        parts, _ = self.run_many(lm, ids, [ids.numel() - 1], config, progress)
        return parts[0]

    __call__ = components


REGISTRY: dict[str, Backend] = {
    "reference": Backend("reference", None),
    "torch": Backend("torch", TORCH_OPS),
    "triton": Backend("triton", TRITON_OPS),
}
"""Every backend by name (``heta_fast.config.BACKENDS`` without ``auto``)."""


def resolve(name: str, lm: CausalLM) -> Backend:
    """The backend called ``name``; ``auto`` picks triton for CUDA models where it can run, else torch."""
    check(name, lm.device)
    if name == "auto":
        name = "triton" if lm.device.type == "cuda" and triton_status(lm.device)[0] else "torch"
    return REGISTRY[name]
