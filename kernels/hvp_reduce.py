"""Hessian sensitivity ``S`` straight from a batch of HVP results (docs/method.md §2).

Each program reads one probe's own ``d``-block (in place, through strides, so a ``[B, T, d]``
batch of whole HVPs is never gathered or copied), sums ``|.|`` in fp32, divides by ``m`` and
atomically adds the result to ``S[i]``. Atomic fp32 adds make the summation order over the
``m`` samples of a position nondeterministic: results agree with the reference to fp32 rounding,
not bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from heta_fast.checks import check_int
from heta_fast.sensitivity.exact import block_l1_mean as block_l1_mean_torch

from ._common import check_device, check_out, next_pow2

__all__ = ["hvp_block_l1_mean", "block_l1_mean_torch"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@triton.jit
def _block_l1_kernel(hvp_ptr, pos_ptr, out_ptr, d, inv_m, stride_b, stride_t, stride_d, stride_o,
                     HAS_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program per probe row ``b``: ``out[pos[b]] += ||hvp[b, (pos[b],) :]||_1 * inv_m``."""
    b = tl.program_id(0)
    pos = tl.load(pos_ptr + b)  # int64
    base = hvp_ptr + b.to(tl.int64) * stride_b
    if HAS_T:
        base += pos * stride_t  # the probe's own block of the whole HVP
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(0, d, BLOCK_D):
        j = start + tl.arange(0, BLOCK_D)
        x = tl.load(base + j.to(tl.int64) * stride_d, mask=j < d, other=0.0)
        acc += tl.abs(x.to(tl.float32))
    tl.atomic_add(out_ptr + pos * stride_o, tl.sum(acc, axis=0) * inv_m)


def hvp_block_l1_mean(hvp: torch.Tensor, positions: torch.Tensor, n: int, samples: int,
                      out: torch.Tensor | None = None, accumulate: bool = False) -> torch.Tensor:
    """``S_i = (1/m) sum_k ||(H r_{i,k})_i||_1`` from a batch of HVPs, as ``block_l1_mean``.

    hvp: ``[B, d]`` (each row the probe's own block) or ``[B, T, d]`` (whole HVPs; the block is
    row ``positions[b]``), fp16/bf16/fp32/fp64, any strides; positions: int ``[B]`` in ``[0, n)``
    (moved to hvp's device); n: context positions; samples: ``m``. Returns ``[n]`` fp32; positions
    without a probe get 0. ``out``: optional ``[n]`` fp32 buffer; with ``accumulate=True`` the
    batch is added to its contents instead (partial batches summed in place).
    """
    if not isinstance(hvp, torch.Tensor) or hvp.dim() not in (2, 3):
        raise ValueError(f"hvp must be a [B, d] or [B, T, d] tensor, got {getattr(hvp, 'shape', type(hvp))}")
    if hvp.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"hvp must be one of {_FLOAT_DTYPES}, got {hvp.dtype}")
    check_int("n", n, 0)
    check_int("samples", samples, 1)
    positions = torch.as_tensor(positions)
    if positions.dtype.is_floating_point or positions.dtype.is_complex or positions.dtype == torch.bool:
        raise ValueError(f"positions must be an integer tensor, got {positions.dtype}")
    positions = positions.to(device=hvp.device, dtype=torch.int64).reshape(-1).contiguous()
    b = hvp.shape[0]
    if positions.numel() != b:
        raise ValueError(f"positions has {positions.numel()} entries for {b} HVP rows")
    if b:
        lo, hi = int(positions.min()), int(positions.max())
        limit = n if hvp.dim() == 2 else min(n, hvp.shape[1])
        if lo < 0 or hi >= limit:
            what = f"n={n}" if hvp.dim() == 2 else f"n={n} and T={hvp.shape[1]}"
            raise ValueError(f"positions must lie in [0, {limit}) ({what}), got values in [{lo}, {hi}]")
    check_device(hvp=hvp, out=out)
    if out is None:
        out = torch.zeros(n, dtype=torch.float32, device=hvp.device)
    else:
        check_out(out, (n,), torch.float32, hvp.device)
        if not accumulate:
            out.zero_()
    d = hvp.shape[-1]
    if b == 0 or d == 0:
        return out
    has_t = hvp.dim() == 3
    stride_t = hvp.stride(1) if has_t else 0
    block_d = min(next_pow2(d), 2048)
    _block_l1_kernel[(b,)](hvp, positions, out, d, 1.0 / samples, hvp.stride(0), stride_t, hvp.stride(-1),
                           out.stride(0), HAS_T=has_t, BLOCK_D=block_d)
    return out
