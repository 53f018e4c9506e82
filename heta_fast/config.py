"""``HETAConfig``: every knob of the method, validated before any model work."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass

from heta_fast.checks import check_int
from heta_fast.rng import check_seed

MASKS = ("zero", "mean", "unk")
VALUE_SOURCES = ("attention", "residual")
BACKENDS = ("auto", "reference", "torch", "triton")
HESSIANS = ("exact", "low_rank", "gauss_newton", "layer_subset")
INFORMATIONS = ("exact", "linearised", "screened")  # heta_fast.influence
SINKS = ("none", "bos")  # heta_fast.sink
MIXES = ("raw", "normalised")  # heta_fast.mix
FLOWS = ("rollout", "position_normalised")  # heta_fast.semantic_flow

# Named configurations, by what the user needs (``HETAConfig.preset``; ``--preset`` on the CLI).
# Each is a set of field changes on top of HETAConfig's defaults. Why ``fast`` is Gauss-Newton
# on the 8 most probable tokens: it is the one estimator that costs less than one occlusion
# pass at every length measured (BENCHMARKS.md "Methods"), and its faithfulness against exact
# HETA's seed spread is in EVALUATION.md.
PRESETS: dict[str, dict] = {
    "paper": {"sink": "none", "mix": "raw", "hessian": "exact"},  # docs/method.md, bit for bit
    "exact": {"hessian": "exact"},  # the library's defaults (sink "bos", normalised mix), exact Hessian
    "fast": {"hessian": "gauss_newton", "hessian_topk": 8},
    # A fixed number of model passes whatever the context's length (issue 24): Gauss-Newton S and
    # screened I share one logit Jacobian, then 16 masked forwards; fidelity and cost in
    # BENCHMARKS.md "Fixed-pass I". The Jacobian's backward still keeps every layer's attention.
    "fixed": {"hessian": "gauss_newton", "hessian_topk": 8, "information": "screened", "screened_tokens": 16},
}

# Option groups of the command line, in the order ``--help`` shows them.
OPTION_GROUPS = {"method": "method (defaults from docs/method.md §4)", "run": "how to run"}


def _option(default, help: str, *, choices: tuple[str, ...] | None = None, type: str | None = None,
            metavar: str | None = None, short: str | None = None, group: str = "method"):
    """A config field with what the command line needs to offer it (read by ``heta_fast.cli``).

    help: one line for ``--help`` (the default is appended there); choices: the valid values;
    type: a named parser other than the field's own type (``bytes``: ``512M``, ``2G``);
    short: a short flag such as ``-m``; group: a key of ``OPTION_GROUPS``.
    """
    metadata = {"help": help, "choices": choices, "type": type, "metavar": metavar, "short": short,
                "group": group}
    return dataclasses.field(default=default, metadata=metadata)


@dataclass(frozen=True)
class HETAConfig:
    """Configuration of one HETA attribution (defaults: docs/method.md §4).

    beta, gamma: weights of the Hessian and KL terms in ``M * (beta * S + gamma * I)``.
    samples: ``m``, Rademacher probes per context position.
    mask: how a masked row is replaced for ``I``: ``zero``, ``mean`` or ``unk``.
    value_source: ``attention`` (the value vectors the attention layer computes) or
        ``residual`` (the released code's: raw layer input times the value weight, no bias).
    flow_layers: use only the last ``flow_layers`` layers for the semantic flow (None: all).
    window_size, overlap: sliding windows over long contexts (None or 0: no windows).
    seed: the counter-based generator's seed, in ``[0, 2**32)``.
    backend: ``auto`` (fastest available), ``reference``, ``torch`` or ``triton``.
    memory_budget: bytes the fast backends may use for batched work (None: from free memory).
    retain_heap: on CPU with glibc, the fast backends keep freed heap memory for reuse while they
        run instead of faulting it in again (``heta_fast.allocator``; ~1.5x on the HVPs).
    hessian: how ``S`` is estimated: ``exact`` (the method's block probes), ``low_rank`` (a rank
        ``hessian_rank`` sketch of the input Hessian), ``gauss_newton`` (``J^T Lambda J`` on the
        ``hessian_topk`` most probable tokens plus the target) or ``layer_subset`` (curvature
        with respect to the residual stream entering the last ``hessian_layers`` layers).
        See docs/estimators.md for formulas and costs.
    sink: ``bos`` (the default) or ``none`` (the spec): a sink token (BOS, or a designated one)
        is put before the context when the input does not start with it, and left out of the
        scores (``heta_fast.sink``). mix: ``normalised`` (the default: ``S`` and ``I`` each scaled
        to sum 1 over the context first; ``heta_fast.mix``) or ``raw`` (the spec's
        ``beta S + gamma I``). Why these defaults: EVALUATION.md (issue 11) measured both against
        the spec's. ``HETAConfig.paper()`` is the spec's exact behaviour (docs/method.md §10).
    """

    beta: float = _option(0.5, "weight of S, >= 0")
    gamma: float = _option(0.5, "weight of I, >= 0")
    samples: int = _option(10, "Rademacher probes per context token for S (m)", short="-m", metavar="M")
    mask: str = _option("zero", "what replaces a token's embedding for I", choices=MASKS)
    value_source: str = _option("attention", "value vectors for M: 'attention' (what the layer computes) or "
                                "'residual' (the released code's variant)", choices=VALUE_SOURCES)
    flow: str = _option("rollout", "M: rollout (the spec) or position_normalised (each position's rollout divided by "
                        "what uniform attention would give it)", choices=FLOWS)
    flow_layers: int | None = _option(None, "semantic flow over the last K layers only (default: all layers)",
                                      metavar="K")
    window_size: int | None = _option(None, "sliding windows of W context tokens for long inputs "
                                      "(default: no windows)", metavar="W")
    overlap: float = _option(0.0, "overlap of consecutive windows, in [0, 1)")
    seed: int = _option(0, "probe seed in [0, 2**32)")
    backend: str = _option("auto", "implementation: auto (fastest available), reference (the slow oracle), "
                           "torch (batched PyTorch), triton (fused GPU kernels)", choices=BACKENDS, group="run")
    memory_budget: int | None = _option(None, "memory the batched backends may use, e.g. 512M or 2G (binary "
                                        "units; default: from free memory)", type="bytes", metavar="BYTES",
                                        group="run")
    retain_heap: bool = _option(True, "keep freed heap memory for reuse while the fast backends run "
                                "(Linux CPUs with glibc)", group="run")
    hessian: str = _option("exact", "how S is estimated: exact (the spec) or a cheaper curvature model "
                           "(docs/estimators.md)", choices=HESSIANS)
    hessian_rank: int = _option(32, "rank of the low_rank sketch of the input Hessian", metavar="R")
    hessian_topk: int = _option(8, "most probable tokens (plus the target) in gauss_newton's output curvature",
                                metavar="K")
    hessian_layers: int = _option(4, "layer_subset: curvature of the residual stream entering the last K layers",
                                  metavar="K")
    information: str = _option("exact", "how I is computed: exact (one masked forward per token, the spec), "
                               "linearised or screened (docs/estimators.md)", choices=INFORMATIONS)
    screened_tokens: int = _option(16, "screened I: tokens whose I is recomputed exactly, the rest linearised",
                                   metavar="R")
    sink: str = _option("bos", "a sink token before the context, left out of the scores: none (the spec) or bos "
                        "(heta_fast.sink)", choices=SINKS)
    mix: str = _option("normalised", "how S and I are mixed: raw (the spec's beta S + gamma I) or normalised (each "
                       "scaled to sum 1 over the context first)", choices=MIXES)

    def __post_init__(self) -> None:
        for name in ("beta", "gamma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
            if not value >= 0:  # also rejects NaN
                raise ValueError(f"{name} must be >= 0, got {value}")
        check_int("samples", self.samples, minimum=1, what="m (samples) must be >= 1")
        if self.mask not in MASKS:
            raise ValueError(f"unknown mask {self.mask!r}; expected one of {', '.join(MASKS)}")
        if self.value_source not in VALUE_SOURCES:
            raise ValueError(f"unknown value_source {self.value_source!r}; expected one of {', '.join(VALUE_SOURCES)}")
        if self.flow not in FLOWS:
            raise ValueError(f"unknown flow {self.flow!r}; expected one of {', '.join(FLOWS)}")
        if self.flow_layers is not None:
            check_int("flow_layers", self.flow_layers, minimum=1, what="flow_layers must be >= 1 (or None)")
        if self.window_size is not None:
            check_int("window_size", self.window_size, minimum=0, what="window_size must be >= 0 (or None)")
        if isinstance(self.overlap, bool) or not isinstance(self.overlap, (int, float)):
            raise TypeError(f"overlap must be a number, got {type(self.overlap).__name__}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"overlap must lie in [0, 1), got {self.overlap}")
        check_seed(self.seed)
        if self.backend not in BACKENDS:
            raise ValueError(f"unknown backend {self.backend!r}; expected one of {', '.join(BACKENDS)}")
        if self.memory_budget is not None:
            check_int("memory_budget", self.memory_budget, minimum=1,
                       what="memory_budget must be a positive byte count")
        if not isinstance(self.retain_heap, bool):
            raise TypeError(f"retain_heap must be a bool, got {type(self.retain_heap).__name__}")
        if self.hessian not in HESSIANS:
            raise ValueError(f"unknown hessian estimator {self.hessian!r}; expected one of {', '.join(HESSIANS)}")
        if self.information not in INFORMATIONS:
            raise ValueError(f"unknown information estimator {self.information!r}; expected one of "
                             f"{', '.join(INFORMATIONS)}")
        for name in ("hessian_rank", "hessian_topk", "hessian_layers", "screened_tokens"):
            check_int(name, getattr(self, name), minimum=1, what=f"{name} must be >= 1")
        if self.sink not in SINKS:
            raise ValueError(f"unknown sink {self.sink!r}; expected one of {', '.join(SINKS)}")
        if self.mix not in MIXES:
            raise ValueError(f"unknown mix {self.mix!r}; expected one of {', '.join(MIXES)}")

    @classmethod
    def preset(cls, name: str, **changes) -> HETAConfig:
        """The configuration for a stated need, with ``changes`` on top: ``paper`` (the method
        exactly as docs/method.md defines it), ``exact`` (the defaults, exact Hessian), ``fast``
        (the estimator that costs less than occlusion) or ``fixed`` (a fixed number of model passes
        whatever the length: screened ``I``); see ``PRESETS``."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
        check_fields(changes)
        return cls(**{**PRESETS[name], **changes})

    @classmethod
    def paper(cls, **changes) -> HETAConfig:
        """``preset("paper", **changes)``: no sink, raw mix, exact Hessian."""
        return cls.preset("paper", **changes)

    def replace(self, **changes) -> HETAConfig:
        """A copy with some fields changed (validated again).

        An unknown name raises TypeError listing the valid fields (and the closest one).
        """
        check_fields(changes)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def field_names() -> tuple[str, ...]:
    """The names of HETAConfig's fields, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(HETAConfig))


def check_fields(changes: dict) -> None:
    """TypeError naming every key of ``changes`` that is not a HETAConfig field, and the valid ones."""
    valid = field_names()
    unknown = [name for name in changes if name not in valid]
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, valid, n=1)
        hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    raise TypeError(f"unknown HETAConfig field{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; "
                    f"valid fields: {', '.join(valid)}")
