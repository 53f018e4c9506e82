"""Whether a backend can run for a model on a given device, checked before any model work."""

from __future__ import annotations

import torch

from heta_fast.backends import triton_kernels
from heta_fast.config import BACKENDS


def triton_status(device: torch.device | None = None) -> tuple[bool, str]:
    """Whether the triton backend can run for a model on ``device``, and why not if it cannot."""
    ok, why = triton_kernels.triton_status()
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
