"""The solved copy of the notebooks (``python -m tutorial_utils.exercises.solved``).

Every exercise stub of every notebook gets its exercise's solution, and that solution passes
the exercise's own checker: this verifies each solution without running a notebook. The test
finds the stubs and their ``qN`` with plain text matching, independently of the module's
syntax-tree reading.
"""

from __future__ import annotations

import ast
import copy
import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cli_helpers import exits_with_usage

from tutorial_utils.exercises import Exercise
from tutorial_utils.exercises.solved import find_stubs, main, solve_notebook, solved_cell_source

pytestmark = pytest.mark.usefixtures("single_thread")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
STUB = re.compile(r"^def (my_\w+)\(.*\):\n(?:\s*#.*\n)*\s+raise NotImplementedError\b", re.MULTILINE)
CHECK = re.compile(r"^(\w+)\.check\((my_\w+)\)", re.MULTILINE)
EXERCISE_IMPORT = re.compile(r"^from (tutorial_utils\.exercises\.\w+) import (.+)$", re.MULTILINE)


def _source(cell: dict) -> str:
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _code(nb: dict) -> list[tuple[int, str]]:
    return [(i, _source(cell)) for i, cell in enumerate(nb["cells"]) if cell["cell_type"] == "code"]


def _stubs_by_text(nb: dict) -> list[tuple[int, str]]:
    return [(i, match.group(1)) for i, text in _code(nb) for match in [STUB.match(text)] if match]


def _exercise_by_text(nb: dict, name: str) -> Exercise:
    """The ``qN`` of ``qN.check(name)``, imported as the notebook's import cell imports it."""
    checks = [match.group(1) for _, text in _code(nb) for match in CHECK.finditer(text) if match.group(2) == name]
    assert len(checks) == 1, f"expected one check of {name}, found {checks}"
    for _, text in _code(nb):
        for module, names in EXERCISE_IMPORT.findall(text):
            if checks[0] in [n.strip() for n in names.split(",")]:
                return getattr(importlib.import_module(module), checks[0])
    raise AssertionError(f"{checks[0]} is not imported from tutorial_utils.exercises")


STUB_CASES = [(path.name, index, name) for path in sorted(NOTEBOOKS.glob("*.ipynb"))
              for index, name in _stubs_by_text(_load(path))]
NOTEBOOKS_WITH_STUBS = sorted({case[0] for case in STUB_CASES})
NOTEBOOKS_WITHOUT = sorted(path.name for path in NOTEBOOKS.glob("*.ipynb") if path.name not in NOTEBOOKS_WITH_STUBS)


def test_the_notebooks_have_exercise_stubs():
    """The tests below have something to test (notebooks 02, 03, 04 hold exercises)."""
    assert len(STUB_CASES) >= 4 and len(NOTEBOOKS_WITH_STUBS) >= 3, STUB_CASES


@pytest.mark.parametrize("notebook", NOTEBOOKS_WITH_STUBS)
def test_solved_copy_has_no_stub_left(notebook):
    nb = _load(NOTEBOOKS / notebook)
    original = copy.deepcopy(nb)
    solved, names = solve_notebook(nb)
    assert nb == original, "solve_notebook changed its input"
    stubs = _stubs_by_text(nb)
    assert names == [name for _, name in stubs]
    assert find_stubs(nb) == stubs
    assert _stubs_by_text(solved) == [] and find_stubs(solved) == []
    for _, text in _code(solved):
        assert not ("def my_" in text and "raise NotImplementedError" in text), text
    replaced = {index for index, _ in stubs}
    assert len(solved["cells"]) == len(nb["cells"])
    for index, (before, after) in enumerate(zip(nb["cells"], solved["cells"])):
        if index not in replaced:
            assert after == before, f"cell {index} changed"
        else:
            assert after["outputs"] == [] and after["execution_count"] is None
            assert set(after) == set(before) and after["id"] == before["id"]
            assert isinstance(after["source"], list) and all(line.endswith("\n") for line in after["source"][:-1])


@pytest.mark.parametrize("notebook, index, name", STUB_CASES)
def test_solved_cell_passes_its_checker(notebook, index, name):
    """The solved cell defines the stub's function, and that function passes ``qN.evaluate``."""
    nb = _load(NOTEBOOKS / notebook)
    solved, _ = solve_notebook(nb)
    text = _source(solved["cells"][index])
    assert re.search(rf"^def {name}\(", text, re.MULTILINE), text
    assert "raise NotImplementedError" not in text
    namespace = {"torch": torch, "F": F}
    exec(compile(text, f"{notebook}[{index}]", "exec"), namespace)
    result = _exercise_by_text(nb, name).evaluate(namespace[name])
    assert result.passed, str(result)


