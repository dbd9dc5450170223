"""The machinery shared by all exercises: outcomes, feedback display, hints, fallbacks."""

from __future__ import annotations

import html
import textwrap
from dataclasses import dataclass
from typing import Callable

NOT_ATTEMPTED = "not attempted"
INCORRECT = "incorrect"
CORRECT = "correct"
ERROR = "error"

_COLOURS = {NOT_ATTEMPTED: "#555555", INCORRECT: "#b3261e", ERROR: "#b3261e", CORRECT: "#1e7b34"}
_TITLES = {
    NOT_ATTEMPTED: "Not attempted yet",
    INCORRECT: "Incorrect",
    ERROR: "Your code raised an error",
    CORRECT: "Correct",
}


class Incorrect(Exception):
    """Raised by a checker with a message that tells the learner what is wrong."""


@dataclass
class CheckResult:
    """What ``check()`` found: ``status`` is one of not attempted / incorrect / error / correct."""

    exercise: str
    status: str
    message: str

    @property
    def passed(self) -> bool:
        return self.status == CORRECT

    def __str__(self) -> str:
        return f"{self.exercise}: {_TITLES[self.status]}. {self.message}".strip()

    def _repr_html_(self) -> str:
        colour = _COLOURS[self.status]
        return (
            f'<div style="border-left: 4px solid {colour}; padding: 4px 10px;">'
            f'<b style="color:{colour}">{html.escape(self.exercise)}: {_TITLES[self.status]}</b>'
            f"<br>{html.escape(self.message)}</div>"
        )


def _show(obj) -> None:
    """Display rich output in Jupyter, plain text elsewhere."""
    try:
        from IPython import get_ipython
        from IPython.display import display

        if get_ipython() is not None:
            display(obj)
            return
    except ImportError:  # pragma: no cover - IPython is a dependency of jupyter
        pass
    print(obj)


class _Text:
    def __init__(self, title: str, body: str, code: bool = False) -> None:
        self.title, self.body, self.code = title, body, code

    def __str__(self) -> str:
        return f"{self.title}\n{self.body}"

    def _repr_html_(self) -> str:
        body = html.escape(self.body)
        body = f"<pre>{body}</pre>" if self.code else body.replace("\n", "<br>")
        return f'<div style="border-left: 4px solid #3366cc; padding: 4px 10px;"><b>{self.title}</b><br>{body}</div>'


class Exercise:
    """One exercise. Subclasses set ``name``, ``hints``, ``solution_code`` and implement ``_check``.

    ``_check(answer)`` raises :class:`Incorrect` with a precise message when the answer is
    wrong and returns normally when it is right. A ``NotImplementedError`` from the learner's
    code means "not attempted yet"; any other exception is reported without a traceback.
    """

    name: str = "Exercise"
    example_call: str = "check(your_function)"
    """How a learner calls ``check`` (shown when something other than a function is passed)."""
    hints: tuple[str, ...] = ()
    solution_code: str = ""
    success_message: str = "Well done."

    def _check(self, answer) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def evaluate(self, answer) -> CheckResult:
        """Run the checks and return the outcome without displaying anything (used by tests)."""
        if not callable(answer):
            return CheckResult(self.name, INCORRECT, f"Pass your function itself to check(), e.g. "
                               f"{self.example_call}, not {type(answer).__name__}.")
        try:
            self._check(answer)
        except NotImplementedError:
            return CheckResult(self.name, NOT_ATTEMPTED,
                               "Your function still raises NotImplementedError: replace the stub with your code, "
                               "then run this cell again. Stuck? Try hint().")
        except Incorrect as wrong:
            return CheckResult(self.name, INCORRECT, str(wrong))
        except Exception as exc:  # the learner's code failed: report it, no traceback
            return CheckResult(self.name, ERROR, f"{type(exc).__name__}: {exc}")
        return CheckResult(self.name, CORRECT, self.success_message)

    def check(self, answer) -> None:
        """Check the learner's answer and show the feedback (``evaluate`` returns it instead)."""
        _show(self.evaluate(answer))

    def hint(self, level: int = 1) -> None:
        """Show hint number ``level`` (1 = gentle; higher levels say more)."""
        if not self.hints:
            _show(_Text(f"{self.name}: hint", "There is no hint for this one."))
            return
        level = max(1, min(int(level), len(self.hints)))
        more = f" (hint({level + 1}) says more)" if level < len(self.hints) else ""
        _show(_Text(f"{self.name}: hint {level} of {len(self.hints)}{more}", textwrap.dedent(self.hints[level - 1]).strip()))

    def solution(self) -> None:
        """Show a solution."""
        _show(_Text(f"{self.name}: solution", textwrap.dedent(self.solution_code).strip(), code=True))

    def use(self, answer: Callable, fallback: Callable) -> Callable:
        """Return the learner's function when it passes the check, else ``fallback`` with a notice.

        Lets a learner who skipped (or has not finished) the exercise go on with the reference.
        """
        result = self.evaluate(answer)
        if result.passed:
            print(f"{self.name}: using your implementation.")
            return answer
        print(f"{self.name}: {_TITLES[result.status].lower()}, so the cells below use the reference "
              f"implementation {getattr(fallback, '__module__', '')}.{getattr(fallback, '__name__', '')} instead.")
        return fallback
