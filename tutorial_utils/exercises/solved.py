"""The solved copy of the notebooks: every exercise stub replaced by its exercise's solution.

Learners get the notebooks in ``notebooks/`` with each exercise in its "to do" state: a code
cell that defines ``my_...`` with the body ``raise NotImplementedError``, checked in a later
cell by ``qN.check(my_...)``, where ``qN`` comes from ``from tutorial_utils.exercises.X import
qN``. A teacher makes the solved copy (as NeuromatchAcademy keeps student and instructor
copies) with::

    python -m tutorial_utils.exercises.solved                      # notebooks/*.ipynb -> notebooks_solved/
    python -m tutorial_utils.exercises.solved notebooks/03_regularisation.ipynb --output-dir solved

Nothing is listed by hand: :func:`solve_notebook` finds every stub cell, the ``check`` call
that names its function, and the exercise object that call uses (by importing the module the
notebook imports it from). It replaces the stub's source with the exercise's
``solution_code``, after verifying that the solution defines the same function name, and
clears that cell's outputs. Where the solution uses a module the notebook has not imported
before that cell (e.g. ``F``), the import is put at the top of the solved cell, taken from the
exercise module. Every other cell, and its stored output, stays as it is: re-execute the copy
(``jupyter nbconvert --to notebook --execute --inplace``) to refresh the outputs.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import copy
import importlib
import json
import sys
import textwrap
import types
from collections.abc import Sequence
from pathlib import Path

from ._core import Exercise

__all__ = ["EXERCISES_PACKAGE", "cell_source", "find_stubs", "main", "notebook_text", "solve_notebook",
           "solved_cell_source", "stub_name", "write_notebook"]

EXERCISES_PACKAGE = "tutorial_utils.exercises"
"""Exercise objects are found only in the modules of this package."""

STUB_PREFIX = "my_"
"""A stub defines a function whose name starts with this."""


# --------------------------------------------------------------------------- reading cells


def cell_source(cell: dict) -> str:
    """The source of a notebook cell as one string (stored as a string or as a list of lines)."""
    source = cell.get("source", "")
    return "".join(source) if isinstance(source, list) else source


def _parse(source: str) -> ast.Module | None:
    """The cell's syntax tree; IPython lines (``%magic``, ``!shell``) are skipped; None if not Python."""
    try:
        return ast.parse(source)
    except SyntaxError:
        pass
    lines = ["pass" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines()]
    try:
        return ast.parse("\n".join(lines))
    except SyntaxError:
        return None


def _code_trees(nb: dict) -> list[ast.Module | None]:
    """The syntax tree of every cell (None for markdown and for cells that are not Python)."""
    return [_parse(cell_source(cell)) if cell.get("cell_type") == "code" else None for cell in nb.get("cells", [])]


def _is_not_implemented(node: ast.stmt) -> bool:
    """``raise NotImplementedError`` or ``raise NotImplementedError(...)``."""
    if not isinstance(node, ast.Raise) or node.exc is None:
        return False
    exc = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
    return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"


def stub_name(tree: ast.Module | None) -> str | None:
    """The function name if the cell is an exercise stub, else None.

    A stub cell holds one function ``my_...`` whose body (after an optional docstring; comments
    do not count) is ``raise NotImplementedError``.
    """
    if tree is None or len(tree.body) != 1 or not isinstance(tree.body[0], ast.FunctionDef):
        return None
    function = tree.body[0]
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    if not function.name.startswith(STUB_PREFIX) or len(body) != 1 or not _is_not_implemented(body[0]):
        return None
    return function.name


def find_stubs(nb: dict) -> list[tuple[int, str]]:
    """(cell index, function name) of every exercise stub of the notebook, in order."""
    found = []
    for index, tree in enumerate(_code_trees(nb)):
        name = stub_name(tree)
        if name is not None:
            found.append((index, name))
    return found


# --------------------------------------------------------------------------- from stub to exercise


def _exercise_imports(trees: Sequence[ast.Module | None]) -> dict[str, tuple[str, str | None]]:
    """What each local name of the notebook refers to in the exercises package.

    ``from tutorial_utils.exercises.X import q1 as a`` -> ``{"a": ("tutorial_utils.exercises.X", "q1")}``;
    ``import tutorial_utils.exercises.X as ex`` -> ``{"ex": ("tutorial_utils.exercises.X", None)}``.
    """
    found: dict[str, tuple[str, str | None]] = {}
    for tree in trees:
        if tree is None:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 0 \
                    and (node.module or "").startswith(EXERCISES_PACKAGE + "."):
                for alias in node.names:
                    found[alias.asname or alias.name] = (node.module, alias.name)
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith(EXERCISES_PACKAGE + ".") and alias.asname:
                        found[alias.asname] = (alias.name, None)
    return found


def _check_call(tree: ast.Module | None, name: str) -> ast.expr | None:
    """The object ``X`` of a call ``X.check(name)`` in the cell, or None."""
    if tree is None:
        return None
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "check" \
                and node.args and isinstance(node.args[0], ast.Name) and node.args[0].id == name:
            return node.func.value
    return None


