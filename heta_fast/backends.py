"""Backend registry: ``reference`` (the oracle), ``torch`` (fast, exact), ``triton`` (fused kernels).

Each backend is a module-like object with ``name`` and
``components(lm, ids [t + 1], config, progress) -> Components``.
"""

from __future__ import annotations

from dataclasses import dataclass

from heta_fast.components import Components
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


def resolve(name: str, lm: CausalLM) -> Backend:
    """The backend called ``name``; ``auto`` picks the fastest that can run on ``lm``'s device."""
    if name == "reference":
        return _reference()
    if name in ("auto", "torch"):
        return _torch()
    raise ValueError(f"backend {name!r} is not available yet")
