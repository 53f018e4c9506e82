"""Input checks shared by the kernel wrappers."""

from __future__ import annotations

import os

import torch


def interpret_enabled() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET``)."""
    try:
        from triton import knobs

        return bool(knobs.runtime.interpret)
    except (ImportError, AttributeError):  # older triton: the knob is read from the env var
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes", "y")


def next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def check_device(**tensors: torch.Tensor | None) -> torch.device:
    """All tensors on one device, and one Triton can run on: CUDA, or CPU under the interpreter."""
    given = {name: t for name, t in tensors.items() if t is not None}
    devices = {t.device for t in given.values()}
    if len(devices) > 1:
        where = ", ".join(f"{name} on {t.device}" for name, t in given.items())
        raise ValueError(f"tensors must share one device, got {where}")
    device = devices.pop()
    if device.type == "cpu" and not interpret_enabled():
        raise ValueError("CPU tensors need TRITON_INTERPRET=1 (Triton's CPU interpreter); move them to CUDA")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {device}; Triton kernels here run on CUDA (or CPU when interpreted)")
    return device


def check_out(out: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"out must be a tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        raise ValueError(f"out must be {tuple(shape)} {dtype} on {device}, "
                         f"got {tuple(out.shape)} {out.dtype} on {out.device}")
