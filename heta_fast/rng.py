"""Counter-based random numbers: the Rademacher probes and the `unk` mask vectors.

Every random number HETA uses is a pure function of ``(seed, stream, i, k, j)``: the seed, a
stream tag, the context position ``i``, the sample index ``k`` and the entry ``j`` inside the
``d``-vector. No generator state is carried, so every backend, batch size, evaluation order and
device draws the same numbers, and the Triton kernels recompute them in-kernel bit for bit.

The mixing function is a 32-bit integer hash (``lowbias32``: xor-shift, multiply, xor-shift,
multiply, xor-shift). In torch it runs on int64 tensors holding values in ``[0, 2**32)``; the
32-bit products are split into 16-bit halves so that no intermediate exceeds 2**49 (int64
overflow is undefined in C++, so we never rely on wrap-around).

``kernels/probes.py`` (``heta_fast.kernels.probes``) is this module's Triton twin: the same
hash and probes drawn inside a kernel, bit for bit equal.
"""

from __future__ import annotations

import math

import torch

from heta_fast.checks import check_int

MASK32 = 0xFFFFFFFF
HASH_MUL_1 = 0x7FEB352D
HASH_MUL_2 = 0x846CA68B
STREAM_PROBE = 0x68657461  # "heta"
STREAM_UNK = 0x756E6B21  # "unk!"
UNK_STD = 0.01


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """``(x * c) mod 2**32`` for int64 ``x`` in ``[0, 2**32)`` without int64 overflow."""
    lo = x & 0xFFFF
    hi = x >> 16
    return (lo * c + ((hi * (c & 0xFFFF)) << 16)) & MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """The ``lowbias32`` integer hash on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, HASH_MUL_1)
    x = x ^ (x >> 15)
    x = _mul32(x, HASH_MUL_2)
    return x ^ (x >> 16)


def hash32_int(x: int) -> int:
    """``hash32`` on a Python int (used for the scalar part of the key)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * HASH_MUL_1) & MASK32
    x ^= x >> 15
    x = (x * HASH_MUL_2) & MASK32
    return x ^ (x >> 16)


def check_seed(seed: int) -> int:
    """``seed`` when it is an int in ``[0, 2**32)``, else ``TypeError``/``ValueError``."""
    return check_int("seed", seed, 0, MASK32, what="seed must lie in [0, 2**32)")


def _row_keys(seed: int, stream: int, positions: torch.Tensor, samples: torch.Tensor | None) -> torch.Tensor:
    """Per-row key ``hash(hash(hash(seed ^ stream) ^ i) ^ k)``; int64 ``[B]``."""
    base = hash32_int(check_seed(seed) ^ stream)
    key = hash32(positions.to(torch.int64) ^ base)
    if samples is not None:
        key = hash32(key ^ samples.to(torch.int64))
    return key


def rademacher(seed: int, positions: torch.Tensor, samples: torch.Tensor, d: int,
               dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
    """The probes ``r_{i,k}`` restricted to their own block.

    positions, samples: int ``[B]`` (position ``i`` and sample ``k`` of each row).
    Returns ``[B, d]`` with entries in {-1, +1}: entry ``j`` is ``+1`` when the top bit of
    ``hash(key(i, k) ^ j)`` is 0, else ``-1``.
    """
    positions = torch.as_tensor(positions, device=device).reshape(-1)
    samples = torch.as_tensor(samples, device=positions.device).reshape(-1)
    if positions.shape != samples.shape:
        raise ValueError(f"positions {tuple(positions.shape)} and samples {tuple(samples.shape)} differ in shape")
    key = _row_keys(seed, STREAM_PROBE, positions, samples)
    j = torch.arange(d, dtype=torch.int64, device=positions.device)
    bits = hash32(key[:, None] ^ j[None, :]) >> 31
    return (1 - 2 * bits).to(dtype)


def unk_vectors(seed: int, positions: torch.Tensor, d: int, dtype: torch.dtype = torch.float32,
                device: torch.device | str | None = None) -> torch.Tensor:
    """The ``unk`` mask vectors, N(0, 0.01**2) per entry, one per position; ``[B, d]``.

    Box-Muller on two counter-based uniforms per entry (entries ``2j`` and ``2j + 1`` of the
    position's stream), computed in float64 and cast to ``dtype``.
    """
    positions = torch.as_tensor(positions, device=device).reshape(-1)
    key = _row_keys(seed, STREAM_UNK, positions, None)
    j = torch.arange(d, dtype=torch.int64, device=positions.device)
    u1 = (hash32(key[:, None] ^ (2 * j)[None, :]).double() + 0.5) / 2.0**32
    u2 = (hash32(key[:, None] ^ (2 * j + 1)[None, :]).double() + 0.5) / 2.0**32
    z = torch.sqrt(-2.0 * torch.log(u1)) * torch.cos(2.0 * math.pi * u2)
    return (UNK_STD * z).to(dtype)
