"""The checker of notebook 05's exercise (how large a D fits?) catches each usual mistake and
accepts correct answers, also ones written differently from the reference."""

from __future__ import annotations

import math
import re
import textwrap

import numpy as np
import pytest

from tutorial_utils.exercises._core import CORRECT, ERROR, INCORRECT, NOT_ATTEMPTED
from tutorial_utils.exercises.three_d import largest_odd_d, q1


def _status(answer):
    result = q1.evaluate(answer)
    return result.status, result.message


# --------------------------------------------------------------------------- the reference


@pytest.mark.parametrize("grid, memory_gib, expected", [
    (128, 16, 11),        # 256^3 CT at stride 2: 11**3 * 128**3 * 4 B = 10.4 GiB; 13**3 needs 17.2 GiB
    (64, 16, 25),         # stride 4: 25**3 * 64**3 * 4 B = 15.3 GiB; 27**3 needs 19.2 GiB
    (256, 7.8125, 5),     # exactly 5**3 * 256**3 * 4 B
    (1024, 4, 1),         # exactly 1024**3 * 4 B
    (2048, 16, 0),        # 32 GiB for D = 1
    (8, 1, 79),           # 79**3 <= 2**30 / (4 * 8**3) = 2**19 < 81**3
])
def test_reference_values(grid, memory_gib, expected):
    assert largest_odd_d(grid, memory_gib) == expected


def test_reference_against_the_definition():
    """Odd, fits (<=), and D + 2 does not: checked with integers for many budgets."""
    for grid in (16, 48, 64, 100, 128):
        for memory_gib in (0.001, 0.5, 1, 3, 16, 40, 80):
            D = largest_odd_d(grid, memory_gib)
            budget = memory_gib * 2**30
            assert D == 0 or (D % 2 == 1 and D**3 * grid**3 * 4 <= budget)
            assert (D + 2 if D else 1) ** 3 * grid**3 * 4 > budget


# --------------------------------------------------------------------------- correct answers


def closed_form(grid, memory_gib):
    """Cube root, rounded, then made odd and checked with integers."""
    budget = memory_gib * 2**30
    D = round((budget / (4 * grid**3)) ** (1 / 3)) + 2
    D -= 1 - D % 2  # odd
    while D > 0 and D**3 * grid**3 * 4 > budget:
        D -= 2
    return max(D, 0)


def downward(grid, memory_gib):
    """From a large odd D down to the first that fits."""
    for D in range(1001, 0, -2):
        if 4 * (D * grid) ** 3 <= memory_gib * 2**30:
            return D
    return 0


def numpy_int(grid, memory_gib):
    Ds = np.arange(1, 1001, 2)
    fits = Ds.astype(float) ** 3 * float(grid) ** 3 * 4 <= memory_gib * 2**30
    return Ds[fits].max() if fits.any() else np.int64(0)


@pytest.mark.parametrize("answer", [closed_form, downward, numpy_int, largest_odd_d])
def test_correct_answers_pass(answer):
    status, message = _status(answer)
    assert status == CORRECT, message


def test_the_solution_passes():
    namespace = {}
    exec(textwrap.dedent(q1.solution_code), namespace)
    status, message = _status(namespace["my_largest_d"])
    assert status == CORRECT, message


# --------------------------------------------------------------------------- not attempted, errors, types


def stub(grid, memory_gib):
    raise NotImplementedError  # replace this line with your code


def test_stub_is_not_attempted():
    status, message = _status(stub)
    assert status == NOT_ATTEMPTED and "NotImplementedError" in message


def test_not_a_function_is_rejected():
    status, message = _status(11)
    assert status == INCORRECT and message == "Pass your function itself to check(), e.g. q1.check(my_largest_d), not int."


def test_an_exception_is_reported():
    status, message = _status(lambda grid, memory_gib: grid / 0)
    assert status == ERROR and message.startswith("ZeroDivisionError")


@pytest.mark.parametrize("answer, pattern", [
    (lambda g, m: float(largest_odd_d(g, m)), r"^Return D as an int \(int\(\.\.\.\) of it\): for grid=128, "
                                              r"memory_gib=16 your function returned the float 11\.0"),
    (lambda g, m: (m * 2**30 / (4 * g**3)) ** (1 / 3), r"^Return D as an int: .* returned the float 12\.69"),
    (lambda g, m: None, r"^Return D as an int; .* returned NoneType"),
    (lambda g, m: True, r"^Return D as an int; .* returned bool"),
])
def test_wrong_types_are_named(answer, pattern):
    status, message = _status(answer)
    assert status == INCORRECT and re.search(pattern, message), message


# --------------------------------------------------------------------------- each mistake, named


