"""The integer check every public entry point uses: a clear error before any model work."""

from __future__ import annotations


def is_int(value) -> bool:
    """True for a Python ``int`` that is not a ``bool`` (``True`` is an ``int`` to Python, not to us)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None, *,
              what: str | None = None) -> int:
    """``value`` when it is an int in ``[minimum, maximum]`` (either bound optional).

    Raises ``TypeError("{name} must be an int, got {type}")`` for anything else (bools and
    floats included) and ``ValueError("{what}, got {value}")`` out of range; ``what`` defaults
    to ``"{name} must be >= {minimum}"``, ``"... <= {maximum}"`` or ``"... lie in [min, max]"``.
    """
    if not is_int(value):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        if what is None:
            if maximum is None:
                what = f"{name} must be >= {minimum}"
            elif minimum is None:
                what = f"{name} must be <= {maximum}"
            else:
                what = f"{name} must lie in [{minimum}, {maximum}]"
        raise ValueError(f"{what}, got {value}")
    return value