@pytest.mark.parametrize("notebook, index, name", STUB_CASES)
def test_solved_cell_runs_with_only_the_notebooks_imports(notebook, index, name):
    """In the notebook the cell sees only what earlier cells imported (notebook 04 has no ``F``)."""
    nb = _load(NOTEBOOKS / notebook)
    solved, _ = solve_notebook(nb)
    namespace: dict = {}
    for _, text in _code(nb)[:[i for i, _ in _code(nb)].index(index)]:
        try:
            tree = ast.parse(text)
        except SyntaxError:
            continue
        imports = [node for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))]
        exec(compile(ast.Module(body=imports, type_ignores=[]), notebook, "exec"), namespace)
    exec(_source(solved["cells"][index]), namespace)
    result = _exercise_by_text(nb, name).evaluate(namespace[name])
    assert result.passed, str(result)


@pytest.mark.parametrize("notebook", NOTEBOOKS_WITHOUT)
def test_notebook_without_exercises_is_unchanged(notebook):
    nb = _load(NOTEBOOKS / notebook)
    assert solve_notebook(nb) == (nb, [])


# --------------------------------------------------------------------------- synthetic notebooks


def _cell(source: str, cell_type: str = "code") -> dict:
    cell = {"cell_type": cell_type, "id": f"c{abs(hash(source)) % 10**8}", "metadata": {},
            "source": source.splitlines(keepends=True)}
    if cell_type == "code":
        cell.update(execution_count=3, outputs=[{"output_type": "stream", "name": "stdout", "text": ["x\n"]}])
    return cell


