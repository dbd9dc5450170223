"""What every benchmark script shares: the clock, the memory meter, the machine and the command line.

Measurement rules: warm-up calls first, then the median of repeated calls
(:func:`time_call`); CUDA work is synchronised before the clock is read; peak memory is
measured in a separate call from timing (:func:`peak_memory_bytes`): on CUDA with
``torch.cuda.max_memory_allocated``, on the CPU from the allocation and free events that
``torch.profiler`` records with ``profile_memory=True`` (every tensor allocated through
PyTorch's CPU allocator, including autograd's saved tensors and temporaries; scratch memory
that BLAS libraries allocate themselves is not counted). Peak memory is reported above what
was allocated before the call (inputs and the incoming gradient are not counted, outputs and
input gradients are).

Timings need an otherwise idle machine. The load average before the run is recorded
(:func:`machine_info`). When other processes keep the cores busy, OpenMP's spin-waiting can
stall every parallel region of a layer made of many small operations (as ``correlation`` is)
by milliseconds; run with ``OMP_WAIT_POLICY=PASSIVE`` (or ``--threads 1``) to measure on a
shared machine.

Command line: each script describes itself as a :class:`Benchmark` (a name, a help line, a
function that adds its options, one that runs it and returns a JSON-serialisable dict, one that
formats that dict as a table) and nothing more: its ``main`` is ``BENCHMARK.main``, i.e.
:func:`main`, which adds ``--json PATH`` (also write the results; ``benchmark-results/`` is
git-ignored) and ``--threads N``, prints the table and writes the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

# tutorial_utils: every name this module uses, in one block
from tutorial_utils.checks import argument_type, check_int, check_number, check_odd

__all__ = [
    "Benchmark",
    "build_parser",
    "format_mib",
    "format_ms",
    "machine_info",
    "main",
    "matmul_flops",
    "non_negative_int",
    "odd_ints",
    "peak_memory_bytes",
    "positive_float",
    "positive_int",
    "positive_ints",
    "resolve_device",
    "time_call",
]


# --------------------------------------------------------------------------- measuring


def resolve_device(device: torch.device | str | None) -> torch.device:
    """``device`` as a ``torch.device``; None: CUDA where there is one, else the CPU."""
    return torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, warmup: int = 2, repeats: int = 7,
              max_seconds: float | None = None, min_repeats: int = 3) -> dict:
    """Median wall time of ``fn()`` in milliseconds, after ``warmup`` calls.

    With ``max_seconds``, fewer repeats are made (never fewer than ``min_repeats``) when one
    call is so slow that ``repeats`` calls would take longer. Returns
    ``{"median_ms", "min_ms", "repeats"}``.
    """
    times = []
    for _ in range(max(warmup, 0)):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    if max_seconds is not None and times:
        repeats = max(min_repeats, min(repeats, int(max_seconds / max(min(times), 1e-9))))
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "repeats": repeats}


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak memory allocated by PyTorch during ``fn()``, above what was allocated before it.

    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the running sum of the allocation and
    free events recorded by ``torch.profiler`` with ``profile_memory=True``, in time order.
    """
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return int(torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return int(peak)


@contextlib.contextmanager
def _quiet_stderr():
    """Hide what the profiler's C++ side prints to file descriptor 2 (start/stop notices)."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, AttributeError, ValueError):  # no real descriptor 2 (e.g. some notebook set-ups)
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def matmul_flops(device: torch.device, dtype: torch.dtype = torch.float32, size: int | None = None,
                 repeats: int = 5) -> float:
    """Measured FLOP/s of a large square matrix product (2 n^3 flops): the machine's practical peak."""
    n = size or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    timing = time_call(lambda: a @ b, device, warmup=2, repeats=repeats)
    return 2 * n**3 / (timing["median_ms"] * 1e-3)


def machine_info(device: torch.device) -> dict:
    """What the numbers were measured on."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# --------------------------------------------------------------------------- table cells


def format_mib(value) -> str:
    """Bytes as MiB with one decimal, ``-`` for None."""
    return "-" if value is None else f"{value / 2**20:.1f}"


def format_ms(value) -> str:
    """Milliseconds: two decimals below 100, none above, ``-`` for None."""
    return "-" if value is None else (f"{value:.2f}" if value < 100 else f"{value:.0f}")


# --------------------------------------------------------------------------- command line

# argparse types (a bad value: argparse's usage line, the message, exit status 2)
positive_int = argument_type(check_int, minimum=1)
non_negative_int = argument_type(check_int, minimum=0)
positive_float = argument_type(check_number, float, minimum=0, strict_minimum=True)
positive_ints = argument_type(check_int, many=True, minimum=1)
odd_ints = argument_type(check_odd, many=True)


@dataclass(frozen=True)
class Benchmark:
    """One script: ``run(args) -> dict`` (JSON-serialisable) and ``format(dict) -> str``.

    ``module`` is the script's module name under ``benchmarks`` (``python -m benchmarks.MODULE``);
    ``name`` is the ``"benchmark"`` entry of its results.
    """

    name: str
    module: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], dict]
    format: Callable[[dict], str]

    def build_parser(self) -> argparse.ArgumentParser:
        """:func:`build_parser` of this benchmark."""
        return build_parser(self)

    def main(self, argv: Sequence[str] | None = None) -> int:
        """:func:`main` of this benchmark: what ``python -m benchmarks.MODULE`` runs."""
        return main(self, argv)


def build_parser(benchmark: Benchmark) -> argparse.ArgumentParser:
    """The script's options: ``--json PATH``, ``--threads N`` and its own."""
    parser = argparse.ArgumentParser(
        prog=f"python -m benchmarks.{benchmark.module}",
        description=f"{benchmark.help}. Prints a table; --json writes the results.",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help=f"also write the results as JSON to PATH (e.g. benchmark-results/{benchmark.name}.json)")
    parser.add_argument("--threads", type=positive_int, default=None,
                        help="torch.set_num_threads for this run (default: torch's default)")
    benchmark.add_arguments(parser)
    return parser


def main(benchmark: Benchmark, argv: Sequence[str] | None = None) -> int:
    """Parse ``argv``, run the benchmark, print its table and, with ``--json``, write its results."""
    args = build_parser(benchmark).parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    result = benchmark.run(args)
    print(benchmark.format(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
        print(f"wrote {args.json}")
    return 0


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)