def _resolve(expr: ast.expr, imports: dict[str, tuple[str, str | None]]) -> tuple[str, str] | None:
    """(module, attribute) of the exercise object that ``expr`` (``q1`` or ``ex.q1``) names, or None."""
    if isinstance(expr, ast.Name) and expr.id in imports and imports[expr.id][1] is not None:
        return imports[expr.id]  # type: ignore[return-value]
    if isinstance(expr, ast.Attribute) and isinstance(expr.value, ast.Name) and expr.value.id in imports:
        module, attribute = imports[expr.value.id]
        if attribute is None:
            return module, expr.attr
    return None


def _exercise_for(nb: dict, trees: Sequence[ast.Module | None], index: int, name: str) -> tuple[Exercise, str]:
    """The exercise whose ``check`` the notebook calls on the stub ``name`` of cell ``index``.

    Returns the exercise and how the notebook names it (``tutorial_utils.exercises.X.q1``).
    """
    imports = _exercise_imports(trees)
    for later in range(index + 1, len(trees)):
        expr = _check_call(trees[later], name)
        if expr is None:
            continue
        target = _resolve(expr, imports)
        if target is None:
            raise ValueError(f"cell {later} calls {ast.unparse(expr)}.check({name}), but the notebook does not "
                             f"import {ast.unparse(expr)} from a module of {EXERCISES_PACKAGE} "
                             f"(e.g. from {EXERCISES_PACKAGE}.correlation import q1)")
        module_name, attribute = target
        label = f"{module_name}.{attribute}"
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            raise ValueError(f"cell {later} checks {name} with {label}, but {module_name} cannot be imported: "
                             f"{exc}") from exc
        exercise = getattr(module, attribute, None)
        if not isinstance(exercise, Exercise):
            raise ValueError(f"cell {later} checks {name} with {label}, which is "
                             f"{'missing' if exercise is None else type(exercise).__name__}, not an Exercise")
        return exercise, label
    raise ValueError(f"cell {index} is the exercise stub {name}, but no later cell calls qN.check({name}): "
                     f"the solved copy needs that call to know which exercise's solution to put there")


# --------------------------------------------------------------------------- the solved cell


