"""``heta_fast.checks``: the one integer check, with the exact messages users see."""

from __future__ import annotations

import pytest

from heta_fast.checks import check_int, is_int


def test_is_int_refuses_bools_and_floats():
    assert is_int(0) and is_int(-3) and is_int(2**40)
    assert not any(is_int(v) for v in (True, False, 1.0, "1", None))


@pytest.mark.parametrize("value, kind", [(True, "bool"), (2.0, "float"), ("3", "str"), (None, "NoneType")])
def test_check_int_names_the_wrong_type(value, kind):
    with pytest.raises(TypeError, match=f"^samples must be an int, got {kind}$"):
        check_int("samples", value, 1)


@pytest.mark.parametrize("minimum, maximum, value, message", [
    (1, None, 0, "samples must be >= 1, got 0"),
    (None, 5, 6, "samples must be <= 5, got 6"),
    (0, 9, -1, r"samples must lie in \[0, 9\], got -1"),
    (0, 9, 10, r"samples must lie in \[0, 9\], got 10"),
])
def test_check_int_names_the_bound(minimum, maximum, value, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        check_int("samples", value, minimum, maximum)


def test_check_int_returns_the_value_and_takes_a_custom_sentence():
    assert check_int("n", 0, 0) == 0 and check_int("n", 7) == 7 and check_int("n", 9, 0, 9) == 9
    with pytest.raises(ValueError, match=r"^m \(samples\) must be >= 1, got 0$"):
        check_int("samples", 0, 1, what="m (samples) must be >= 1")
