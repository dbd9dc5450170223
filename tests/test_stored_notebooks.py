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


MACHINE_PATHS = ("/home/", "/root/", "/Users/", "/tmp/", "/work/", "site-packages", "C:\\Users")
"""Pieces of paths that belong to the machine that stored the outputs, not to the tutorial."""


def stored_text(cell: dict) -> str:
    """Everything a cell stores as text: streams, plain-text results and errors."""
    parts = []
    for output in cell.get("outputs", []):
        parts.append("".join(output.get("text", "")))
        parts.append("".join(output.get("data", {}).get("text/plain", "")))
        parts.append("\n".join(output.get("traceback", [])))
    return "\n".join(parts)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_stored_outputs_are_clean(path):
    """No progress-bar residue (a bar at 0%), no paths of the storing machine, no widget state
    (it is several hundred kB and shows nothing without a kernel), and a kernelspec, so that
    Jupyter, Colab and Kaggle open the notebook with Python 3 without asking."""
    notebook = json.loads(path.read_text(encoding="utf-8"))
    assert notebook["metadata"].get("kernelspec", {}).get("language") == "python", f"{path.name}: no kernelspec"
    bars = [i for i, cell in enumerate(notebook["cells"]) if "%|" in stored_text(cell)]
    assert not bars, f"{path.name}: cells {bars} store a progress bar (store with TQDM_DISABLE=1)"
    paths = [(i, piece) for i, cell in enumerate(notebook["cells"]) for piece in MACHINE_PATHS
             if piece in stored_text(cell)]
    assert not paths, f"{path.name}: cells store paths of the machine: {paths}"
    widget_state = len(json.dumps(notebook["metadata"].get("widgets", {})))
    assert widget_state < 1000, f"{path.name}: {widget_state} bytes of widget state (store with store_widget_state=False)"
    views = [i for i, cell in enumerate(notebook["cells"]) for output in cell.get("outputs", [])
             if "application/vnd.jupyter.widget-view+json" in output.get("data", {})]
    assert not views, f"{path.name}: cells {views} store widget views whose state is not stored"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebooks_are_valid_nbformat(path):
    """Jupyter, Colab and Kaggle open only what the nbformat schema allows (cell ids, no outputs on markdown)."""
    nbformat = pytest.importorskip("nbformat")
    nbformat.validate(nbformat.read(path, as_version=4))
