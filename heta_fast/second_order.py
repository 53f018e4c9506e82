"""Hand-derived first and second derivatives of the MLP activations and the norms (fast exact Hessian).

The exact ``S`` is reverse over reverse: one backward with ``create_graph=True`` (unbatched,
``[c, r, F]`` tensors), then one backward of that gradient batched over the ``m`` probes
(``[m, c, r, F]``). In eager PyTorch the second pass replays autograd's double-backward graph of
every elementwise op (``silu``, ``mul``, ``pow``, ``mean``, ``rsqrt``, ...), each a separate pass
over a batched tensor. Here each piece is one ``torch.autograd.Function`` whose backward is a
second ``Function`` with a hand-written backward, so the batched pass does only the few
multiply-adds of the closed form; everything that does not depend on the probe (the
derivatives of the activation at the saved input, the norm's row statistics) is computed
unbatched, once per pass, from saved inputs.

Formulas (rows of width ``D``, reductions over the last axis, ``mean`` = sum / D):

- SwiGLU ``h = s(g) * u``, ``s(g) = g sigma(g)``, ``s' = sigma (1 + g (1 - sigma))``,
  ``s'' = sigma (1 - sigma) (2 + g (1 - 2 sigma))``. First backward of ``go``:
  ``dg = go u s'``, ``du = go s``. Its backward, for incoming ``(vg, vu)``:
  ``d go = vg u s' + vu s``, ``d g = vg go u s'' + vu go s'``, ``d u = vg go s'``.
- Pointwise ``y = f(x)`` (GELU, tanh approximation or exact): ``dx = go f'``; its backward:
  ``d go = v f'``, ``d x = v go f''``. tanh GELU, ``k = sqrt(2/pi)``, ``c = 0.044715``,
  ``z = k (x + c x^3)``, ``t = tanh z``: ``f' = (1 + t)/2 + x (1 - t^2) z'/2``,
  ``f'' = (1 - t^2) (z' + x (z'' - 2 t z'^2)/2)``, ``z' = k (1 + 3 c x^2)``, ``z'' = 6 k c x``.
  Exact GELU: ``f' = Phi(x) + x phi(x)``, ``f'' = phi(x) (2 - x^2)``.
- RMSNorm ``y = w * n``, ``n = x r``, ``r = (mean(x^2) + eps)^(-1/2)``. With ``a = w go`` and
  ``mu = mean(a n)``: ``dx = r (a - n mu)``. Its backward, for incoming ``v``, with
  ``nu = mean(v n)`` and ``q = v - n nu``: ``d go = w r q``,
  ``d x = -r^2 (mu q + nu a + n (mean(v a) - 2 mu nu))``.
- LayerNorm ``y = w * n + b`` with ``n = (x - mean x) r``, ``r`` from the centred row: the
  same formulas with ``a`` and ``v`` centred (``a - mean a``, ``v - mean v``); every term of
  ``d x`` is then centred already.

The weights are frozen in HETA (``CausalLM`` sets ``requires_grad_(False)``); these Functions
give no weight gradient, and ``fused_second_order`` leaves a module on its stock forward when
its weight requires grad or its input is not fp32/fp64 (Llama's RMSNorm upcasts half
precision, these formulas do not).
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn
from transformers.activations import GELUActivation, GELUTanh, NewGELUActivation, SiLUActivation

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_FUSED_DTYPES = (torch.float32, torch.float64)


# -- pointwise activations: value, first and second derivative -------------------------------------

def _gelu_tanh_derivatives(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``f'(x), f''(x)`` of ``x (1 + tanh(k (x + c x^3))) / 2``."""
    x2 = x * x
    t = torch.tanh(_SQRT_2_OVER_PI * x * (1.0 + _GELU_CUBIC * x2))
    sech2 = 1.0 - t * t
    dz = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_CUBIC * x2)
    d1 = 0.5 * (1.0 + t) + 0.5 * x * sech2 * dz
    d2 = sech2 * (dz + 0.5 * x * (6.0 * _SQRT_2_OVER_PI * _GELU_CUBIC * x - 2.0 * t * dz * dz))
    return d1, d2


