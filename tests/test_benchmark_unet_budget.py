"""``python -m benchmarks.unet_budget`` at a tiny size, and the stored learning curve notebook 05 reads."""

from __future__ import annotations

import json
import math
from pathlib import Path

from cli_helpers import exits_with_usage

from benchmarks.unet_budget import (
    CNN_PAIRS,
    UNET_PAIRS_PER_CNN_PAIR,
    build_parser,
    format_unet_budget_table,
    run_unet_budget,
)
from tutorial_utils.data import Dataset
from tutorial_utils.phantom import LABEL_NAMES, make_phantom

STORED = Path(__file__).resolve().parent.parent / "tutorial_utils" / "checkpoints" / "unet_budget.json"


def tiny_dataset() -> Dataset:
    images, labels = make_phantom(num_slices=5, seed=3, shape=(64, 80))
    return Dataset.from_arrays(images, labels, LABEL_NAMES, train_ids=range(3), test_ids=range(3, 5))


def test_a_tiny_budget_trains_scores_and_formats():
    multiple = 10 / (CNN_PAIRS * UNET_PAIRS_PER_CNN_PAIR)  # 10 pairs: two steps of 3 slices (6 pairs each)
    result = run_unet_budget([multiple], tiny_dataset(), progress=False)
    (run,) = result["runs"]
    assert run["pairs_per_step"] == 6 and run["pairs"] == 12 and len(run["loss"]) == 2  # whole steps
    assert run["test_pairs"] == [[3, 4], [4, 3]] and len(run["mean_dice"]) == len(run["folding"]) == 2
    assert all(0 <= d <= 1 for d in run["mean_dice"]) and all(math.isfinite(v) for v in run["loss"])
    table = format_unet_budget_table(result)
    assert f"{sum(run['mean_dice']) / 2:10.3f}" in table and f"{run['pairs']:7d}" in table


def test_command_line(capsys):
    assert build_parser().parse_args([]).budgets == [0.5, 2.0]
    assert build_parser().parse_args(["--budgets", "0.25", "1"]).budgets == [0.25, 1.0]
    exits_with_usage(build_parser().parse_args, ["--budgets", "0"], "--budgets", capsys)


def test_the_stored_curve_is_what_notebook_05_reads():
    runs = json.loads(STORED.read_text())["runs"]
    assert sorted(run["budget"] for run in runs) == [0.5, 2.0]
    for run in runs:  # whole steps of 12 pairs, at least the requested multiple of 12849
        assert run["pairs"] % 12 == 0 and 0 <= run["pairs"] - run["budget"] * 12849 < 12
        assert len(run["loss"]) == run["pairs"] // 12 and len(run["mean_dice"]) == 56
        assert all(0 <= d <= 1 for d in run["mean_dice"])
