"""Exercise of notebook 05 (the 3D outlook): how large a search range fits in memory?

``q1``: the largest odd D whose dense float32 3D cost volume fits::

    def my_largest_d(grid, memory_gib):
        ...  # feature voxels per axis, GiB -> the largest odd D (0 if not even D = 1 fits)

It has ``check(fn)``, ``hint(level)``, ``solution()`` and ``use(fn, fallback)``. A dense 3D
cost volume holds one float32 value (4 bytes) per displacement per feature voxel:
``D**3 * grid**3`` values; 1 GiB is ``2**30`` bytes. The checker asks for several
(grid, memory) pairs, among them a 256^3 CT at stride 2 (grid 128) and 4 (grid 64) with
16 GiB, a volume whose D = 1 does not fit, and budgets that a D fits exactly (``<=``: it
fits; a float cube root is 4.999999999999999 there). It compares with a loop over the odd D
and names the usual mistakes: an even D, D**2 instead of D**3, grid**2 instead of grid**3,
bytes and GiB mixed up (1 or 8 bytes per value, 1e9 or 2**20 bytes per GiB), the first D
that does NOT fit, a strict ``<``, a negative D or 1 where nothing fits.
"""

from __future__ import annotations

import numbers

from ._core import Exercise, Incorrect

__all__ = ["BYTES_PER_VALUE", "GIB", "LargestDExercise", "largest_odd_d", "q1"]

BYTES_PER_VALUE = 4
"""float32."""

GIB = 2**30
"""Bytes per GiB."""


def _fits(D: int, grid: int, memory_gib: float, bytes_per_value: int = BYTES_PER_VALUE, unit: float = GIB,
          d_power: int = 3, grid_power: int = 3, strict: bool = False) -> bool:
    needed = D**d_power * grid**grid_power * bytes_per_value
    budget = memory_gib * unit
    return needed < budget if strict else needed <= budget


def largest_odd_d(grid: int, memory_gib: float, **mistake) -> int:
    """The largest odd D with ``D**3 * grid**3 * 4 <= memory_gib * 2**30`` bytes, 0 if none (a loop over D).

    ``mistake``: keyword arguments of the fit test (bytes per value, unit, powers, strict),
    for the checker's wrong answers.
    """
    best, D = 0, 1
    while _fits(D, grid, memory_gib, **mistake):
        best, D = D, D + 2
    return best


def _gib(D: int, grid: int) -> float:
    return D**3 * grid**3 * BYTES_PER_VALUE / GIB


_MISTAKES = (
    ("You used D**2 displacements: that is the 2D cost volume. In 3D every voxel has D x D x D candidate "
     "displacements (dz, dy, dx): D**3 * grid**3 values.", dict(d_power=2)),
    ("You used grid**2 voxels: the feature map of a volume has grid voxels along each of its THREE axes, "
     "grid**3 in all.", dict(grid_power=2)),
    ("Bytes and values mixed up: you counted 1 byte per value. A float32 takes 4 bytes, so the cost volume "
     "needs D**3 * grid**3 * 4 bytes.", dict(bytes_per_value=1)),
    ("You counted 8 bytes per value (float64); the cost volume is float32: 4 bytes per value.",
     dict(bytes_per_value=8)),
    ("Bytes and GiB mixed up: you took 1 GiB as 1e9 bytes (that is a GB). A GiB is 2**30 = 1073741824 bytes.",
     dict(unit=1e9)),
    ("Bytes and GiB mixed up: you took 1 GiB as 2**20 bytes (that is a MiB). A GiB is 2**30 bytes.",
     dict(unit=2**20)),
    ("A D whose cost volume takes exactly memory_gib fits: compare with <=, not <.", dict(strict=True)),
)


