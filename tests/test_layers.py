"""The layering rule of CONTRIBUTING.md: nothing imports upward; building blocks import only ``checks``.

The imports are read from the source (``ast``), so the test sees what a reader sees,
including imports inside functions.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tutorial_utils"

LAYERS = [
    {"checks"},
    {"offsets"},
    {"environment", "correlation", "regularisation", "transform", "metrics", "features", "models", "phantom",
     "organ_check"},
    {"registration", "prealign", "instance", "data", "data_files", "plotting", "scans", "losses", "regularisation_fast",
     "evaluation", "explorer", "three_d"},
    {"train", "training", "pipeline_2019", "continuous", "widgets", "register", "compare"},
    {"exercises"},
]
"""Lowest first, as in CONTRIBUTING.md."""


def layer_of(module: str) -> int:
    for level, names in enumerate(LAYERS):
        if module in names:
            return level
    raise KeyError(module)


def imported_modules(source: str, in_subpackage: bool = False) -> set[str]:
    """Names of the ``tutorial_utils`` modules that ``source`` imports (relative or absolute).

    ``in_subpackage``: the source is a module of a subpackage (e.g. ``exercises``), where
    ``from .x`` is a sibling and ``from ..x`` a package module.
    """
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("tutorial_utils.")}
            continue
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 0:
            if not (node.module or "").startswith("tutorial_utils."):
                continue
            module = node.module.split(".", 1)[1]
        elif node.level == (2 if in_subpackage else 1):
            module = node.module or ""
        else:  # a sibling inside the subpackage
            continue
        if module:
            found.add(module.split(".")[0])
        else:  # from . import x, y
            found |= {alias.name for alias in node.names}
    return found


def package_modules():
    for path in sorted(PACKAGE.glob("*.py")):
        if path.stem != "__init__":
            yield path.stem, path
    for path in sorted(PACKAGE.glob("*/*.py")):
        yield path.parent.name, path


def test_every_module_has_a_layer():
    missing = {name for name, _ in package_modules() if all(name not in layer for layer in LAYERS)}
    assert not missing, f"add these modules to LAYERS and to CONTRIBUTING.md: {sorted(missing)}"


@pytest.mark.parametrize("name, path", list(package_modules()), ids=lambda v: str(v).split("tutorial_utils/")[-1])
def test_no_module_imports_upward(name, path):
    """The foundation and the building blocks import only the layers below them; higher modules their own layer
    and below."""
    level = layer_of(name)
    limit = level if level <= 2 else level + 1
    imports = imported_modules(path.read_text(), in_subpackage=path.parent != PACKAGE)
    upward = {m for m in imports if m != name and m in set().union(*LAYERS) and layer_of(m) >= limit}
    assert not upward, f"{path.name} (layer {level}) imports {sorted(upward)} from a layer it may not use"


def test_the_reader_finds_upward_imports():
    """The test above can fail: the reader sees relative, absolute and function-level imports."""
    source = ("from .registration import register_images\nfrom . import data\n"
              "def f():\n    import tutorial_utils.train\n    from tutorial_utils.widgets import x\n")
    assert imported_modules(source) == {"registration", "data", "train", "widgets"}
    assert imported_modules("from ..metrics import dice\nfrom ._core import Exercise\n", in_subpackage=True) == {"metrics"}
