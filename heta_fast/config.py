"""``HETAConfig``: every knob of the method, validated before any model work."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from heta_fast.probes import check_seed

MASKS = ("zero", "mean", "unk")
VALUE_SOURCES = ("attention", "residual")
BACKENDS = ("auto", "reference", "torch", "triton")
HESSIANS = ("exact", "low_rank", "gauss_newton", "layer_subset")
SINKS = ("none", "bos")  # heta_fast.sink
MIXES = ("raw", "normalised")  # heta_fast.mix


@dataclass(frozen=True)
class HETAConfig:
    """Configuration of one HETA attribution (defaults are HETA_SPEC's).

    beta, gamma: weights of the Hessian and KL terms in ``M * (beta * S + gamma * I)``.
    samples: ``m``, Rademacher probes per context position.
    mask: how a masked row is replaced for ``I``: ``zero``, ``mean`` or ``unk``.
    value_source: ``attention`` (the value vectors the attention layer computes) or
        ``residual`` (the released code's: raw layer input times the value weight, no bias).
    layer_subset: use only the last ``layer_subset`` layers for the semantic flow (None: all).
    window_size, overlap: sliding windows over long contexts (None or 0: no windows).
    seed: the counter-based generator's seed, in ``[0, 2**32)``.
    backend: ``auto`` (fastest available), ``reference``, ``torch`` or ``triton``.
    memory_budget: bytes the fast backends may use for batched work (None: from free memory).
    retain_heap: on CPU with glibc, the fast backends keep freed heap memory for reuse while they
        run instead of faulting it in again (``heta_fast.allocator``; ~1.5x on the HVPs).
    hessian: how ``S`` is estimated: ``exact`` (the spec's block probes), ``low_rank`` (a rank
        ``hessian_rank`` sketch of the input Hessian), ``gauss_newton`` (``J^T Lambda J`` on the
        ``hessian_topk`` most probable tokens plus the target) or ``layer_subset`` (curvature
        with respect to the residual stream entering the last ``hessian_layers`` layers).
        See docs/estimators.md for formulas and costs.
    sink: ``none`` (the spec) or ``bos``: a sink token (BOS, or a designated one) is put before
        the context when the input does not start with it, and left out of the scores
        (``heta_fast.sink``). mix: ``raw`` (the spec's ``beta S + gamma I``) or ``normalised``
        (``S`` and ``I`` each scaled to sum 1 over the context first; ``heta_fast.mix``).
        ``HETAConfig.paper()`` is the spec's exact behaviour.
    """

    beta: float = 0.5
    gamma: float = 0.5
    samples: int = 10
    mask: str = "zero"
    value_source: str = "attention"
    layer_subset: int | None = None
    window_size: int | None = None
    overlap: float = 0.0
    seed: int = 0
    backend: str = "auto"
    memory_budget: int | None = None
    retain_heap: bool = True
    hessian: str = "exact"
    hessian_rank: int = 32
    hessian_topk: int = 8
    hessian_layers: int = 4
    sink: str = "none"
    mix: str = "raw"

    def __post_init__(self) -> None:
        for name in ("beta", "gamma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
            if not value >= 0:  # also rejects NaN
                raise ValueError(f"{name} must be >= 0, got {value}")
        _check_int("samples", self.samples, minimum=1, what="m (samples) must be >= 1")
        if self.mask not in MASKS:
            raise ValueError(f"unknown mask {self.mask!r}; expected one of {', '.join(MASKS)}")
        if self.value_source not in VALUE_SOURCES:
            raise ValueError(f"unknown value_source {self.value_source!r}; expected one of {', '.join(VALUE_SOURCES)}")
        if self.layer_subset is not None:
            _check_int("layer_subset", self.layer_subset, minimum=1, what="layer_subset must be >= 1 (or None)")
        if self.window_size is not None:
            _check_int("window_size", self.window_size, minimum=0, what="window_size must be >= 0 (or None)")
        if isinstance(self.overlap, bool) or not isinstance(self.overlap, (int, float)):
            raise TypeError(f"overlap must be a number, got {type(self.overlap).__name__}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must lie in [0, 1), got {self.overlap}")
        check_seed(self.seed)
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; expected one of {', '.join(BACKENDS)}")
        if self.memory_budget is not None:
            _check_int("memory_budget", self.memory_budget, minimum=1,
                       what="memory_budget must be a positive byte count")
        if not isinstance(self.retain_heap, bool):
            raise TypeError(f"retain_heap must be a bool, got {type(self.retain_heap).__name__}")
        if self.hessian not in HESSIANS:
            raise ValueError(f"unknown hessian estimator {self.hessian!r}; expected one of {', '.join(HESSIANS)}")
        for name in ("hessian_rank", "hessian_topk", "hessian_layers"):
            _check_int(name, getattr(self, name), minimum=1, what=f"{name} must be >= 1")
        if self.sink not in SINKS:
            raise ValueError(f"unknown sink {self.sink!r}; expected one of {', '.join(SINKS)}")
        if self.mix not in MIXES:
            raise ValueError(f"unknown mix {self.mix!r}; expected one of {', '.join(MIXES)}")

    @classmethod
    def paper(cls, **changes) -> HETAConfig:
        """HETA_SPEC's exact behaviour (no sink, raw mix), with ``changes`` on top."""
        return cls(**{"sink": "none", "mix": "raw", **changes})

    def replace(self, **changes) -> HETAConfig:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _check_int(name: str, value, *, minimum: int, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{what}, got {value}")