def even_allowed(grid, memory_gib):
    D = 0
    while (D + 1) ** 3 * grid**3 * 4 <= memory_gib * 2**30:
        D += 1
    return D


def floor_cube_root(grid, memory_gib):
    """int() of a float cube root, made odd by stepping down: 125 ** (1/3) = 4.99.. gives 3."""
    D = int((memory_gib * 2**30 / (4 * grid**3)) ** (1 / 3))
    return D if D % 2 else D - 1


def first_that_does_not_fit(grid, memory_gib):
    D = 1
    while D**3 * grid**3 * 4 <= memory_gib * 2**30:
        D += 2
    return D


def one_when_nothing_fits(grid, memory_gib):
    D = 1
    while (D + 2) ** 3 * grid**3 * 4 <= memory_gib * 2**30:
        D += 2
    return D


def too_small(grid, memory_gib):
    return max(largest_odd_d(grid, memory_gib) - 4, 1)


def too_large_once(grid, memory_gib):
    return largest_odd_d(grid, memory_gib) + (4 if grid == 128 else 0)


MISTAKES = {
    "even D": (even_allowed, r"^For grid=128, memory_gib=16 you returned an even D = 12\. D must be odd"),
    "D**2": (lambda g, m: largest_odd_d(g, m, d_power=2), r"^You used D\*\*2 displacements"),
    "grid**2": (lambda g, m: largest_odd_d(g, m, grid_power=2), r"^You used grid\*\*2 voxels"),
    "1 byte per value": (lambda g, m: largest_odd_d(g, m, bytes_per_value=1),
                         r"^Bytes and values mixed up: you counted 1 byte per value"),
    "8 bytes per value": (lambda g, m: largest_odd_d(g, m, bytes_per_value=8), r"^You counted 8 bytes per value"),
    "1e9 bytes per GiB": (lambda g, m: largest_odd_d(g, m, unit=1e9),
                          r"^Bytes and GiB mixed up: you took 1 GiB as 1e9 bytes"),
    "2**20 bytes per GiB": (lambda g, m: largest_odd_d(g, m, unit=2**20),
                            r"^Bytes and GiB mixed up: you took 1 GiB as 2\*\*20 bytes"),
    "strict <": (lambda g, m: largest_odd_d(g, m, strict=True), r"^A D whose cost volume takes exactly memory_gib "
                                                                 r"fits: compare with <=, not <"),
    "off by one": (first_that_does_not_fit, r"^Off by one step: you return the first odd D that does NOT fit"),
    "float cube root": (floor_cube_root, r"^For grid=256, memory_gib=7\.8125 D = 5 fits exactly: .* "
                                         r"4\.999999999999999"),
    "1 when nothing fits": (one_when_nothing_fits, r"^For grid=2048, memory_gib=16 not even D = 1 fits: .* "
                                                   r"Return 0 then, not 1"),
    "negative": (lambda g, m: largest_odd_d(g, m) or -1, r"^For grid=2048, memory_gib=16 you returned D = -1\. "
                                                         r"When not even D = 1 fits, return 0"),
    "too large once": (too_large_once, r"^For grid=128, memory_gib=16 your D = 15 needs .* it does not fit"),
    "too small": (too_small, r"^For grid=128, memory_gib=16 your D = 7 fits .* but a larger odd D fits too"),
}


@pytest.mark.parametrize("name", sorted(MISTAKES))
def test_each_mistake_is_named(name):
    answer, pattern = MISTAKES[name]
    status, message = _status(answer)
    assert status == INCORRECT, (name, status, message)
    assert re.search(pattern, message), (name, message)


def test_the_mistakes_differ_from_the_answer_on_the_checked_cases():
    """Every named mistake changes at least one checked case, and no two mistakes look alike."""
    answers = {name: tuple(answer(g, m) for g, m in q1.cases) for name, (answer, _) in MISTAKES.items()}
    right = tuple(largest_odd_d(g, m) for g, m in q1.cases)
    assert all(values != right for values in answers.values())
    assert (128, 16) in q1.cases and (64, 16) in q1.cases
    assert len(set(answers.values())) == len(answers)
    assert math.isclose(11**3 * 128**3 * 4 / 2**30, 1331 / 128)  # 10.4 GiB


# --------------------------------------------------------------------------- hint, solution, use


def test_hints_solution_and_fallback(capsys):
    q1.hint()
    q1.hint(3)
    q1.solution()
    out = capsys.readouterr().out
    assert "Exercise: how large a D fits?: hint 1 of 3" in out and "hint 3 of 3" in out
    assert "def my_largest_d(grid, memory_gib):" in out
    assert q1.use(stub, fallback=largest_odd_d) is largest_odd_d
    assert "reference implementation" in capsys.readouterr().out
