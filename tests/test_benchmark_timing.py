"""The shared helpers of the benchmark scripts (``benchmarks.timing``) and their command lines."""

from __future__ import annotations

import json
import time

import pytest
import torch
from cli_helpers import exits_with_usage

from benchmarks import __main__ as listing
from benchmarks import correlation, three_d, timing, training
from benchmarks.timing import Benchmark, machine_info, peak_memory_bytes, time_call


def test_peak_memory_counts_a_known_allocation():
    size = 1_000_000  # floats
    peak = peak_memory_bytes(lambda: torch.ones(size) + 1, torch.device("cpu"))
    assert peak >= 2 * 4 * size  # the ones and the sum are alive together
    assert peak < 4 * 4 * size


def test_time_call_reduces_repeats_for_slow_calls():
    timing_ = time_call(lambda: time.sleep(0.003), torch.device("cpu"), warmup=1, repeats=5)
    # a sleep lasts at least as long as asked: 3 ms per call, whatever the machine's load
    assert timing_["repeats"] == 5 and 3.0 <= timing_["min_ms"] <= timing_["median_ms"]
    slow = time_call(lambda: sum(range(20000)), torch.device("cpu"), warmup=1, repeats=50,
                     max_seconds=1e-6, min_repeats=2)
    assert slow["repeats"] == 2


def test_machine_info_names_the_device():
    info = machine_info(torch.device("cpu"))
    assert info["device"] == "cpu" and info["torch"] == torch.__version__


def test_table_cells():
    assert timing.format_ms(None) == "-" and timing.format_ms(1.234) == "1.23" and timing.format_ms(123.4) == "123"
    assert timing.format_mib(None) == "-" and timing.format_mib(3 * 2**20) == "3.0"


def test_a_new_script_gets_the_common_options(tmp_path, capsys):
    """``timing.main`` adds --json and --threads, prints the table and writes the results."""
    bench = Benchmark(name="dummy", module="dummy", help="a test entry",
                      add_arguments=lambda p: p.add_argument("--n", type=int, default=3),
                      run=lambda args: {"n": args.n, "x": float("nan")},
                      format=lambda result: f"n is {result['n']}")
    threads = torch.get_num_threads()
    out = tmp_path / "results" / "dummy.json"
    try:
        assert timing.main(bench, ["--n", "5", "--threads", "1", "--json", str(out)]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "n is 5" in printed and f"wrote {out}" in printed
    assert json.loads(out.read_text())["n"] == 5
    assert timing.build_parser(bench).prog == "python -m benchmarks.dummy"


def test_python_m_benchmarks_lists_the_scripts(capsys):
    assert listing.main() == 0
    printed = capsys.readouterr().out
    for module in ("correlation", "training", "three_d"):
        assert f"python -m benchmarks.{module}" in printed


@pytest.mark.parametrize("script, argv, message", [
    (correlation, ["--threads", "0"], "argument --threads: must be an integer >= 1, got 0"),
    (correlation, ["--disp-ranges", "9,8"], "argument --disp-ranges: must be an odd integer >= 1 (a centred"),
    (correlation, ["--disp-ranges", "9,x"], "argument --disp-ranges: expected an integer, got 'x'"),
    (correlation, ["--sizes", "0x64"], "argument --sizes: sizes must be positive"),
    (correlation, ["--sizes", "80by64"], "argument --sizes: sizes must look like 80x64,160x128"),
    (correlation, ["--repeats", "0"], "argument --repeats: must be an integer >= 1"),
    (correlation, ["--max-seconds", "nan"], "argument --max-seconds: must be a finite number"),
    (correlation, ["--device", "gpu"], "argument --device:"),
    (correlation, ["correlation"], "unrecognized arguments: correlation"),
    (training, ["--pairs", "-5"], "argument --pairs: must be an integer >= 1, got -5"),
    (training, ["--source", "bogus"], "argument --source: invalid choice: 'bogus'"),
    (training, ["--images-per-step", "1"], "argument --images-per-step: must be an integer >= 2"),
    (three_d, ["--grids", "16,-1"], "argument --grids: must be an integer >= 1, got -1"),
    (three_d, ["--disp-ranges", "4"], "argument --disp-ranges: must be an odd integer >= 1 (a centred window), got 4"),
    (three_d, ["--grid-step", "0"], "argument --grid-step: must be an integer >= 1"),
], ids=lambda v: getattr(v, "__name__", None))
def test_every_script_refuses_bad_arguments(script, argv, message, capsys):
    exits_with_usage(script.main, argv, message, capsys)
