"""``python -m benchmarks``: the benchmark scripts and what each measures."""

from __future__ import annotations

import sys

from . import correlation, three_d, training, unet_budget

SCRIPTS = (correlation.BENCHMARK, training.BENCHMARK, three_d.BENCHMARK, unet_budget.BENCHMARK)


def main() -> int:
    for bench in SCRIPTS:
        print(f"python -m benchmarks.{bench.module:<12s} {bench.help}")
    print("each takes --help, --json PATH and --threads N")
    return 0


if __name__ == "__main__":
    sys.exit(main())
