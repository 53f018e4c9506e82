"""Backend registry: ``reference`` (the oracle), ``torch`` (fast, exact), ``triton`` (fused kernels).

Each backend is a module-like object with ``name`` and
``components(lm, ids [t + 1], config, progress) -> Components``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from heta_fast.components import Components
from heta_fast.config import BACKENDS
from heta_fast.model import CausalLM


@dataclass(frozen=True)
class Backend:
    name: str
    components: object  # (lm, ids, config, progress) -> Components

    def __call__(self, *args, **kwargs) -> Components:
        return self.components(*args, **kwargs)


def _reference() -> Backend:
    from heta_fast import reference

    return Backend("reference", reference.components)


def _torch() -> Backend:
    from heta_fast import torch_backend

    return Backend("torch", torch_backend.components)


def _triton() -> Backend:
    from heta_fast import kernels, torch_backend

    ops = torch_backend.Ops(linear_kl=kernels.fused_linear_kl, block_l1_mean=kernels.hvp_block_l1_mean,
                            rademacher=kernels.rademacher_triton)

    def components(lm, ids, config, progress=None):
        return torch_backend.components(lm, ids, config, progress, ops=ops)

    return Backend("triton", components)


def triton_status(device: torch.device | None = None) -> tuple[bool, str]:
    """Whether the triton backend can run for a model on ``device``, and why not if it cannot."""
    from heta_fast import kernels

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
        return _reference()
    if name == "triton" or (name == "auto" and lm.device.type == "cuda" and triton_status(lm.device)[0]):
        return _triton()
    return _torch()
