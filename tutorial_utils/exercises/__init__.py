"""Exercises with feedback, in the manner of Kaggle Learn: ``check()``, ``hint()``, ``solution()``.

Each notebook imports its exercises from a submodule, e.g.
``from tutorial_utils.exercises.correlation import q1``.
"""

from ._core import CheckResult, Exercise, Incorrect

__all__ = ["CheckResult", "Exercise", "Incorrect"]
