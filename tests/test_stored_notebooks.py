"""The notebooks as stored in the repository: what a learner sees on GitHub before running anything.

A notebook executed with ``MPLBACKEND=agg`` stores no figures (``plt.show()`` draws nothing
there), which happened once unnoticed; every figure cell must keep its picture.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def figure_cells(notebook: dict) -> list[int]:
    """Indices of code cells that always show a matplotlib figure: ``plt.show()`` unindented
    (not inside an ``if`` for the real data only, nor inside a function)."""
    return [i for i, cell in enumerate(notebook["cells"])
            if cell["cell_type"] == "code" and "plt.show()" in "".join(cell["source"]).splitlines()]


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 6


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_figure_cell_stores_its_figure(path):
    notebook = json.loads(path.read_text(encoding="utf-8"))
    missing = [i for i in figure_cells(notebook)
               if not any("image/png" in output.get("data", {}) for output in notebook["cells"][i].get("outputs", []))]
    assert figure_cells(notebook), f"{path.name}: no figure cells found"
    assert not missing, f"{path.name}: cells {missing} store no figure (executed with MPLBACKEND=agg?)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_no_stored_errors(path):
    notebook = json.loads(path.read_text(encoding="utf-8"))
    errors = [i for i, cell in enumerate(notebook["cells"]) if cell["cell_type"] == "code"
              for output in cell.get("outputs", []) if output.get("output_type") == "error"]
    assert not errors, f"{path.name}: cells {errors} store an error"
