"""assert_close: the notebooks' tolerance check for numbers that depend on float rounding."""

import math

import pytest

from tutorial_utils.environment import assert_close


def test_passes_within_the_tolerance_and_fails_beyond():
    assert_close({"a": 0.504, "b": 0.3}, {"a": 0.5, "b": 0.3}, tol=0.005)
    with pytest.raises(AssertionError, match=r"mean Dice differs .* by more than 0.005: a: 0.5060 \(expected 0.5000\)"):
        assert_close({"a": 0.506, "b": 0.3}, {"a": 0.5, "b": 0.3}, tol=0.005, what="mean Dice")


def test_single_numbers_and_nan():
    assert_close(1.0, 1.0005, tol=0.001)
    with pytest.raises(AssertionError, match=r"folding: nan \(expected 0.0100\)"):
        assert_close(math.nan, 0.01, tol=1.0, what="folding")


def test_keys_must_match():
    with pytest.raises(AssertionError, match=r"measured \['a'\] but expected \['a', 'b'\]"):
        assert_close({"a": 1.0}, {"a": 1.0, "b": 2.0}, tol=0.1)