def _gelu_erf_derivatives(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``f'(x), f''(x)`` of ``x Phi(x)``."""
    pdf = torch.exp(-0.5 * x * x) * _INV_SQRT_2PI
    cdf = 0.5 * (1.0 + torch.erf(x * _INV_SQRT_2))
    return cdf + x * pdf, pdf * (2.0 - x * x)


_POINTWISE: dict[str, tuple[Callable, Callable]] = {
    "gelu_tanh": (lambda x: nn.functional.gelu(x, approximate="tanh"), _gelu_tanh_derivatives),
    "gelu": (nn.functional.gelu, _gelu_erf_derivatives),
}


class _PointwiseGrad(torch.autograd.Function):
    """``(go, x) -> go * f'(x)``, differentiable: its backward is ``(v f', v go f'')``."""

    @staticmethod
    def forward(ctx, go: torch.Tensor, x: torch.Tensor, kind: str) -> torch.Tensor:
        ctx.kind = kind
        ctx.save_for_backward(go, x)
        return go * _POINTWISE[kind][1](x)[0]

    @staticmethod
    def backward(ctx, v: torch.Tensor):
        go, x = ctx.saved_tensors
        d1, d2 = _POINTWISE[ctx.kind][1](x)  # unbatched: does not depend on the probe
        d_go = v * d1 if ctx.needs_input_grad[0] else None
        d_x = v * (go * d2) if ctx.needs_input_grad[1] else None
        return d_go, d_x, None


class Pointwise(torch.autograd.Function):
    """``y = f(x)`` for ``kind`` in ``"gelu_tanh"``, ``"gelu"``; any shape. Twice differentiable."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, kind: str) -> torch.Tensor:
        ctx.kind = kind
        ctx.save_for_backward(x)
        return _POINTWISE[kind][0](x)

    @staticmethod
    def backward(ctx, go: torch.Tensor):
        (x,) = ctx.saved_tensors
        return _PointwiseGrad.apply(go, x, ctx.kind), None


# -- SwiGLU ------------------------------------------------------------------------------------------

class _SwiGLUGrad(torch.autograd.Function):
    """``(go, g, u) -> (go u s'(g), go s(g))``, differentiable (formulas: module docstring)."""

    @staticmethod
    def forward(ctx, go: torch.Tensor, g: torch.Tensor, u: torch.Tensor):
        ctx.save_for_backward(go, g, u)
        sig = torch.sigmoid(g)
        s1 = sig * (1.0 + g * (1.0 - sig))
        return go * u * s1, go * (g * sig)

    @staticmethod
    def backward(ctx, vg: torch.Tensor, vu: torch.Tensor):
        go, g, u = ctx.saved_tensors
        # everything below up to the probe-dependent lines is unbatched ([c, r, F], once per pass)
        sig = torch.sigmoid(g)
        one_minus = 1.0 - sig
        s1 = sig * (1.0 + g * one_minus)
        go_s1 = go * s1
        d_go = d_g = d_u = None
        if ctx.needs_input_grad[0]:
            d_go = vg * (u * s1) + vu * (g * sig)
        if ctx.needs_input_grad[1]:
            s2 = sig * one_minus * (2.0 + g * (1.0 - 2.0 * sig))
            d_g = vg * (go * u * s2) + vu * go_s1
        if ctx.needs_input_grad[2]:
            d_u = vg * go_s1
        return d_go, d_g, d_u


class SwiGLU(torch.autograd.Function):
    """``h = silu(g) * u`` for ``g, u`` of one shape (Llama's MLP). Twice differentiable."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(g, u)
        return nn.functional.silu(g) * u

    @staticmethod
    def backward(ctx, go: torch.Tensor):
        g, u = ctx.saved_tensors
        return _SwiGLUGrad.apply(go, g, u)


# -- RMSNorm and LayerNorm -------------------------------------------------------------------------

def _row_mean(a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``mean(a * b)`` (or ``mean(a)``) over the last axis, keepdim.

    A sum times ``1/D``: the probe-batched pass runs under the legacy vmap of
    ``autograd.grad(is_grads_batched=True)``, which has batching rules for ``sum`` and ``mul``
    but not for ``mean.dim`` or ``addcmul`` (those fall back to a loop over the m probes and a
    ``cat``: 2,673 ``addcmul`` calls for 270 uses at n = 32 on SmolLM2).
    """
    prod = a if b is None else a * b
    return prod.sum(-1, keepdim=True) * (1.0 / a.shape[-1])


def _normalised(x: torch.Tensor, eps: float, center: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``n, r``: the normalised row ``[..., D]`` and ``r = (mean(xc^2) + eps)^(-1/2)`` ``[..., 1]``."""
    if center:
        x = x - _row_mean(x)
    r = torch.rsqrt(_row_mean(x, x) + eps)
    return x * r, r


def _centred(z: torch.Tensor, center: bool) -> torch.Tensor:
    return z - _row_mean(z) if center else z


class _NormGrad(torch.autograd.Function):
    """``(go, x, w) -> r (a - n mean(a n))``, ``a = w go`` (centred for LayerNorm); differentiable."""

    @staticmethod
    def forward(ctx, go: torch.Tensor, x: torch.Tensor, w: torch.Tensor | None, eps: float, center: bool):
        ctx.eps, ctx.center = eps, center
        ctx.save_for_backward(go, x, w)
        n, r = _normalised(x, eps, center)
        a = _centred(go if w is None else go * w, center)
        return r * a - n * (r * _row_mean(a, n))

    @staticmethod
    def backward(ctx, v: torch.Tensor):
        go, x, w = ctx.saved_tensors
        n, r = _normalised(x, ctx.eps, ctx.center)  # unbatched
        a = _centred(go if w is None else go * w, ctx.center)
        mu = _row_mean(a, n)
        v = _centred(v, ctx.center)  # batched from here on
        nu = _row_mean(v, n)
        d_go = d_x = None
        if ctx.needs_input_grad[0]:
            wr = r if w is None else w * r
            d_go = v * wr - (n * wr) * nu  # w r (v - n nu)
        if ctx.needs_input_grad[1]:
            # -r^2 (mu q + nu a + n (mean(v a) - 2 mu nu)) with q = v - n nu, regrouped by v, a, n
            r2 = r * r
            d_x = v * (-r2 * mu) + a * (-r2 * nu) + n * (r2 * (3.0 * mu * nu - _row_mean(v, a)))
        return d_go, d_x, None, None, None


class Norm(torch.autograd.Function):
    """RMSNorm (``center=False``: ``w * x r``) or LayerNorm (``center=True``: ``w * (x - mean x) r + b``).

    x: ``[..., D]``; w, b: ``[D]`` or None (frozen: no gradient is returned for them); eps: float.
    Twice differentiable in ``x``.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor | None, b: torch.Tensor | None, eps: float,
                center: bool) -> torch.Tensor:
        ctx.eps, ctx.center = eps, center
        ctx.save_for_backward(x, w)
        n, _ = _normalised(x, eps, center)
        y = n if w is None else w * n
        return y if b is None else y + b

    @staticmethod
    def backward(ctx, go: torch.Tensor):
        x, w = ctx.saved_tensors
        return _NormGrad.apply(go, x, w, ctx.eps, ctx.center), None, None, None, None


def swiglu(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``silu(g) * u`` with the hand-derived derivatives."""
    return SwiGLU.apply(g, u)


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU (``approximate`` ``"tanh"`` or ``"none"``) with the hand-derived derivatives."""
    return Pointwise.apply(x, "gelu_tanh" if approximate == "tanh" else "gelu")


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``weight * x / sqrt(mean(x^2) + eps)`` with the hand-derived derivatives."""
    return Norm.apply(x, weight, None, eps, False)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm over the last axis with the hand-derived derivatives."""
    return Norm.apply(x, weight, bias, eps, True)


# -- swapping a model's modules ------------------------------------------------------------------------

def _frozen(*tensors: torch.Tensor | None) -> bool:
    """Whether no gradient can reach ``tensors`` here (the Functions give none for weights)."""
    return not torch.is_grad_enabled() or not any(t is not None and t.requires_grad for t in tensors)


def _fused_forward(module: nn.Module) -> Callable | None:
    """The fused replacement for ``module.forward``, or None when ``module`` is not one we fuse."""
    name = type(module).__name__
    stock = module.forward
    if (all(hasattr(module, p) for p in ("gate_proj", "up_proj", "down_proj"))
            and isinstance(getattr(module, "act_fn", None), (SiLUActivation, nn.SiLU))):
        def mlp(x: torch.Tensor) -> torch.Tensor:
            return module.down_proj(swiglu(module.gate_proj(x), module.up_proj(x)))
        return mlp
    if name.endswith("RMSNorm") and hasattr(module, "variance_epsilon") and isinstance(module.weight, torch.Tensor):
        def rms(x: torch.Tensor) -> torch.Tensor:
            if x.dtype not in _FUSED_DTYPES or x.dtype != module.weight.dtype or not _frozen(module.weight):
                return stock(x)
            return rms_norm(x, module.weight, module.variance_epsilon)
        return rms
    if isinstance(module, nn.LayerNorm) and len(module.normalized_shape) == 1:
        def ln(x: torch.Tensor) -> torch.Tensor:
            if x.dtype not in _FUSED_DTYPES or not _frozen(module.weight, module.bias):
                return stock(x)
            return layer_norm(x, module.weight, module.bias, module.eps)
        return ln
    kind = None
    approximate = module.approximate if isinstance(module, nn.GELU) else None
    if isinstance(module, (NewGELUActivation, GELUTanh)) or approximate == "tanh":
        kind = "tanh"
    elif isinstance(module, GELUActivation) or approximate == "none":
        kind = "none"
    if kind is None:
        return None

    def act(x: torch.Tensor) -> torch.Tensor:
        return gelu(x, kind) if x.dtype in _FUSED_DTYPES else stock(x)
    return act


def _agrees(module: nn.Module, stock: Callable, fused: Callable, width: int) -> bool:
    """Whether ``fused`` gives ``stock``'s output on a small random input (guards look-alike modules)."""
    weight = next(module.parameters(), None)
    dtype = weight.dtype if weight is not None else torch.float32
    device = weight.device if weight is not None else torch.device("cpu")
    if dtype not in _FUSED_DTYPES:
        return False
    generator = torch.Generator(device).manual_seed(0)  # the user's global RNG stays untouched
    x = torch.randn(2, width, dtype=dtype, device=device, generator=generator)
    with torch.no_grad():
        want, got = stock(x), fused(x)
    return want.shape == got.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def _input_width(module: nn.Module) -> int | None:
    if hasattr(module, "gate_proj"):
        return module.gate_proj.in_features
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 1:
        return weight.shape[0]
    return 8  # pointwise: any width


@contextlib.contextmanager
def fused_second_order(model: nn.Module) -> Iterator[int]:
    """Within the block, ``model``'s SwiGLU MLPs, GELUs, RMSNorms and LayerNorms run the fused Functions.

    Yields the number of modules swapped. Each swapped module gets an instance ``forward``;
    on exit (also on an exception) every module is put back exactly as found (an instance
    ``forward`` it had before is restored, otherwise the attribute is removed). A module is
    swapped only after its fused forward matched its stock one on a random input.
    """
    swapped: list[tuple[nn.Module, bool, object]] = []
    checked: dict[type, bool] = {}
    try:
        for module in model.modules():
            fused = _fused_forward(module)
            if fused is None:
                continue
            kind = type(module)
            if kind not in checked:
                width = _input_width(module)
                checked[kind] = width is not None and _agrees(module, module.forward, fused, width)
            if not checked[kind]:
                continue
            had = "forward" in module.__dict__
            swapped.append((module, had, module.__dict__.get("forward")))
            module.forward = fused
        yield len(swapped)
    finally:
        for module, had, previous in reversed(swapped):
            if had:
                module.forward = previous
            else:
                del module.forward


def fused_hvps(function: Callable) -> Callable:
    """Decorate ``function(lm, ...)`` (``lm`` a ``CausalLM``) to run inside ``fused_second_order(lm.model)``.

    The undecorated function stays reachable as ``function.__wrapped__`` (the stock modules).
    """
    @functools.wraps(function)
    def wrapper(lm, *args, **kwargs):
        with fused_second_order(lm.model):
            return function(lm, *args, **kwargs)
    return wrapper