class LargestDExercise(Exercise):
    """The largest odd D whose dense float32 3D cost volume fits in ``memory_gib`` GiB."""

    name = "Exercise: how large a D fits?"
    example_call = "q1.check(my_largest_d)"
    success_message = ("Right for every grid and budget: e.g. a 256^3 CT at stride 2 (128^3 feature voxels) "
                       "allows D = 11 in 16 GiB, at stride 4 (64^3) D = 25. That is before a single gradient "
                       "or the regularisation's copies.")
    hints = (
        """
        A dense 3D cost volume holds one float32 (4 bytes) per displacement per feature voxel:
        D**3 displacements (dz, dy, dx) times grid**3 voxels. 1 GiB is 2**30 bytes.
        """,
        """
        Try D = 1, 3, 5, ... and keep the last one whose D**3 * grid**3 * 4 bytes are
        <= memory_gib * 2**30. If not even D = 1 fits, return 0. Return an int.
        """,
        """
        A closed form (memory_gib * 2**30 / (4 * grid**3)) ** (1/3) works too, but beware of
        floating point: 125 ** (1/3) is 4.999999999999999. Round it, step down to an odd
        number, and check with integers that D fits and D + 2 does not.
        """,
    )
    solution_code = """
    def my_largest_d(grid, memory_gib):
        budget = memory_gib * 2**30                   # bytes
        best = 0                                      # 0: not even D = 1 fits
        D = 1
        while D**3 * grid**3 * 4 <= budget:           # float32: 4 bytes per value
            best = D
            D += 2                                    # odd D only
        return best
    """

    # (grid, memory_gib): 256^3 at stride 2 and 4 in 16 GiB; 256^3 at stride 1; a budget a D fits
    # exactly (D = 5: 7.8125 GiB, D = 1: 4 GiB); a volume whose D = 1 does not fit
    cases = ((128, 16), (64, 16), (256, 16), (96, 24), (256, 7.8125), (1024, 4), (2048, 16))

    def _call(self, answer, grid, memory_gib) -> int:
        out = answer(grid, memory_gib)
        if isinstance(out, bool) or not isinstance(out, numbers.Real):
            raise Incorrect(f"Return D as an int; for grid={grid}, memory_gib={memory_gib} your function returned "
                            f"{type(out).__name__} ({out!r}).")
        if not isinstance(out, numbers.Integral):
            whole = " (int(...) of it)" if float(out).is_integer() else ""
            raise Incorrect(f"Return D as an int{whole}: for grid={grid}, memory_gib={memory_gib} your function "
                            f"returned the float {out!r}. D counts displacements per axis.")
        return int(out)

    def _check(self, answer) -> None:
        answers = [self._call(answer, grid, memory) for grid, memory in self.cases]
        expected = [largest_odd_d(grid, memory) for grid, memory in self.cases]
        if answers == expected:
            return
        for message, mistake in _MISTAKES:
            if answers == [largest_odd_d(grid, memory, **mistake) for grid, memory in self.cases]:
                raise Incorrect(message)
        if answers == [right + 2 if right else 1 for right in expected]:
            raise Incorrect("Off by one step: you return the first odd D that does NOT fit. Return the last one "
                            "that fits (the one before it, D - 2).")
        (grid, memory), got, right = next((case, got, right) for case, got, right
                                          in zip(self.cases, answers, expected) if got != right)
        case = f"For grid={grid}, memory_gib={memory}"
        if got < 0:
            raise Incorrect(f"{case} you returned D = {got}. When not even D = 1 fits, return 0, never a negative "
                            f"number.")
        if got % 2 == 0:
            raise Incorrect(f"{case} you returned an even D = {got}. D must be odd (offsets -r..r with "
                            f"r = (D-1)//2): return the largest ODD D that fits, here {got - 1}.")
        if right == 0 and got == 1:
            raise Incorrect(f"{case} not even D = 1 fits: {grid}**3 * 4 bytes = {_gib(1, grid):g} GiB > {memory} GiB. "
                            f"Return 0 then, not 1.")
        if got == right + 2:
            raise Incorrect(f"{case} D = {got} does not fit ({_gib(got, grid):.4g} GiB > {memory} GiB): you return "
                            f"the first odd D that does NOT fit. Return the last one that fits, D - 2.")
        if got == right - 2 and _gib(right, grid) == memory:
            raise Incorrect(f"{case} D = {right} fits exactly: {right}**3 * {grid}**3 * 4 bytes = {memory} GiB. "
                            f"'Fits' includes equality (<=). With a float cube root, beware: 125 ** (1/3) is "
                            f"4.999999999999999; check the neighbours of a rounded D with integer arithmetic.")
        if got > right:
            raise Incorrect(f"{case} your D = {got} needs {got}**3 * {grid}**3 * 4 bytes = {_gib(got, grid):.4g} "
                            f"GiB, more than {memory} GiB: it does not fit. Count D**3 * grid**3 values of 4 bytes, "
                            f"and 2**30 bytes per GiB.")
        raise Incorrect(f"{case} your D = {got} fits ({_gib(got, grid):.4g} GiB), but a larger odd D fits too: "
                        f"D = {got + 2} needs {_gib(got + 2, grid):.4g} GiB <= {memory} GiB. Count D**3 * grid**3 "
                        f"values of 4 bytes, and 2**30 bytes per GiB.")


q1 = LargestDExercise()
