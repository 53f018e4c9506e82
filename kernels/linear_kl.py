"""Fused ``KL(P || softmax(hidden @ weight.T + bias))`` over vocabulary tiles (docs/method.md §3).

The logits of a ``[BLOCK_B, BLOCK_V]`` tile live only in registers: each tile is folded into an
online log-sum-exp and into the cross term ``sum_v P_v (log P_v - z_v)``, and
``KL_b = cross_b + (sum_v P_v) * LSE_b(z)``, the log-softmax form rearranged (as ``linear_kl``).
No ``B x V`` buffer exists; extra memory is a ``[3, S, B]`` fp64 table of per-split partials
(``S`` vocabulary splits, chosen to fill the GPU, at most a few hundred) and the ``[B]`` output.

Precision: the matmul accumulates in fp32 (fp32 inputs use IEEE fp32 products by default, like
torch with TF32 off); the per-logit epilogue runs in fp32 on logits shifted by the running
maximum, and tiles and splits are combined in fp64. Relative error is ~1e-7 for ordinary KL
values; when ``Q_b`` is almost ``P`` the fp32 ``exp`` bounds the absolute error at ~1e-7 (the torch
reference, fp64 per logit, resolves KL values below that).

Two launches: ``_kl_partial_kernel`` over ``(B blocks, S splits)`` and ``_kl_combine_kernel``
over B blocks, which merges the ``S`` partials per row and writes the fp32 result.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from heta_fast.kl import linear_kl as linear_kl_torch

from ._common import check_device, check_out, interpret_enabled, next_pow2

__all__ = ["fused_linear_kl", "linear_kl_torch"]

_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_PRECISIONS = ("ieee", "tf32x3", "tf32")


@triton.jit
def _kl_partial_kernel(h_ptr, w_ptr, bias_ptr, lp_ptr, ws_ptr, B, V, D, tiles_per_split,
                       s_hb, s_hd, s_wv, s_wd, s_bias, s_lp,
                       HAS_BIAS: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                       BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """Partials of rows ``[pid_b * BLOCK_B, +BLOCK_B)`` over the vocabulary tiles of split ``pid_s``.

    ws layout (fp64): ``max[S, B]``, ``sum[S, B]`` (of ``exp(z - max)``), ``cross[S, B]``, ``psum[S]``.
    """
    pid_b = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_split = tl.num_programs(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    rows64 = rows.to(tl.int64)
    run_max = tl.full([BLOCK_B], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_B], tl.float64)
    cross = tl.zeros([BLOCK_B], tl.float64)
    p_total = tl.full((), 0.0, tl.float64)
    t_start = pid_s * tiles_per_split
    t_stop = tl.minimum(t_start + tiles_per_split, tl.cdiv(V, BLOCK_V))  # every split holds >= 1 tile
    for t in range(t_start, t_stop):
        cols = t * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < V
        cols64 = cols.to(tl.int64)  # V * d can pass 2**31
        acc = tl.zeros([BLOCK_B, BLOCK_V], tl.float32)
        for k in range(0, D, BLOCK_D):
            ks = k + tl.arange(0, BLOCK_D)
            k_ok = ks < D
            h = tl.load(h_ptr + rows64[:, None] * s_hb + ks[None, :] * s_hd,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + cols64[None, :] * s_wv + ks[:, None] * s_wd,
                        mask=col_ok[None, :] & k_ok[:, None], other=0.0)
            if UPCAST:  # the interpreter multiplies bf16 as raw uint16; bf16 products are exact in fp32
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(h, w, acc, input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols64 * s_bias, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        lp = tl.load(lp_ptr + cols64 * s_lp, mask=col_ok, other=float("-inf")).to(tl.float32)
        p = tl.exp(lp)  # 0 on the ragged tail
        z = tl.where(col_ok[None, :], acc, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        tile_sum = tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_sum = run_sum * tl.exp(run_max - new_max).to(tl.float64) + tile_sum.to(tl.float64)
        run_max = new_max
        # cross += sum_v P_v (log P_v - z_v), taken as sum_v P_v (log P_v - (z_v - max)) - P_tile * max: the
        # fp32 terms are then O(log V) rather than O(|z|), and the O(|z|) part is exact in fp64.
        # The same fp32 P_v enter cross and psum, so their rounding cancels to first order in the KL.
        # P_v = 0 contributes 0 (0 log 0 = 0); this also drops the ragged tail.
        lp_or_0 = tl.where(p > 0.0, lp, 0.0)
        term = p[None, :] * (lp_or_0[None, :] - (acc - new_max[:, None]))
        tile_p = tl.sum(p, axis=0)
        cross += tl.sum(term, axis=1).to(tl.float64) - tile_p.to(tl.float64) * new_max.to(tl.float64)
        p_total += tile_p.to(tl.float64)
    offs = pid_s * B + rows
    plane = n_split * B
    tl.store(ws_ptr + offs, run_max.to(tl.float64), mask=row_ok)
    tl.store(ws_ptr + plane + offs, run_sum, mask=row_ok)
    tl.store(ws_ptr + 2 * plane + offs, cross, mask=row_ok)
    tl.store(ws_ptr + 3 * plane + pid_s, p_total)  # every row block writes the same value


@triton.jit
def _kl_combine_kernel(ws_ptr, out_ptr, B, S, stride_o, BLOCK_B: tl.constexpr):
    """``out[b] = max(0, sum_s cross + (sum_s psum) * LSE_b)`` merging the ``S`` split partials."""
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    ok = rows < B
    plane = S * B
    m = tl.full([BLOCK_B], float("-inf"), tl.float64)
    for s in range(0, S):
        m = tl.maximum(m, tl.load(ws_ptr + s * B + rows, mask=ok, other=0.0))
    total = tl.zeros([BLOCK_B], tl.float64)
    cross = tl.zeros([BLOCK_B], tl.float64)
    p_total = tl.full((), 0.0, tl.float64)
    for s in range(0, S):
        mx = tl.load(ws_ptr + s * B + rows, mask=ok, other=0.0)
        sm = tl.load(ws_ptr + plane + s * B + rows, mask=ok, other=1.0)  # 1: no log(0) on padding rows
        total += sm * tl.exp((mx - m).to(tl.float32)).to(tl.float64)
        cross += tl.load(ws_ptr + 2 * plane + s * B + rows, mask=ok, other=0.0)
        p_total += tl.load(ws_ptr + 3 * plane + s)
    # Transcendentals in fp32 (fp64 ones are slow on GPUs); both arguments are O(1) here.
    lse = m + tl.log(total.to(tl.float32)).to(tl.float64)
    kl = cross + p_total * lse
    kl = tl.where(kl < 0.0, 0.0, kl)  # clamp at 0 but keep NaN visible
    tl.store(out_ptr + rows.to(tl.int64) * stride_o, kl.to(tl.float32), mask=ok)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


def _check_vector(name: str, t, v: int) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != v:
        raise ValueError(f"{name} must be a [V={v}] tensor, got {getattr(t, 'shape', type(t).__name__)}")
    if not t.dtype.is_floating_point:
        raise ValueError(f"{name} must be floating point, got {t.dtype}")


def fused_linear_kl(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, log_p: torch.Tensor,
                    vocab_chunk: int | None = None, *, out: torch.Tensor | None = None,
                    fp32_precision: str = "ieee", block_b: int | None = None, block_v: int | None = None,
                    block_d: int | None = None, vocab_splits: int | None = None) -> torch.Tensor:
    """``KL(P || Q_b)`` for every row ``b``, ``Q_b = softmax(hidden_b @ weight.T + bias)``, fused.

    hidden: ``[B, d]``; weight: ``[V, d]`` (same dtype: fp32, bf16 or fp16; any strides);
    bias: ``[V]`` or None; log_p: ``[V]`` log-probabilities of P. Returns ``[B]`` fp32, clamped at 0,
    as ``heta_fast.kl.linear_kl`` (entries with ``P_v = 0`` contribute 0). ``vocab_chunk`` is
    accepted for signature compatibility and ignored (no chunk buffer exists). ``out``: optional
    ``[B]`` fp32 buffer. ``fp32_precision``: matmul mode for fp32 inputs ("ieee", "tf32x3",
    "tf32"). ``block_*`` and ``vocab_splits`` override the tiling (tests, tuning).
    """
    del vocab_chunk
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor, got {getattr(t, 'shape', type(t).__name__)}")
        if t.dtype not in _INPUT_DTYPES:
            raise ValueError(f"{name} must be one of {_INPUT_DTYPES}, got {t.dtype}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    (b, d), v = hidden.shape, weight.shape[0]
    if weight.shape[1] != d:
        raise ValueError(f"weight {tuple(weight.shape)} does not match hidden size d={d}")
    if v == 0:
        raise ValueError("weight has an empty vocabulary")
    if bias is not None:
        _check_vector("bias", bias, v)
    _check_vector("log_p", log_p, v)
    if fp32_precision not in _PRECISIONS:
        raise ValueError(f"fp32_precision must be one of {_PRECISIONS}, got {fp32_precision!r}")
    device = check_device(hidden=hidden, weight=weight, bias=bias, log_p=log_p, out=out)
    if out is None:
        out = torch.empty(b, dtype=torch.float32, device=device)
    else:
        check_out(out, (b,), torch.float32, device)
    if b == 0:
        return out

    # Tiles: tl.dot needs every dimension >= 16 on GPUs; 16-bit inputs afford a deeper d step.
    block_b = block_b or min(max(next_pow2(b), 16), 64)
    block_v = block_v or 128
    block_d = block_d or (32 if hidden.dtype == torch.float32 else 64)
    n_tiles = triton.cdiv(v, block_v)
    n_bblocks = triton.cdiv(b, block_b)
    if vocab_splits is None:
        # Enough (row block, split) programs to fill every SM a few times over; few when interpreted.
        target = 4 if interpret_enabled() else 4 * _sm_count(device)
        vocab_splits = triton.cdiv(target, n_bblocks)
    tiles_per_split = triton.cdiv(n_tiles, max(1, min(int(vocab_splits), n_tiles)))
    splits = triton.cdiv(n_tiles, tiles_per_split)  # no split is left empty

    ws = torch.empty(3 * splits * b + splits, dtype=torch.float64, device=device)
    num_warps = 8 if block_b * block_v >= 8192 else 4
    _kl_partial_kernel[(n_bblocks, splits)](
        hidden, weight, bias if bias is not None else log_p, log_p, ws, b, v, d, tiles_per_split,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        bias.stride(0) if bias is not None else 0, log_p.stride(0),
        HAS_BIAS=bias is not None, INPUT_PRECISION=fp32_precision if hidden.dtype == torch.float32 else "ieee",
        UPCAST=interpret_enabled() and hidden.dtype == torch.bfloat16,
        BLOCK_B=block_b, BLOCK_V=block_v, BLOCK_D=block_d, num_warps=num_warps, num_stages=3)
    combine_block = min(max(next_pow2(b), 16), 256)
    _kl_combine_kernel[(triton.cdiv(b, combine_block),)](ws, out, b, splits, out.stride(0), BLOCK_B=combine_block)
    return out
