"""Device choice, seeding and the version banner every notebook prints first."""

from __future__ import annotations

import math
import os
import platform
import random
import sys
from collections.abc import Mapping

import numpy as np
import torch

QUICK_ENV_VAR = "L2R_QUICK"
"""Set ``L2R_QUICK=1`` to shorten long computations (training) for CI; learners leave it unset."""


def quick_mode() -> bool:
    """True when the environment asks for the shortened CI run (``L2R_QUICK=1``)."""
    return os.environ.get(QUICK_ENV_VAR, "0").strip().lower() not in ("", "0", "false", "no")


def choose_device(prefer: str | None = None) -> torch.device:
    """CUDA when present, else the CPU. ``prefer`` ("cpu"/"cuda") overrides the choice."""
    if prefer is not None:
        if prefer.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {prefer!r} was asked for, but CUDA is not available here")
        return torch.device(prefer)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) so that a rerun gives the same numbers."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def assert_close(measured: Mapping[str, float] | float, expected: Mapping[str, float] | float,
                 tol: float, what: str = "value") -> None:
    """Assert that measured numbers equal the stored ones within an absolute tolerance ``tol``.

    Notebooks check their numbers with it instead of comparing printed digits: another CPU
    (AVX-512, AVX2 or plain kernels), another thread count or another torch release changes
    floats in the last bits, and long computations (training, mean field) amplify that. A
    real regression moves a number by more than ``tol``; float noise does not.
    ``measured`` and ``expected``: two numbers, or two dicts with the same keys.
    """
    if not isinstance(measured, Mapping):
        measured, expected = {what: measured}, {what: expected}
    if set(measured) != set(expected):
        raise AssertionError(f"{what}: measured {sorted(measured)} but expected {sorted(expected)}")
    off = {k: (float(measured[k]), float(expected[k])) for k in expected
           if not math.isfinite(float(measured[k])) or abs(float(measured[k]) - float(expected[k])) > tol}
    if off:
        lines = ", ".join(f"{k}: {m:.4f} (expected {e:.4f})" for k, (m, e) in off.items())
        raise AssertionError(f"{what} differs from the stored result by more than {tol}: {lines}")


def where_am_i() -> str:
    """``"kaggle"``, ``"colab"`` or ``"local"``."""
    if "google.colab" in sys.modules or os.environ.get("COLAB_RELEASE_TAG"):
        return "colab"
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE") or os.path.isdir("/kaggle/input"):
        return "kaggle"
    return "local"


FIGURE_DPI = 72
"""The one figure resolution of every notebook (dots per inch): moderate stored notebooks."""


def setup_notebook(seed: int = 0, device: str | None = None, verbose: bool = True) -> torch.device:
    """Seed everything, pick the device, set the figure resolution and print one line of versions.

    Returns the chosen ``torch.device``.
    """
    import matplotlib
    import matplotlib.pyplot as plt  # activates the notebook's backend, which sets its own rc first

    from . import __version__

    plt.rcParams["figure.dpi"] = FIGURE_DPI
    seed_everything(seed)
    chosen = choose_device(device)
    if verbose:
        print(
            f"tutorial_utils {__version__} | python {platform.python_version()} | "
            f"torch {torch.__version__} | numpy {np.__version__} | matplotlib {matplotlib.__version__}"
        )
        print(f"running on: {where_am_i()} | device: {chosen.type} | seed: {seed}"
              + (" | quick mode (L2R_QUICK=1)" if quick_mode() else ""))
    return chosen
