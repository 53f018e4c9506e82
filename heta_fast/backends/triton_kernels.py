"""The triton backend's door to the Triton kernels of ``heta_fast.kernels``.

The kernels live in the repository's top-level ``kernels/`` folder, which is importable as
``heta_fast.kernels`` and nothing else (docs/architecture.md, "Where the kernels live"). That
folder is deliberately a namespace portion, without ``__init__.py``, so this module is its
front: what each kernel computes, whether the backend can run, and loading on first call.

- ``fused_linear_kl``: ``KL(P || softmax(hidden @ weight.T + bias))`` per row, no ``B x V`` logits.
- ``hvp_block_l1_mean``: ``S`` straight from a batch of HVP results.
- ``rademacher_triton``: the counter-based probes drawn in-kernel.

Each matches its torch reference (``heta_fast.kl.linear_kl``, ``heta_fast.sensitivity.exact.block_l1_mean``,
``heta_fast.rng.rademacher``). Importing this module never needs triton: the kernel modules
load on the first call, which raises ``RuntimeError`` when ``triton_status()`` says the backend
cannot run. Triton decides on its first import whether kernels are compiled or interpreted
(``TRITON_INTERPRET=1``, CPU tensors), and transformers imports it with its model classes: set
that variable before importing torch or transformers.
"""

from __future__ import annotations

import importlib

import torch

from heta_fast.kernels._common import interpret_enabled

__all__ = ["fused_linear_kl", "hvp_block_l1_mean", "rademacher_triton", "triton_status"]

_loaded_interpret: bool | None = None  # the interpreter mode the kernel modules were loaded under


def triton_status() -> tuple[bool, str]:
    """``(True, what runs)`` when the Triton kernels can run here, else ``(False, why not)``."""
    try:
        import triton
    except ImportError as exc:
        return False, f"triton is not installed ({exc})"
    except Exception as exc:  # a broken install raises all sorts of errors on import
        return False, f"triton failed to import ({type(exc).__name__}: {exc})"
    interpret = interpret_enabled()
    if _loaded_interpret is not None and _loaded_interpret != interpret:
        was = "set" if _loaded_interpret else "not set"
        return False, f"the kernels were loaded with TRITON_INTERPRET {was}; it changed since, restart the process"
    if not interpret and not torch.cuda.is_available():
        return False, "no CUDA device and TRITON_INTERPRET is not set"
    language = _language_interpreted()
    if language is not None and language != interpret:
        was, now = ("set", "unset") if language else ("unset", "set")
        return False, (f"triton was imported while TRITON_INTERPRET was {was} and it is {now} now (torch and "
                       "transformers import triton with their model code); set it before importing them")
    if interpret:
        return True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1), kernels run on CPU tensors"
    return True, f"triton {triton.__version__} on {torch.cuda.get_device_name()}"


def _language_interpreted() -> bool | None:
    """Whether ``triton.language`` was built for the interpreter; None when this triton cannot tell.

    Triton picks compiled or interpreted builtins once, on its first import: kernels defined
    in the other mode fail on their first builtin call.
    """
    try:
        import triton.language as tl
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:  # older or partial triton: no way to check, trust the variable
        return None
    return isinstance(tl.zeros, InterpretedFunction)


def _load(module: str):
    global _loaded_interpret
    ok, why = triton_status()
    if not ok:
        raise RuntimeError(f"heta_fast.kernels: the Triton backend cannot run here: {why}")
    mod = importlib.import_module(f"heta_fast.kernels.{module}")
    if _loaded_interpret is None:
        _loaded_interpret = interpret_enabled()
    return mod


def fused_linear_kl(hidden, weight, bias, log_p, vocab_chunk=None, **kwargs):
    """Fused ``linear_kl``: hidden ``[B, d]``, weight ``[V, d]``, bias ``[V]``|None, log_p ``[V]`` -> ``[B]`` fp32.

    See ``heta_fast.kernels.linear_kl.fused_linear_kl`` for the keyword options (``out=`` ...).
    """
    return _load("linear_kl").fused_linear_kl(hidden, weight, bias, log_p, vocab_chunk, **kwargs)


def hvp_block_l1_mean(hvp, positions, n, samples, **kwargs):
    """Kernel ``block_l1_mean``: hvp ``[B, d]`` or ``[B, T, d]``, positions ``[B]`` -> ``S`` ``[n]`` fp32.

    See ``heta_fast.kernels.hvp_reduce.hvp_block_l1_mean`` for ``out=`` and ``accumulate=``.
    """
    return _load("hvp_reduce").hvp_block_l1_mean(hvp, positions, n, samples, **kwargs)


def rademacher_triton(seed, positions, samples, d, dtype=None, device=None, **kwargs):
    """In-kernel ``rademacher``: positions, samples ``[B]`` -> ``[B, d]`` probes, bit for bit equal.

    See ``heta_fast.kernels.probes.rademacher_triton`` for ``out=``.
    """
    mod = _load("probes")
    return mod.rademacher_triton(seed, positions, samples, d, torch.float32 if dtype is None else dtype, device,
                                 **kwargs)
