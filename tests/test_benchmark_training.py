"""Smoke test of ``python -m benchmarks.training`` at a tiny size (no assertions on speed)."""

from __future__ import annotations

import pytest

from benchmarks.training import build_parser, format_training_table, run_training_benchmark


@pytest.fixture(scope="module")
def phantom_cache(tmp_path_factory):
    """A data cache for the synthetic set (built once)."""
    return tmp_path_factory.mktemp("cache")


def test_training_benchmark_runs_and_formats(monkeypatch, phantom_cache):
    monkeypatch.setenv("L2R_DATA_DIR", str(phantom_cache))
    result = run_training_benchmark(pairs=2, pairs_2019=1, repeats=1, images_per_step=2, device="cpu")
    loops = [row["loop"] for row in result["rows"]]
    assert loops[0] == "2019 loop" and len(loops) == 4
    assert all(row["pairs_per_second"] > 0 for row in result["rows"])
    assert result["speedup"] == result["rows"][1]["speedup"]
    assert "2019 loop" in format_training_table(result)


def test_command_line_defaults():
    args = build_parser().parse_args([])
    assert (args.pairs, args.pairs_2019, args.repeats, args.images_per_step, args.source) == (
        240, 24, 2, None, "synthetic")
    assert args.json is None and args.threads is None
