"""Rademacher probes drawn in-kernel, bit for bit equal to ``heta_fast.rng.rademacher``.

The hash is ``lowbias32`` on uint32 values; Triton's uint32 multiply wraps mod 2**32, which is
exactly the arithmetic the torch reference emulates with 16-bit halves. The ``@triton.jit``
helpers ``_hash32``, ``_probe_key`` and ``_probe_sign`` are public to other kernels so they can
draw a probe entry where they need it instead of reading a materialised ``[B, d]`` probe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from heta_fast.checks import check_int
from heta_fast.rng import MASK32, STREAM_PROBE, check_seed
from heta_fast.rng import rademacher as rademacher_torch

from ._common import check_device, check_out, next_pow2

__all__ = ["rademacher_triton", "rademacher_torch", "_hash32", "_probe_key", "_probe_sign"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_STREAM_PROBE = tl.constexpr(STREAM_PROBE)  # the reference's stream tag, visible inside jit functions


@triton.jit
def _hash32(x):
    """``lowbias32`` on a uint32 tensor or scalar (all arithmetic wraps mod 2**32)."""
    x = x ^ (x >> 16)
    x = x * tl.full((), 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full((), 0x846CA68B, tl.uint32)
    return x ^ (x >> 16)


@triton.jit
def _probe_key(seed, position, sample):
    """Row key ``hash(hash(hash(seed ^ STREAM_PROBE) ^ i) ^ k)`` as uint32.

    seed: int scalar in ``[0, 2**32)``; position, sample: int scalars or tensors in ``[0, 2**32)``
    (wider integers are truncated to their low 32 bits, which leaves such values unchanged).
    """
    base = _hash32(tl.cast(seed, tl.uint32) ^ tl.full((), _STREAM_PROBE, tl.uint32))
    key = _hash32(tl.cast(position, tl.uint32) ^ base)
    return _hash32(key ^ tl.cast(sample, tl.uint32))


@triton.jit
def _probe_sign(key, j):
    """Entry ``j`` of the probe with row key ``key``: +1.0 when the hash's top bit is 0, else -1.0 (fp32)."""
    bit = _hash32(key ^ tl.cast(j, tl.uint32)) >> 31
    return 1.0 - 2.0 * bit.to(tl.float32)


@triton.jit(do_not_specialize=["seed"])  # one compiled kernel for every seed
def _rademacher_kernel(out_ptr, pos_ptr, smp_ptr, seed, d, stride_ob, stride_od, BLOCK_D: tl.constexpr):
    """One program per (row, d-block): writes ``out[b, j]`` for ``j`` in the block."""
    b = tl.program_id(0)
    j = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    key = _probe_key(seed, tl.load(pos_ptr + b), tl.load(smp_ptr + b))
    sign = _probe_sign(key, j)
    ptrs = out_ptr + b.to(tl.int64) * stride_ob + j.to(tl.int64) * stride_od
    tl.store(ptrs, sign.to(out_ptr.dtype.element_ty), mask=j < d)


def _as_index(name: str, value, device) -> torch.Tensor:
    t = torch.as_tensor(value, device=device).reshape(-1)
    if t.numel() == 0:  # an empty list arrives as float32
        return t.to(torch.int64)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.numel() and (int(t.min()) < 0 or int(t.max()) > MASK32):
        raise ValueError(f"{name} must lie in [0, 2**32), got values in [{int(t.min())}, {int(t.max())}]")
    return t.to(torch.int64).contiguous()


def rademacher_triton(seed: int, positions, samples, d: int, dtype: torch.dtype = torch.float32,
                      device: torch.device | str | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """The probes ``r_{i,k}`` restricted to their own block, drawn by a Triton kernel.

    positions, samples: int ``[B]``; d: block size. Returns ``[B, d]`` of ``dtype`` with entries in
    {-1, +1}, equal bit for bit to ``heta_fast.rng.rademacher``. ``device`` defaults to the
    positions' device. ``out``: optional ``[B, d]`` tensor of ``dtype`` to write into (any strides).
    """
    check_seed(seed)
    check_int("d", d, 0)
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {_FLOAT_DTYPES}, got {dtype}")
    positions = _as_index("positions", positions, device)
    samples = _as_index("samples", samples, positions.device)
    if positions.shape != samples.shape:
        raise ValueError(f"positions {tuple(positions.shape)} and samples {tuple(samples.shape)} differ in shape")
    check_device(positions=positions)
    b = positions.numel()
    if out is None:
        out = torch.empty(b, d, dtype=dtype, device=positions.device)
    else:
        check_out(out, (b, d), dtype, positions.device)
    if b == 0 or d == 0:
        return out
    block_d = min(next_pow2(d), 1024)
    grid = (b, triton.cdiv(d, block_d))
    _rademacher_kernel[grid](out, positions, samples, seed, d, out.stride(0), out.stride(1), BLOCK_D=block_d)
    return out
