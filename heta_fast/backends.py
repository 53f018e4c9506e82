"""Backend registry: ``reference`` (the oracle), ``torch`` (fast, exact), ``triton`` (fused kernels).

A ``Backend`` computes the components of one or several targets of a text:
``run_many(lm, ids, targets, config, progress) -> (list[Components], timings)`` and, for one target,
``components(lm, ids [t + 1], config, progress) -> Components``. The fast backends are the one
pipeline (``heta_fast.pipeline``) with different ``Ops``; the reference explains target by target.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from heta_fast import kernels, pipeline, reference
from heta_fast.components import Components, Progress
from heta_fast.config import BACKENDS, HETAConfig
from heta_fast.model import CausalLM


@dataclass(frozen=True)
class Backend:
    """``name`` and the reductions it runs the pipeline with (``ops`` None: the reference)."""

    name: str
    ops: pipeline.Ops | None = None

    def run_many(self, lm: CausalLM, ids: torch.Tensor, targets: Sequence[int], config: HETAConfig,
                 progress: Progress | None = None) -> tuple[list[Components], dict]:
        """Components of the tokens at ``targets`` of ``ids`` ``[L]``, each explained by the tokens before it."""
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
        """Components of the last token of ``ids`` ``[t + 1]`` (context, then the target)."""
        parts, _ = self.run_many(lm, ids, [ids.numel() - 1], config, progress)
        return parts[0]


def _triton_ops() -> pipeline.Ops:
    return pipeline.Ops(linear_kl=kernels.fused_linear_kl, block_l1_mean=kernels.hvp_block_l1_mean,
                        rademacher=kernels.rademacher_triton)


def triton_status(device: torch.device | None = None) -> tuple[bool, str]:
    """Whether the triton backend can run for a model on ``device``, and why not if it cannot."""
    ok, why = kernels.triton_status()
    if ok and device is not None and device.type != "cuda" and "interpreter" not in why:
        return False, f"the model is on {device.type}; the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)"
    return ok, why


def check(name: str, device: torch.device | None = None) -> None:
    """Raise ``ValueError`` naming the reason when backend ``name`` cannot run (before any model work)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    if name == "triton":
        ok, why = triton_status(device)
        if not ok:
            raise ValueError(f"backend 'triton' cannot run: {why}; use backend='torch' (same numbers)")


def resolve(name: str, lm: CausalLM) -> Backend:
    """The backend called ``name``; ``auto`` picks triton for CUDA models where it can run, else torch."""
    check(name, lm.device)
    if name == "reference":
        return Backend("reference")
    if name == "triton" or (name == "auto" and lm.device.type == "cuda" and triton_status(lm.device)[0]):
        return Backend("triton", _triton_ops())
    return Backend("torch", pipeline.TORCH_OPS)
