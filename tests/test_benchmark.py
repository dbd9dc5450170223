"""Smoke tests of ``python -m tutorial_utils.benchmark`` at tiny sizes (no assertions on speed)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from tutorial_utils import benchmark
from tutorial_utils.benchmark import (
    BENCHMARKS,
    Benchmark,
    correlation_ratios,
    format_correlation_table,
    main,
    peak_memory_bytes,
    register,
    run_correlation_benchmark,
    time_call,
)

TINY = ["--sizes", "6x8,5x7", "--disp-ranges", "3,5", "--channels", "2", "--warmup", "0", "--repeats", "1",
        "--no-peak"]


def test_cli_writes_json_and_prints_a_table(tmp_path, capsys):
    out = tmp_path / "results" / "correlation.json"
    assert main(["correlation", *TINY, "--json", str(out)]) == 0
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
    proc = subprocess.run([sys.executable, "-m", "tutorial_utils.benchmark", "correlation", *TINY,
                           "--metric", "dot", "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {r["impl"] for r in rows} == {"correlation"}  # the unfold layer has no dot metric


def test_list_and_missing_subcommand(capsys):
    assert main(["--list"]) == 0
    assert "correlation" in capsys.readouterr().out
    assert main([]) == 2


def test_bad_arguments_exit_with_usage(capsys):
    with pytest.raises(SystemExit, match="^2$"):  # argparse's usage error
        main(["correlation", "--sizes", "80by64"])
    assert "--sizes" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="^2$"):
        main(["no-such-benchmark"])
    assert "no-such-benchmark" in capsys.readouterr().err


def test_registry_takes_a_new_benchmark(capsys):
    def run(args):
        return {"n": args.n}

    bench = Benchmark(name="dummy-test", help="a test entry",
                      add_arguments=lambda p: p.add_argument("--n", type=int, default=3),
                      run=run, format=lambda result: f"n is {result['n']}")
    register(bench)
    try:
        with pytest.raises(ValueError, match="already registered"):
            register(bench)
        assert main(["dummy-test", "--n", "5"]) == 0
        assert "n is 5" in capsys.readouterr().out
    finally:
        BENCHMARKS.pop("dummy-test")


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


def test_peak_memory_counts_a_known_allocation():
    size = 1_000_000  # floats
    peak = peak_memory_bytes(lambda: torch.ones(size) + 1, torch.device("cpu"))
    assert peak >= 2 * 4 * size  # the ones and the sum are alive together
    assert peak < 4 * 4 * size


def test_time_call_reduces_repeats_for_slow_calls():
    timing = time_call(lambda: time.sleep(0.003), torch.device("cpu"), warmup=1, repeats=5)
    # a sleep lasts at least as long as asked: 3 ms per call, whatever the machine's load
    assert timing["repeats"] == 5 and 3.0 <= timing["min_ms"] <= timing["median_ms"]
    slow = time_call(lambda: sum(range(20000)), torch.device("cpu"), warmup=1, repeats=50,
                     max_seconds=1e-6, min_repeats=2)
    assert slow["repeats"] == 2


def test_machine_info_names_the_device():
    info = benchmark.machine_info(torch.device("cpu"))
    assert info["device"] == "cpu" and info["torch"] == torch.__version__


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