def _notebook(*sources: str) -> dict:
    return {"cells": [_cell(s) for s in sources], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


STUB_CELL = "def {name}(feat_fixed, feat_moving, disp_range):\n    # your code\n    raise NotImplementedError  # replace me"


def test_synthetic_notebook_is_solved():
    nb = _notebook("import torch\nimport torch.nn.functional as F\nfrom tutorial_utils.exercises.correlation import q1",
                   STUB_CELL.format(name="my_correlation_layer"), "q1.check(my_correlation_layer);")
    solved, names = solve_notebook(nb)
    assert names == ["my_correlation_layer"]
    assert _source(solved["cells"][1]).startswith("def my_correlation_layer(")
    assert solved["cells"][1]["outputs"] == [] and solved["cells"][1]["execution_count"] is None
    assert solved["cells"][2]["outputs"] == nb["cells"][2]["outputs"]


NEW_EXERCISE_CELLS = [
    ("from tutorial_utils.exercises.correlation import q1, q2",
     "def my_correlation_batch(feat_fixed, feat_moving, disp_range):\n"
     "    # feat_fixed, feat_moving: [B, C, H, W] with B > 1; returns the cost volume [B, D*D, H, W]\n"
     "    raise NotImplementedError  # replace this line with your code",
     "q2.check(my_correlation_batch);\n# q2.hint()\n# q2.solution()"),
    ("from tutorial_utils.exercises.regularisation import q1, q2, q3",
     "def my_mean_field(cost, kernel, passes):\n"
     "    # cost: [B, D*D, h, w]; returns the averaged costs [B, D*D, h, w]\n"
     "    raise NotImplementedError  # replace this line with your code",
     "q3.check(my_mean_field);\n# q3.hint()\n# q3.solution()"),
    ("from tutorial_utils.exercises.three_d import q1",
     "def my_largest_d(grid, memory_gib):\n"
     "    # grid: feature voxels per axis; returns the largest odd D whose float32 cost volume fits (0 if none)\n"
     "    raise NotImplementedError  # replace this line with your code",
     "q1.check(my_largest_d);\n# q1.hint()\n# q1.solution()"),
]
"""The cells that pose the newer exercises in the notebooks: import, stub, check."""


@pytest.mark.parametrize("import_line, stub, check", NEW_EXERCISE_CELLS, ids=lambda v: v.split("(")[0][-25:])
def test_new_exercise_cells_are_solved(import_line, stub, check):
    """The stub is found (by text and by syntax tree), solved, and its solution passes its checker."""
    nb = _notebook("import torch\n" + import_line, stub, check)
    assert [name for _, name in _stubs_by_text(nb)] == [name for _, name in find_stubs(nb)] != []
    name = find_stubs(nb)[0][1]
    exercise = _exercise_by_text(nb, name)
    solved, names = solve_notebook(nb)
    assert names == [name] and _stubs_by_text(solved) == []
    namespace = {"torch": torch}
    exec(_source(solved["cells"][1]), namespace)
    result = exercise.evaluate(namespace[name])
    assert result.passed, result.message
    namespace_stub = {}
    exec(stub, namespace_stub)
    assert exercise.evaluate(namespace_stub[name]).status == "not attempted"


def test_a_module_the_notebook_lacks_is_imported_in_the_cell():
    """The solution uses ``F``; without ``F`` in the notebook the solved cell imports it itself."""
    stub = "def my_label_loss(probabilities, labels_fixed, labels_moving, num_labels):\n    raise NotImplementedError"
    without = _notebook("import torch\nfrom tutorial_utils.exercises.training import q1", stub, "q1.check(my_label_loss)")
    text = _source(solve_notebook(without)[0]["cells"][1])
    assert text.startswith("import torch.nn.functional as F\n\n\ndef my_label_loss(")
    with_f = _notebook("import torch.nn.functional as F\nfrom tutorial_utils.exercises.training import q1", stub,
                       "q1.check(my_label_loss)")
    assert _source(solve_notebook(with_f)[0]["cells"][1]).startswith("def my_label_loss(")


def test_other_import_forms_and_string_sources():
    nb = _notebook("import tutorial_utils.exercises.regularisation as ex\nimport torch\nimport torch.nn.functional as F",
                   "def my_min_convolution(cost, disp_range):\n    '''To do.'''\n    raise NotImplementedError()",
                   "# check it\nex.q1.check(my_min_convolution)")
    nb["cells"][1]["source"] = _source(nb["cells"][1])  # one string, as some tools store it
    solved, names = solve_notebook(nb)
    assert names == ["my_min_convolution"]
    assert isinstance(solved["cells"][1]["source"], str) and solved["cells"][1]["source"].startswith("def my_min")


def test_functions_that_are_not_stubs_are_kept():
    cells = ("from tutorial_utils.exercises.correlation import q1",
             "def my_correlation_layer(feat_fixed, feat_moving, disp_range):\n    return feat_fixed",  # attempted
             "def helper(x):\n    raise NotImplementedError",  # not an exercise name
             "%matplotlib inline\nx = 1",
             "q1.check(my_correlation_layer)")
    nb = _notebook(*cells)
    assert solve_notebook(nb) == (nb, [])


def test_solution_defining_another_function_is_refused():
    """The stub is my_ssd, but q1's solution defines my_correlation_layer: the cells below would break."""
    nb = _notebook("from tutorial_utils.exercises.correlation import q1", STUB_CELL.format(name="my_ssd"),
                   "q1.check(my_ssd)")
    with pytest.raises(ValueError, match=r"cell 1 \(my_ssd\): the solution_code of tutorial_utils\.exercises\."
                                         r"correlation\.q1 .* defines my_correlation_layer, but the notebook's "
                                         r"stub defines my_ssd"):
        solve_notebook(nb)


class _OtherName(Exercise):
    name = "Exercise X"
    solution_code = """
    def my_other(x):
        return helper(x)
    """


def test_solved_cell_source_checks_the_name_and_the_names_it_needs():
    with pytest.raises(ValueError, match="defines my_other, but the notebook's stub defines my_thing"):
        solved_cell_source(_OtherName(), "my_thing")
    assert solved_cell_source(_OtherName(), "my_other") == "def my_other(x):\n    return helper(x)"
    with pytest.raises(ValueError, match="uses 'helper', which the notebook does not define"):
        solved_cell_source(_OtherName(), "my_other", notebook_names=set())
    assert solved_cell_source(_OtherName(), "my_other", notebook_names={"helper"}).startswith("def my_other")
    with pytest.raises(ValueError, match="has no solution_code"):
        solved_cell_source(Exercise(), "my_thing")


@pytest.mark.parametrize("cells, message", [
    (("from tutorial_utils.exercises.correlation import q1", STUB_CELL.format(name="my_correlation_layer")),
     r"cell 1 is the exercise stub my_correlation_layer, but no later cell calls qN\.check"),
    ((STUB_CELL.format(name="my_correlation_layer"), "q1.check(my_correlation_layer)"),
     r"cell 1 calls q1\.check\(my_correlation_layer\), but the notebook does not import q1"),
    (("from tutorial_utils.exercises.correlation import CorrelationLayerExercise as q1",
      STUB_CELL.format(name="my_correlation_layer"), "q1.check(my_correlation_layer)"),
     r"checks my_correlation_layer with tutorial_utils\.exercises\.correlation\.CorrelationLayerExercise, which is "
     r"type, not an Exercise"),
    (("from tutorial_utils.exercises.nowhere import q1", STUB_CELL.format(name="my_correlation_layer"),
      "q1.check(my_correlation_layer)"), r"tutorial_utils\.exercises\.nowhere cannot be imported"),
])
def test_stub_without_its_exercise_is_refused(cells, message):
    with pytest.raises(ValueError, match=message):
        solve_notebook(_notebook(*cells))


def test_not_a_notebook_is_refused():
    with pytest.raises(TypeError, match="nb must be a notebook dict with a 'cells' list"):
        solve_notebook({"metadata": {}})


# --------------------------------------------------------------------------- the command


def test_command_writes_the_solved_copies(tmp_path, capsys):
    out = tmp_path / "solved"
    solved_nb, plain_nb = NOTEBOOKS / NOTEBOOKS_WITH_STUBS[0], NOTEBOOKS / NOTEBOOKS_WITHOUT[0]
    assert main([str(solved_nb), str(plain_nb), "--output-dir", str(out)]) == 0
    printed = capsys.readouterr().out
    names = solve_notebook(_load(solved_nb))[1]
    assert f"solved {', '.join(names)}" in printed and "no exercises, copied unchanged" in printed
    assert (out / plain_nb.name).read_bytes() == plain_nb.read_bytes()
    text = (out / solved_nb.name).read_text(encoding="utf-8")
    written = json.loads(text)
    assert text == json.dumps(written, indent=1, ensure_ascii=False) + "\n"
    assert "\\u00b7" not in text and "·" in text  # unicode kept (the title's middle dot)
    assert written == solve_notebook(_load(solved_nb))[0] and _stubs_by_text(written) == []


def test_command_defaults_to_the_notebooks_folder(tmp_path, monkeypatch, capsys):
    (tmp_path / "notebooks").mkdir()
    for name in (NOTEBOOKS_WITH_STUBS[0], NOTEBOOKS_WITHOUT[0]):
        (tmp_path / "notebooks" / name).write_bytes((NOTEBOOKS / name).read_bytes())
    monkeypatch.chdir(tmp_path)
    assert main([]) == 0
    assert sorted(p.name for p in (tmp_path / "notebooks_solved").iterdir()) == sorted(
        [NOTEBOOKS_WITH_STUBS[0], NOTEBOOKS_WITHOUT[0]])
    assert "2 notebook(s) written to notebooks_solved" in capsys.readouterr().out


def test_command_runs_as_a_module(tmp_path):
    notebook = NOTEBOOKS / NOTEBOOKS_WITH_STUBS[0]
    done = subprocess.run([sys.executable, "-m", "tutorial_utils.exercises.solved", str(notebook),
                           "--output-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"-> {tmp_path / notebook.name}: solved my_" in done.stdout
    assert _stubs_by_text(_load(tmp_path / notebook.name)) == []


def test_command_refuses_to_overwrite_the_notebooks(capsys):
    notebook = NOTEBOOKS / NOTEBOOKS_WITH_STUBS[0]
    before = notebook.read_bytes()
    for out in (NOTEBOOKS, NOTEBOOKS / ".." / "notebooks"):
        exits_with_usage(main, [str(notebook), "--output-dir", str(out)],
                         "is the folder of the input notebook", capsys)
    assert notebook.read_bytes() == before


def test_command_refuses_bad_arguments(tmp_path, monkeypatch, capsys):
    notebook = str(NOTEBOOKS / NOTEBOOKS_WITH_STUBS[0])
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "broken.ipynb").write_text("{not json")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "01.ipynb").write_text("{}")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "01.ipynb").write_text("{}")
    cases = [
        ([str(tmp_path / "file.txt")], "expected a notebook (.ipynb)"),
        ([str(tmp_path / "missing.ipynb")], "no such notebook"),
        ([notebook, "--output-dir", str(tmp_path / "file.txt")], "is a file, not a folder"),
        ([str(tmp_path / "broken.ipynb"), "--output-dir", str(tmp_path / "out")], "not a notebook (invalid JSON"),
        ([str(tmp_path / "a" / "01.ipynb"), str(tmp_path / "b" / "01.ipynb"), "--output-dir", str(tmp_path / "o")],
         "two notebooks named 01.ipynb"),
        ([notebook, "--unknown"], "unrecognized arguments: --unknown"),
    ]
    for argv, message in cases:
        exits_with_usage(main, argv, message, capsys)
    monkeypatch.chdir(tmp_path / "a")
    exits_with_usage(main, [], "no notebooks/*.ipynb here", capsys)


def test_command_writes_nothing_when_a_notebook_is_faulty(tmp_path, capsys):
    faulty = tmp_path / "faulty.ipynb"
    faulty.write_text(json.dumps(_notebook(STUB_CELL.format(name="my_correlation_layer"))))
    out = tmp_path / "out"
    exits_with_usage(main, [str(NOTEBOOKS / NOTEBOOKS_WITH_STUBS[0]), str(faulty), "--output-dir", str(out)],
                     f"{faulty}: cell 0 is the exercise stub my_correlation_layer", capsys)
    assert not out.exists()