def _defined_names(tree: ast.Module) -> set[str]:
    """Every name the code binds anywhere: assignments, imports, functions, classes, arguments."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, (ast.Store, ast.Del)):
            names.add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names if alias.name != "*"}
        elif isinstance(node, ast.ExceptHandler) and node.name:
            names.add(node.name)
    return names


def _free_names(tree: ast.Module) -> set[str]:
    """The names the code reads but never binds, builtins excluded: what its namespace must hold."""
    loaded = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load)}
    return loaded - _defined_names(tree) - set(dir(builtins))


def _import_line(name: str, module: types.ModuleType, exercise_label: str) -> str:
    """``import torch.nn.functional as F``: how the exercise module gets the module it calls ``name``."""
    value = getattr(module, name, None)
    if not isinstance(value, types.ModuleType):
        raise ValueError(f"the solution of {exercise_label} uses {name!r}, which the notebook does not define "
                         f"before the exercise cell and which is not a module imported by "
                         f"{module.__name__}: import it in the notebook's import cell")
    return f"import {value.__name__}" if value.__name__ == name else f"import {value.__name__} as {name}"


def solved_cell_source(exercise: Exercise, name: str, notebook_names: set[str] | None = None,
                       exercise_label: str = "the exercise") -> str:
    """The source that replaces the stub ``name``: the exercise's ``solution_code``, dedented.

    Raises ``ValueError`` if the solution does not define the function ``name`` (the cells below
    call it by that name). ``notebook_names``: the names the notebook binds before the stub cell;
    a module the solution uses but the notebook lacks (e.g. ``F``) is imported at the top of the
    cell, as the exercise module imports it. None: no such check.
    """
    code = textwrap.dedent(exercise.solution_code).strip()
    if not code:
        raise ValueError(f"{exercise_label} ({exercise.name}) has no solution_code to put in place of {name}")
    try:
        tree = ast.parse(code)
    except SyntaxError as exc:
        raise ValueError(f"the solution_code of {exercise_label} ({exercise.name}) is not valid Python: {exc}") from exc
    defined = [node.name for node in tree.body if isinstance(node, ast.FunctionDef)]
    if name not in defined:
        what = "defines " + ", ".join(defined) if defined else "defines no function"
        raise ValueError(f"the solution_code of {exercise_label} ({exercise.name}) {what}, but the notebook's "
                         f"stub defines {name}: the solution must define the function the notebook checks")
    if notebook_names is None:
        return code
    module = sys.modules[type(exercise).__module__]
    missing = sorted(_free_names(tree) - notebook_names)
    imports = [_import_line(missing_name, module, exercise_label) for missing_name in missing]
    return "\n".join(imports + (["", ""] if imports else []) + [code])  # isort: two blank lines


def _as_stored(source: str, like: object) -> list[str] | str:
    """``source`` stored as the original cell stored its source (a list of lines or one string)."""
    return source.splitlines(keepends=True) if isinstance(like, list) else source


def solve_notebook(nb: dict) -> tuple[dict, list[str]]:
    """The solved copy of a notebook (a dict as ``json.load`` gives it) and the functions it solved.

    Every stub cell (see :func:`stub_name`) gets the ``solution_code`` of the exercise that a
    later cell checks it with (``qN.check(my_name)``, ``qN`` imported from a module of
    ``tutorial_utils.exercises``); its outputs and execution count are cleared. The input is not
    changed. A notebook without stubs comes back equal to the input with an empty list. Raises
    ``ValueError`` (naming the cell and the exercise) when a stub has no check call, the check
    uses no exercise object, or the solution defines another function.
    """
    if not isinstance(nb, dict) or not isinstance(nb.get("cells"), list):
        raise TypeError(f"nb must be a notebook dict with a 'cells' list (json.load of an .ipynb), "
                        f"got {type(nb).__name__}")
    solved = copy.deepcopy(nb)
    trees = _code_trees(solved)
    names = []
    for index, name in find_stubs(solved):
        exercise, label = _exercise_for(solved, trees, index, name)
        before: set[str] = set()
        for tree in trees[:index]:
            if tree is not None:
                before |= _defined_names(tree)
        try:
            source = solved_cell_source(exercise, name, before, exercise_label=label)
        except ValueError as exc:
            raise ValueError(f"cell {index} ({name}): {exc}") from exc
        cell = solved["cells"][index]
        cell["source"] = _as_stored(source, cell.get("source"))
        cell["outputs"] = []
        cell["execution_count"] = None
        names.append(name)
    return solved, names


# --------------------------------------------------------------------------- files and the command


def notebook_text(nb: dict) -> str:
    """A notebook as ``jupyter`` stores it: indent 1, unicode kept, a trailing newline."""
    return json.dumps(nb, indent=1, ensure_ascii=False) + "\n"


def write_notebook(nb: dict, path: str | Path) -> None:
    """Write ``nb`` to ``path`` in the format of :func:`notebook_text` (UTF-8)."""
    Path(path).write_text(notebook_text(nb), encoding="utf-8")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tutorial_utils.exercises.solved",
        description="Write the solved copy of the notebooks: every exercise stub (def my_...: raise "
                    "NotImplementedError) replaced by its exercise's solution. Learners keep notebooks/; "
                    "the copy is for teachers.")
    parser.add_argument("notebooks", nargs="*", type=Path, metavar="NOTEBOOK",
                        help="the .ipynb files to solve (default: notebooks/*.ipynb)")
    parser.add_argument("--output-dir", type=Path, default=Path("notebooks_solved"), metavar="DIR",
                        help="where the solved copies go, under the same file names (default: notebooks_solved); "
                             "never the folder of an input notebook")
    return parser


def _same_folder(a: Path, b: Path) -> bool:
    return a.resolve() == b.resolve()


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    paths: list[Path] = list(args.notebooks)
    if not paths:
        paths = sorted(Path("notebooks").glob("*.ipynb"))
        if not paths:
            parser.error("no NOTEBOOK given and no notebooks/*.ipynb here: run it in the repository root "
                         "or name the notebooks")
    for path in paths:
        if path.suffix != ".ipynb":
            parser.error(f"{path}: expected a notebook (.ipynb)")
        if not path.is_file():
            parser.error(f"{path}: no such notebook")
    stems = [path.name for path in paths]
    twice = sorted({stem for stem in stems if stems.count(stem) > 1})
    if twice:
        parser.error(f"two notebooks named {', '.join(twice)}: their solved copies would overwrite each other")
    out = args.output_dir
    if out.exists() and not out.is_dir():
        parser.error(f"--output-dir {out} is a file, not a folder")
    for path in paths:
        if out.exists() and _same_folder(out, path.parent):
            parser.error(f"--output-dir {out} is the folder of the input notebook {path}: refusing to overwrite "
                         f"the learners' copy; choose another folder (default: notebooks_solved)")

    solved = []  # solve all first: a faulty notebook writes nothing
    for path in paths:
        try:
            nb = json.loads(path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            parser.error(f"{path}: not a notebook (invalid JSON: {exc})")
        try:
            solved.append((path, *solve_notebook(nb)))
        except (TypeError, ValueError) as exc:
            parser.error(f"{path}: {exc}")

    out.mkdir(parents=True, exist_ok=True)
    for path, nb, names in solved:
        target = out / path.name
        write_notebook(nb, target)
        what = f"solved {', '.join(names)}" if names else "no exercises, copied unchanged"
        print(f"{path} -> {target}: {what}")
    total = sum(len(names) for _, _, names in solved)
    print(f"{len(solved)} notebook(s) written to {out}, {total} exercise stub(s) replaced by the solution")
    return 0


if __name__ == "__main__":
    sys.exit(main())
