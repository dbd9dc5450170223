"""Smoke tests of ``python -m benchmarks.correlation`` at tiny sizes (no assertions on speed)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.correlation import (
    correlation_ratios,
    format_correlation_table,
    main,
    run_correlation_benchmark,
)

REPO = Path(__file__).resolve().parents[1]
TINY = ["--sizes", "6x8,5x7", "--disp-ranges", "3,5", "--channels", "2", "--warmup", "0", "--repeats", "1",
        "--no-peak"]


def test_cli_writes_json_and_prints_a_table(tmp_path, capsys):
    out = tmp_path / "results" / "correlation.json"
    assert main([*TINY, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "unfold (2019)" in printed and "correlation vs unfold" in printed
    result = json.loads(out.read_text())
    assert result["benchmark"] == "correlation"
    assert result["settings"]["disp_ranges"] == [3, 5]
    assert len(result["rows"]) == 2 * 2 * 2  # sizes x D x implementations
    for row in result["rows"]:
        assert row["forward_ms"] > 0 and row["forward_backward_ms"] > 0, row
        cost_bytes = 4 * row["D"] ** 2 * row["H"] * row["W"]  # the float32 cost volume [1, D*D, H, W]
        assert row["forward_peak_bytes"] >= cost_bytes, row  # at least the cost volume itself
        assert row["forward_backward_peak_bytes"] >= cost_bytes, row
    assert {r["impl"] for r in result["rows"]} == {"unfold (2019)", "correlation"}
    assert result["machine"]["device"] in ("cpu", "cuda")


def test_module_entry_point_runs(tmp_path):
    out = tmp_path / "c.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.correlation", *TINY, "--metric", "dot",
                           "--json", str(out)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {r["impl"] for r in rows} == {"correlation"}  # the unfold layer has no dot metric


def test_skipped_unfold_rows_and_ratios():
    result = run_correlation_benchmark(sizes=[(6, 8)], disp_ranges=[3], channels=2, warmup=0, repeats=1,
                                       max_unfold_gb=1e-9, measure_peak=False)
    unfold_row = [r for r in result["rows"] if r["impl"] == "unfold (2019)"][0]
    assert unfold_row["skipped"] and unfold_row["forward_ms"] is None
    assert correlation_ratios(result) == []
    assert "skipped" in format_correlation_table(result)


def test_peak_flops_and_fraction_are_reported():
    result = run_correlation_benchmark(sizes=[(6, 8)], disp_ranges=[3], channels=2, warmup=0, repeats=1,
                                       measure_peak=True)
    assert result["peak_flops"] > 0
    assert all(0 < r["forward_fraction_of_peak"] for r in result["rows"])
    ratios = correlation_ratios(result)
    assert len(ratios) == 1 and ratios[0]["forward_memory_ratio"] > 0


def test_min_statistic_and_the_plot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tutorial_utils.plotting import plot_correlation_benchmark

    result = run_correlation_benchmark(sizes=[(6, 8)], disp_ranges=[3, 5], channels=2, warmup=0, repeats=2,
                                       measure_peak=False)
    fast = correlation_ratios(result, statistic="min")
    assert len(fast) == 2 and all(r["forward_backward_speedup"] > 0 for r in fast)
    with pytest.raises(ValueError, match="statistic"):
        correlation_ratios(result, statistic="mean")
    for statistic in ("median", "min"):
        fig = plot_correlation_benchmark(result, statistic=statistic)
        assert len(fig.axes) == 2 and len(fig.axes[0].lines) == 4  # 2 impls x (fwd+bwd, fwd)
        plt.close(fig)
