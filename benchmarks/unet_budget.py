"""Is the continuous U-Net of notebook 05 trained long enough? Its test Dice against its training budget.

Trains :class:`~tutorial_utils.models.DisplacementUNet` with
:func:`~tutorial_utils.continuous.train_unet` (its defaults, seed 0, one thread, on the CPU)
once per budget in ``--budgets``: multiples of the feature CNN's 12000 training pairs, converted
with the measured speed ratio 12849 / 12000 of ``tutorial_utils/checkpoints/README.md`` (so 1 is
the shipped checkpoint's equal budget). Each network is scored on the 56 ordered test pairs of
the phantom with :func:`~tutorial_utils.evaluation.evaluate_registration`. The JSON holds each
run's loss per step and per-pair Dice; notebook 05 draws its learning curve from
``tutorial_utils/checkpoints/unet_budget.json``, made with

    python -m benchmarks.unet_budget --budgets 0.5 2 --json tutorial_utils/checkpoints/unet_budget.json
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from tutorial_utils.continuous import register_unet, train_unet
from tutorial_utils.data import Dataset, load_dataset
from tutorial_utils.evaluation import evaluate_registration

from .timing import Benchmark, positive_float

__all__ = ["CNN_PAIRS", "UNET_PAIRS_PER_CNN_PAIR", "run_budget", "run_unet_budget", "format_unet_budget_table",
           "BENCHMARK"]

CNN_PAIRS = 12000
"""The feature CNN checkpoint's training pairs: the unit of the budgets."""
UNET_PAIRS_PER_CNN_PAIR = 12849 / 12000
"""The measured speed ratio of the two training loops (tutorial_utils/checkpoints/README.md)."""


def run_budget(dataset: Dataset, multiple: float, seed: int = 0, progress: bool = True) -> dict:
    """Train one U-Net on ``multiple`` x the equal budget and score it on ``dataset``'s test pairs.

    Returns a JSON-ready dict: ``budget``, ``pairs`` (whole steps), ``seconds``, ``pairs_per_step``,
    ``loss`` (one value per step), ``mean_dice`` and ``folding`` (one value per test pair),
    ``test_pairs`` ([P, 2]).
    """
    num_pairs = max(1, round(multiple * CNN_PAIRS * UNET_PAIRS_PER_CNN_PAIR))
    model, history = train_unet(dataset, num_pairs=num_pairs, seed=seed, device="cpu", threads=1, progress=progress)
    result = evaluate_registration(dataset, register=lambda fixed, moving: register_unet(model, fixed, moving))
    return {"budget": multiple, "pairs": history.pairs, "seconds": history.seconds,
            "pairs_per_step": history.pairs_per_step, "loss": [float(v) for v in history],
            "mean_dice": result["mean_dice"].tolist(), "folding": result["folding"].tolist(),
            "test_pairs": result["pairs"].tolist()}


def run_unet_budget(budgets, dataset: Dataset | None = None, progress: bool = True) -> dict:
    """:func:`run_budget` for every multiple in ``budgets`` (default data: the phantom)."""
    dataset = load_dataset(source="synthetic", verbose=False) if dataset is None else dataset
    return {"benchmark": "unet_budget", "runs": [run_budget(dataset, m, progress=progress) for m in budgets]}


def format_unet_budget_table(result: dict) -> str:
    """One line per run: budget, pairs, seconds, the loss at the start and end, the test Dice."""
    lines = ["continuous U-Net: test Dice against the training budget (1 = the equal budget of notebook 05)",
             f"{'budget':>7s} {'pairs':>7s} {'seconds':>8s} {'loss start':>10s} {'loss end':>9s} {'mean Dice':>10s}"]
    for run in result["runs"]:
        loss = np.asarray(run["loss"])
        tail = max(1, len(loss) // 20)  # the mean of the first and the last twentieth of the steps
        lines.append(f"{run['budget']:7.2f} {run['pairs']:7d} {run['seconds']:8.0f} {loss[:tail].mean():10.4f} "
                     f"{loss[-tail:].mean():9.4f} {np.mean(run['mean_dice']):10.3f}")
    return "\n".join(lines)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--budgets", type=positive_float, nargs="+", default=[0.5, 2.0],
                        help="multiples of the equal budget (12849 U-Net pairs), one run each (default: 0.5 2)")


def _run(args: argparse.Namespace) -> dict:
    return run_unet_budget(args.budgets)


BENCHMARK = Benchmark(
    name="unet_budget",
    module="unet_budget",
    help="the continuous U-Net's test Dice against its training budget (notebook 05's learning curve)",
    add_arguments=_add_arguments,
    run=_run,
    format=format_unet_budget_table,
)

build_parser, main = BENCHMARK.build_parser, BENCHMARK.main  # the command line, see benchmarks.timing


if __name__ == "__main__":
    sys.exit(main())
