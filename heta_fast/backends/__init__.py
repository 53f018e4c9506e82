"""The backends: one registry of what computes ``M, S, I``, and the check of what can run here.

- ``registry``: ``Backend{name, ops, run, run_many}`` for ``reference`` (the oracle),
  ``torch`` (fast, exact) and ``triton`` (the torch path with fused kernels), and ``resolve``,
  which turns a configured name (``auto`` included) into one of them.
- ``availability``: ``check`` (a clear ``ValueError`` before any model work) and
  ``triton_status``.
"""

from heta_fast.backends.availability import check, triton_status
from heta_fast.backends.registry import REGISTRY, TORCH_OPS, TRITON_OPS, Backend, resolve

__all__ = ["REGISTRY", "TORCH_OPS", "TRITON_OPS", "Backend", "check", "resolve", "triton_status"]
