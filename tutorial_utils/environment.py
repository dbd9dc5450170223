"""Device choice, seeding and the version banner every notebook prints first."""

from __future__ import annotations

import os
import platform
import random
import sys

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


def where_am_i() -> str:
    """``"kaggle"``, ``"colab"`` or ``"local"``."""
    if "google.colab" in sys.modules or os.environ.get("COLAB_RELEASE_TAG"):
        return "colab"
    if os.environ.get("KAGGLE_KERNEL_RUN_TYPE") or os.path.isdir("/kaggle/input"):
        return "kaggle"
    return "local"


def setup_notebook(seed: int = 0, device: str | None = None, verbose: bool = True) -> torch.device:
    """Seed everything, pick the device and print one line of versions.

    Returns the chosen ``torch.device``.
    """
    import matplotlib

    from . import __version__

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
