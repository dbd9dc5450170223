"""Benchmarks of the tutorial's building blocks, one subcommand each.

    python -m tutorial_utils.benchmark --list
    python -m tutorial_utils.benchmark correlation [--json PATH] [--sizes 80x64,160x128] ...

Every benchmark is registered with :func:`register` (a name, a help line, a function that adds
its command-line options, a function that runs it and returns a JSON-serialisable dict, and
one that formats that dict as a table), so a new one (e.g. ``training``) is one more
``register(...)`` call. Results are printed as a table and, with ``--json PATH``, written to
a file (``benchmark-results/`` is git-ignored).

Measurement rules (shared helpers below): warm-up calls first, then the median of repeated
calls; CUDA work is synchronised before the clock is read; peak memory is measured in a
separate call from timing: on CUDA with ``torch.cuda.max_memory_allocated``, on the CPU from
the allocation and free events that ``torch.profiler`` records with ``profile_memory=True``
(every tensor allocated through PyTorch's CPU allocator, including autograd's saved tensors
and temporaries; scratch memory that BLAS libraries allocate themselves is not counted).
Peak memory is reported above what was allocated before the call (inputs and the incoming
gradient are not counted, outputs and input gradients are).

Timings need an otherwise idle machine. The load average before the run is recorded. When other
processes keep the cores busy, OpenMP's spin-waiting can stall every parallel region of a
layer made of many small operations (as ``correlation`` is) by milliseconds; run with
``OMP_WAIT_POLICY=PASSIVE`` (or ``--threads 1``) to measure on a shared machine.
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

from .checks import argument_type, check_int, check_number, check_odd
from .correlation import correlation, correlation_unfold
from .train import device_name

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "correlation_ratios",
    "cost_3d",
    "extrapolate_3d",
    "fit_3d",
    "format_3d_table",
    "format_correlation_table",
    "format_training_table",
    "machine_info",
    "main",
    "matmul_flops",
    "peak_memory_bytes",
    "register",
    "run_3d_benchmark",
    "run_correlation_benchmark",
    "run_training_benchmark",
    "time_call",
]


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Benchmark:
    """One subcommand: ``run(args) -> dict`` (JSON-serialisable) and ``format(dict) -> str``."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], dict]
    format: Callable[[dict], str]


BENCHMARKS: dict[str, Benchmark] = {}


def register(benchmark: Benchmark) -> Benchmark:
    """Add a benchmark to the command line (``python -m tutorial_utils.benchmark NAME``)."""
    if benchmark.name in BENCHMARKS:
        raise ValueError(f"a benchmark named {benchmark.name!r} is already registered")
    BENCHMARKS[benchmark.name] = benchmark
    return benchmark


# --------------------------------------------------------------------------- shared helpers


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


def _parse_sizes(text: str) -> list[tuple[int, int]]:
    sizes = []
    for item in text.split(","):
        try:
            h, w = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"sizes must look like 80x64,160x128 (H x W), got {item!r}") from None
        if h < 1 or w < 1:
            raise argparse.ArgumentTypeError(f"sizes must be positive (H x W), got {item!r}")
        sizes.append((h, w))
    return sizes


# argparse types (a bad value: argparse's usage line, the message, exit status 2)
_positive_int = argument_type(check_int, minimum=1)
_non_negative_int = argument_type(check_int, minimum=0)
_positive_float = argument_type(check_number, float, minimum=0, strict_minimum=True)
_positive_ints = argument_type(check_int, many=True, minimum=1)
_odd_ints = argument_type(check_odd, many=True)


# --------------------------------------------------------------------------- correlation


def _unfold_bytes(channels: int, height: int, width: int, disp_range: int, itemsize: int) -> int:
    """Size of the [B, C, D*D, H*W] tensor the unfold layer builds (B = 1)."""
    return channels * disp_range**2 * height * width * itemsize


def _measure_layer(fn, feat_fixed, feat_moving, grad_cost, disp_range, device, warmup, repeats, max_seconds) -> dict:
    """Forward (no grad) and forward+backward of ``fn(feat_fixed, feat_moving, disp_range)``."""
    fixed_g = feat_fixed.clone().requires_grad_(True)
    moving_g = feat_moving.clone().requires_grad_(True)

    def forward():
        with torch.no_grad():
            return fn(feat_fixed, feat_moving, disp_range)

    def forward_backward():
        fixed_g.grad = moving_g.grad = None
        fn(fixed_g, moving_g, disp_range).backward(grad_cost)

    t_fwd = time_call(forward, device, warmup, repeats, max_seconds)
    t_fb = time_call(forward_backward, device, warmup, repeats, max_seconds)
    fixed_g.grad = moving_g.grad = None
    result = {"forward_ms": t_fwd["median_ms"], "forward_min_ms": t_fwd["min_ms"],
              "forward_backward_ms": t_fb["median_ms"], "forward_backward_min_ms": t_fb["min_ms"],
              "repeats": t_fwd["repeats"], "forward_peak_bytes": peak_memory_bytes(forward, device)}
    result["forward_backward_peak_bytes"] = peak_memory_bytes(forward_backward, device)
    fixed_g.grad = moving_g.grad = None
    return result


def run_correlation_benchmark(
    sizes: Sequence[tuple[int, int]] = ((80, 64), (160, 128)),
    disp_ranges: Sequence[int] = (9, 21, 41),
    channels: int = 24,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
    metric: str = "ssd",
    warmup: int = 2,
    repeats: int = 7,
    max_seconds: float = 20.0,
    max_unfold_gb: float = 2.0,
    measure_peak: bool = True,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Time and peak memory of :func:`correlation_unfold` (the 2019 layer) and :func:`correlation`.

    For each feature-map size (H, W) and displacement range D: forward and forward+backward
    wall time (median over ``repeats`` after ``warmup``) and peak memory, batch 1, ``channels``
    channels, random features. The unfold layer is skipped where its [C, D*D, H*W] tensor
    alone would exceed ``max_unfold_gb`` (it needs about four of them for forward+backward).
    ``measure_peak=True`` also times a large matmul and reports the forward pass's
    arithmetic (``3*C*D*D*H*W`` flops: a subtraction, a multiplication, an addition per
    channel and offset) as a fraction of it.

    Returns:
        a JSON-serialisable dict: ``machine``, ``settings``, ``peak_flops`` (or None) and
        ``rows``, one per (H, W, D, implementation) with ``forward_ms``,
        ``forward_backward_ms``, ``forward_peak_bytes``, ``forward_backward_peak_bytes``
        (None where skipped) and ``forward_gflops``.
    """
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    impls = {
        "unfold (2019)": correlation_unfold,
        "correlation": lambda f, m, d: correlation(f, m, d, metric=metric),
    }
    if metric != "ssd":
        impls.pop("unfold (2019)")
    peak = matmul_flops(device, dtype) if measure_peak else None
    generator = torch.Generator().manual_seed(seed)
    itemsize = torch.empty((), dtype=dtype).element_size()
    rows = []
    for height, width in sizes:
        for disp_range in disp_ranges:
            shape = (1, channels, height, width)
            feat_fixed = torch.rand(shape, generator=generator, dtype=dtype).to(device)
            feat_moving = torch.rand(shape, generator=generator, dtype=dtype).to(device)
            grad_cost = torch.randn((1, disp_range**2, height, width), generator=generator, dtype=dtype).to(device)
            flops = 3 * channels * disp_range**2 * height * width
            for name, fn in impls.items():
                row = {"impl": name, "H": height, "W": width, "D": disp_range, "C": channels,
                       "forward_ms": None, "forward_backward_ms": None, "forward_peak_bytes": None,
                       "forward_backward_peak_bytes": None, "forward_gflops": None, "skipped": None}
                needed = _unfold_bytes(channels, height, width, disp_range, itemsize)
                if name.startswith("unfold") and needed > max_unfold_gb * 2**30:
                    row["skipped"] = (f"its [C, D*D, H*W] tensor alone is {needed / 2**30:.1f} GiB "
                                      f"(> --max-unfold-gb {max_unfold_gb:g}); forward+backward needs ~4x that")
                    rows.append(row)
                    continue
                if progress:
                    print(f"  {name:>14s}  {height}x{width}  D={disp_range} ...", file=sys.stderr, flush=True)

                row.update(_measure_layer(fn, feat_fixed, feat_moving, grad_cost, disp_range, device,
                                          warmup, repeats, max_seconds))
                row["forward_gflops"] = flops / (row["forward_ms"] * 1e-3) / 1e9
                if peak:
                    row["forward_fraction_of_peak"] = row["forward_gflops"] * 1e9 / peak
                rows.append(row)
    return {
        "benchmark": "correlation",
        "machine": machine_info(device),
        "settings": {"sizes": [list(s) for s in sizes], "disp_ranges": list(disp_ranges), "channels": channels,
                     "dtype": str(dtype).replace("torch.", ""), "metric": metric, "warmup": warmup,
                     "repeats": repeats, "max_seconds": max_seconds, "batch": 1},
        "peak_flops": peak,
        "rows": rows,
    }


def correlation_ratios(result: dict, statistic: str = "median") -> list[dict]:
    """Speed-up and memory saving of ``correlation`` over the unfold layer, per (H, W, D).

    ``statistic``: compare the ``"median"`` times (the default) or the ``"min"`` times (the
    fastest repeat: robust when other processes share the CPU).
    """
    if statistic not in ("median", "min"):
        raise ValueError(f"statistic must be 'median' or 'min', got {statistic!r}")
    suffix = "_min_ms" if statistic == "min" else "_ms"
    by_key: dict[tuple, dict] = {}
    for row in result["rows"]:
        by_key.setdefault((row["H"], row["W"], row["D"]), {})[row["impl"]] = row
    ratios = []
    for (height, width, disp_range), impls in by_key.items():
        slow, fast = impls.get("unfold (2019)"), impls.get("correlation")
        if not slow or not fast or slow.get("skipped") or fast.get("skipped"):
            continue

        def ratio(key, slow=slow, fast=fast):
            a, b = slow.get(key), fast.get(key)
            return a / b if a is not None and b else None

        ratios.append({"H": height, "W": width, "D": disp_range,
                       "forward_speedup": ratio("forward" + suffix),
                       "forward_backward_speedup": ratio("forward_backward" + suffix),
                       "forward_memory_ratio": ratio("forward_peak_bytes"),
                       "forward_backward_memory_ratio": ratio("forward_backward_peak_bytes")})
    return ratios


def _mib(value) -> str:
    return "-" if value is None else f"{value / 2**20:.1f}"


def _ms(value) -> str:
    return "-" if value is None else (f"{value:.2f}" if value < 100 else f"{value:.0f}")


def format_correlation_table(result: dict) -> str:
    """The benchmark as a plain-text table, followed by the ratios and the fraction of peak."""
    machine = result["machine"]
    lines = [f"correlation layer, C={result['settings']['channels']}, batch 1, {result['settings']['dtype']}, "
             f"metric {result['settings']['metric']} on {machine['device']} "
             f"({machine.get('gpu') or machine['processor']}, {machine['torch_threads']} threads, torch {machine['torch']})"]
    if machine.get("load_average_1min") is not None:
        lines.append(f"load average before the run: {machine['load_average_1min']:.2f} (cores: {machine['cpu_count']})"
                     + (f", OMP_WAIT_POLICY={machine['omp_wait_policy']}" if machine.get("omp_wait_policy") else ""))
    header = (f"{'impl':>14s} {'H x W':>9s} {'D':>3s} {'fwd ms':>8s} {'fwd+bwd ms':>10s} "
              f"{'fwd MiB':>8s} {'fwd+bwd MiB':>11s} {'fwd GFLOP/s':>11s} {'of peak':>7s}")
    lines += [header, "-" * len(header)]
    for row in result["rows"]:
        size = f"{row['H']}x{row['W']}"
        if row.get("skipped"):
            lines.append(f"{row['impl']:>14s} {size:>9s} {row['D']:>3d}  skipped: {row['skipped']}")
            continue
        frac = row.get("forward_fraction_of_peak")
        lines.append(
            f"{row['impl']:>14s} {size:>9s} {row['D']:>3d} {_ms(row['forward_ms']):>8s} "
            f"{_ms(row['forward_backward_ms']):>10s} {_mib(row['forward_peak_bytes']):>8s} "
            f"{_mib(row['forward_backward_peak_bytes']):>11s} {row['forward_gflops']:>11.2f} "
            f"{'-' if frac is None else f'{100 * frac:.1f}%':>7s}"
        )
    if result.get("peak_flops"):
        lines.append(f"peak: a {('8192' if machine['device'].startswith('cuda') else '2048')}^2 matmul "
                     f"runs at {result['peak_flops'] / 1e9:.1f} GFLOP/s; forward arithmetic = 3*C*D*D*H*W flops")
    ratios = correlation_ratios(result)
    if ratios:
        lines += ["", "correlation vs unfold (2019): speed-up (x) and peak-memory ratio (x)",
                  f"{'H x W':>9s} {'D':>3s} {'fwd':>7s} {'fwd+bwd':>8s} {'mem fwd':>8s} {'mem f+b':>8s}"]
        for r in ratios:
            cells = [f"{v:.1f}" if v is not None else "-" for v in (
                r["forward_speedup"], r["forward_backward_speedup"],
                r["forward_memory_ratio"], r["forward_backward_memory_ratio"])]
            lines.append(f"{r['H']}x{r['W']:<5d} {r['D']:>3d} {cells[0]:>7s} {cells[1]:>8s} {cells[2]:>8s} {cells[3]:>8s}")
    return "\n".join(lines)


def _correlation_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=_parse_sizes, default=[(80, 64), (160, 128)],
                        help="feature-map sizes H x W, comma separated (default 80x64,160x128)")
    parser.add_argument("--disp-ranges", type=_odd_ints, default=[9, 21, 41],
                        help="displacement ranges D (odd), comma separated (default 9,21,41)")
    parser.add_argument("--channels", type=_positive_int, default=24, help="feature channels C (default 24)")
    parser.add_argument("--metric", choices=["ssd", "dot"], default="ssd",
                        help="metric of the fast layer; the unfold layer only runs for ssd (default ssd)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--device", type=device_name, default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--warmup", type=_non_negative_int, default=2, help="warm-up calls per measurement (default 2)")
    parser.add_argument("--repeats", type=_positive_int, default=7,
                        help="timed calls per measurement, median reported (default 7)")
    parser.add_argument("--max-seconds", type=_positive_float, default=20.0,
                        help="fewer repeats (at least 3) where one measurement would take longer (default 20)")
    parser.add_argument("--max-unfold-gb", type=_positive_float, default=2.0,
                        help="skip the unfold layer where its [C, D*D, H*W] tensor exceeds this many GiB (default 2)")
    parser.add_argument("--no-peak", action="store_true", help="do not measure the matmul peak")


def _correlation_run(args: argparse.Namespace) -> dict:
    return run_correlation_benchmark(
        sizes=args.sizes, disp_ranges=args.disp_ranges, channels=args.channels, device=args.device,
        dtype=getattr(torch, args.dtype), metric=args.metric, warmup=args.warmup, repeats=args.repeats,
        max_seconds=args.max_seconds, max_unfold_gb=args.max_unfold_gb, measure_peak=not args.no_peak,
        progress=True,
    )


register(Benchmark(
    name="correlation",
    help="the 2019 unfold correlation layer vs tutorial_utils.correlation.correlation",
    add_arguments=_correlation_arguments,
    run=_correlation_run,
    format=format_correlation_table,
))


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m tutorial_utils.benchmark",
        description="Benchmarks of the l2r-discrete building blocks. Prints a table; --json writes the results.",
    )
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    for bench in BENCHMARKS.values():
        child = sub.add_parser(bench.name, help=bench.help, description=bench.help)
        child.add_argument("--json", type=Path, default=None, metavar="PATH",
                           help="also write the results as JSON to PATH (e.g. benchmark-results/correlation.json)")
        child.add_argument("--threads", type=_positive_int, default=None,
                           help="torch.set_num_threads for this run (default: torch's default)")
        bench.add_arguments(child)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.list or args.benchmark is None:
        for bench in BENCHMARKS.values():
            print(f"{bench.name:>14s}  {bench.help}")
        return 0 if args.list else 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    bench = BENCHMARKS[args.benchmark]
    result = bench.run(args)
    print(bench.format(result))
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
        print(f"wrote {args.json}")
    return 0


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)



# --- training benchmark ---


def run_training_benchmark(
    pairs: int = 240,
    pairs_2019: int = 24,
    repeats: int = 2,
    images_per_step: int | None = None,
    device: torch.device | str | None = None,
    threads: int | None = None,
    source: str = "synthetic",
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Training pairs per second: our loop against the 2019 loop, in the same run on the same device.

    The 2019 loop is :func:`tutorial_utils.train.train_features_2019`: one pair at a time, the
    CNN twice per pair, the unfold correlation layer, the slides' pooling regulariser, the
    unfolded label loss, Adam with the gradient accumulated over 4 pairs. Ours is
    :func:`tutorial_utils.train.train_features`: the CNN once per slice of a step and all
    ordered pairs among the step's slices, the fast correlation and regulariser, the shared
    label warp, chunked differentiation. Three rows of ours:

    * ``2019 settings``: the 2019 kernels (min-pool 3, two average pools 5, one mean-field
      round of three pools 5), ``alpha`` 10, zero border and no pre-alignment, read from
      :data:`tutorial_utils.train.TRAIN_DEFAULTS_2019` (``train_features_settings_2019``), so
      the same work per pair: the like-for-like comparison (the headline ``speedup``). Our
      loop still divides the costs by their mean and min-pools first (its own choices, no
      extra work), so its losses are not the 2019 loop's;
    * ``2019 settings, n=2``: the same with two slices per step (one CNN pass per pair), the
      speed-up that does not come from sharing the CNN between pairs;
    * ``default settings``: what ``train_features`` does by default (the regularisation of
      ``register_images``, which may be heavier, e.g. two mean-field rounds).

    Same CNN, loss, data, device and number of threads (``threads``; default 1 on the CPU, as
    both loops default to), denormals flushed in both. Each loop runs once to warm up, then
    ``repeats`` times; the median pairs/s is reported.

    Returns:
        a JSON-serialisable dict: ``machine``, ``settings``, ``rows`` (one per loop with
        ``pairs_per_second``, ``seconds_per_pair``, ``cnn_passes_per_pair``, ``speedup``) and
        ``speedup`` (ours with the 2019 settings over the 2019 loop).
    """
    from .data import load_dataset
    from .train import DEFAULTS, train_features, train_features_2019, train_features_settings_2019

    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dataset = load_dataset(source=source, seed=seed, verbose=False)
    n = images_per_step or DEFAULTS["images_per_step"]
    like_2019 = train_features_settings_2019()
    common = dict(seed=seed, device=device, progress=False, threads=threads)

    def measure(name: str, run, num_pairs: int, cnn_passes: float, step_size: int) -> dict:
        if progress:
            print(f"  {name} ...", file=sys.stderr, flush=True)
        run(step_size)  # warm-up: one step
        speeds = []
        for _ in range(repeats):
            _, history = run(num_pairs)
            speeds.append(history.pairs_per_second)
        speed = statistics.median(speeds)
        return {"loop": name, "images_per_step": None if cnn_passes == 2 else round(1 + 1 / cnn_passes),
                "pairs": history.pairs, "repeats": repeats, "pairs_per_second": speed,
                "pairs_per_second_all": speeds, "seconds_per_pair": 1.0 / speed, "cnn_passes_per_pair": cnn_passes}

    rows = [
        measure("2019 loop", lambda p: train_features_2019(dataset, num_pairs=p, **common), pairs_2019, 2.0, 4),
        measure(f"ours, 2019 settings, n={n}",
                lambda p: train_features(dataset, num_pairs=p, images_per_step=n, **like_2019, **common),
                pairs, 1.0 / (n - 1), n * (n - 1)),
        measure("ours, 2019 settings, n=2",
                lambda p: train_features(dataset, num_pairs=p, images_per_step=2, **like_2019, **common),
                pairs, 1.0, 2),
        measure(f"ours, default settings, n={n}",
                lambda p: train_features(dataset, num_pairs=p, images_per_step=n, **common),
                pairs, 1.0 / (n - 1), n * (n - 1)),
    ]
    base = rows[0]["pairs_per_second"]
    for row in rows:
        row["speedup"] = row["pairs_per_second"] / base
    used_threads = threads if threads is not None else (1 if device.type == "cpu" else torch.get_num_threads())
    return {
        "benchmark": "training",
        "machine": {**machine_info(device), "training_threads": used_threads},
        "settings": {"pairs": pairs, "pairs_2019": pairs_2019, "repeats": repeats, "source": dataset.source,
                     "image_size": list(dataset.image_size), "num_labels": dataset.num_labels,
                     "disp_range": DEFAULTS["disp_range"], "images_per_step": n, "seed": seed,
                     "threads": used_threads},
        "rows": rows,
        "speedup": rows[1]["speedup"],
    }


def format_training_table(result: dict) -> str:
    """The training benchmark as a plain-text table."""
    machine, settings = result["machine"], result["settings"]
    lines = [f"training loop, {settings['source']} slices {settings['image_size'][0]}x{settings['image_size'][1]}, "
             f"{settings['num_labels']} labels, D={settings['disp_range']} on {machine['device']} "
             f"({machine.get('gpu') or machine['processor']}, {settings['threads']} training threads, "
             f"torch {machine['torch']}, load average {machine.get('load_average_1min')})"]
    header = f"{'loop':>32s} {'pairs':>6s} {'pairs/s':>8s} {'s/pair':>8s} {'CNN/pair':>8s} {'speed-up':>8s}"
    lines += [header, "-" * len(header)]
    for row in result["rows"]:
        lines.append(f"{row['loop']:>32s} {row['pairs']:>6d} {row['pairs_per_second']:>8.2f} "
                     f"{row['seconds_per_pair']:>8.3f} {row['cnn_passes_per_pair']:>8.2f} {row['speedup']:>7.1f}x")
    lines.append(f"like for like (2019 settings), our loop trains {result['speedup']:.1f}x as many pairs per "
                 f"second as the 2019 loop (median of {settings['repeats']} runs each, after a warm-up)")
    return "\n".join(lines)


def _training_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", type=_positive_int, default=240, help="pairs per run of our loop (default 240)")
    parser.add_argument("--pairs-2019", type=_positive_int, default=24,
                        help="pairs per run of the 2019 loop (default 24)")
    parser.add_argument("--repeats", type=_positive_int, default=2,
                        help="timed runs per loop, median reported (default 2)")
    parser.add_argument("--images-per-step", type=argument_type(check_int, minimum=2), default=None,
                        help="our loop's slices per step (default: the training default)")
    parser.add_argument("--device", type=device_name, default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--source", choices=["synthetic", "tcia", "auto"], default="synthetic",
                        help="the slices to train on (default synthetic)")


def _training_run(args: argparse.Namespace) -> dict:
    return run_training_benchmark(pairs=args.pairs, pairs_2019=args.pairs_2019, repeats=args.repeats,
                                  images_per_step=args.images_per_step, device=args.device,
                                  threads=args.threads, source=args.source, progress=True)


register(Benchmark(
    name="training",
    help="training pairs per second: our loop (tutorial_utils.train) vs the 2019 loop",
    add_arguments=_training_arguments,
    run=_training_run,
    format=format_training_table,
))


# --------------------------------------------------------------------------- 3D (notebook 05)


def _sparse_counts(grid_shape: Sequence[int], grid_step: int) -> int:
    """Number of control points every ``grid_step`` voxels (the layout of ``control_points3d``)."""
    count = 1
    for n in grid_shape:
        first = ((n - 1) % grid_step) // 2
        count *= (n - 1 - first) // grid_step + 1
    return count


def cost_3d(grid_shape: int | Sequence[int], disp_range: int, bytes_per_value: int = 4, grid_step: int = 2,
            disp_step: int = 2, channels: int | None = None) -> dict:
    """Closed-form memory of a dense and a sparse (pdd_net style) 3D cost volume.

    Args:
        grid_shape: the feature grid (d, h, w), or one int for a cube; e.g. a 256^3 CT at
            stride 2 is 128. disp_range: D (odd). bytes_per_value: 4 for float32.
        grid_step, disp_step: the sparse variant: control points every ``grid_step`` voxels,
            displacements every ``disp_step`` voxels of {-r..r}^3 (see
            :func:`~tutorial_utils.correlation.sparse_correlation3d`).
        channels: also report the features' memory (C * voxels * bytes).

    Returns:
        ``voxels``, ``offsets`` (D**3), ``dense_bytes`` = D**3 * voxels * bytes,
        ``control_points`` P, ``sparse_offsets`` K = (2*(r // disp_step) + 1)**3,
        ``sparse_bytes`` = K * P * bytes, ``ratio`` = dense / sparse (and ``feature_bytes``).
    """
    shape = (grid_shape,) * 3 if isinstance(grid_shape, int) else tuple(int(n) for n in grid_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"grid_shape must be a positive int or three of them (d, h, w), got {grid_shape!r}")
    disp_range = check_odd("disp_range", disp_range)
    bytes_per_value = check_int("bytes_per_value", bytes_per_value, minimum=1)
    grid_step = check_int("grid_step", grid_step, minimum=1)
    disp_step = check_int("disp_step", disp_step, minimum=1)
    voxels = math.prod(shape)
    r = (disp_range - 1) // 2
    points = _sparse_counts(shape, grid_step)
    sparse_offsets = (2 * (r // disp_step) + 1) ** 3
    out = {"grid_shape": list(shape), "disp_range": disp_range, "voxels": voxels, "offsets": disp_range**3,
           "dense_bytes": disp_range**3 * voxels * bytes_per_value, "control_points": points,
           "sparse_offsets": sparse_offsets, "sparse_bytes": sparse_offsets * points * bytes_per_value,
           "grid_step": grid_step, "disp_step": disp_step}
    out["ratio"] = out["dense_bytes"] / out["sparse_bytes"]
    if channels is not None:
        out["feature_bytes"] = channels * voxels * bytes_per_value
    return out


def _sparse_step(disp_range: int, disp_step: int) -> int:
    """The displacement step of the sparse variant: ``disp_step``, but 1 where r < disp_step
    (otherwise only the zero displacement would be left)."""
    return disp_step if (disp_range - 1) // 2 >= disp_step else 1


def run_3d_benchmark(
    grid_sizes: Sequence[int] = (16, 24, 32),
    disp_ranges: Sequence[int] = (3, 5, 7, 9),
    channels: int = 24,
    grid_step: int = 2,
    disp_step: int = 2,
    device: torch.device | str | None = "cpu",
    threads: int | None = 1,
    warmup: int = 1,
    repeats: int = 3,
    measure_memory: bool = True,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """Time and peak memory of the 3D building blocks, dense and sparse, at small sizes.

    For feature grids n^3 (``grid_sizes``) and D in ``disp_ranges`` (batch 1, ``channels``
    random features, float32, no gradients):

    * ``dense``: :func:`~tutorial_utils.correlation.correlation3d` [1, D^3, n, n, n], then
      :func:`~tutorial_utils.regularisation.min_convolution3d` (min 3, two averages of 3),
      :func:`~tutorial_utils.regularisation.mean_field3d` (two averages of 3) and the soft
      arg-min;
    * ``sparse``: :func:`~tutorial_utils.correlation.sparse_correlation3d` at control points
      every ``grid_step`` voxels, displacements every ``disp_step`` voxels (1 where
      r < disp_step), then the same regularisation on the K-cube and the control grid.

    Each step is timed on its own (median of ``repeats`` after ``warmup``); peak memory
    (:func:`peak_memory_bytes`) is that of the whole forward pass. ``threads`` fixes
    ``torch.set_num_threads`` during the run (None: leave it). See :func:`extrapolate_3d`.

    Returns:
        a JSON-serialisable dict: ``machine``, ``settings`` and ``rows``, one per (n, D,
        variant) with ``K``, ``P``, ``work`` (= K*P), ``correlation_ms``,
        ``regularisation_ms``, ``total_ms``, ``peak_bytes`` and ``cost_bytes`` (closed form).
    """
    from .correlation import correlation3d, sparse_correlation3d
    from .regularisation import (
        mean_field3d,
        min_convolution3d,
        soft_displacement3d,
        soft_displacement_sparse,
    )

    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        generator = torch.Generator().manual_seed(seed)
        rows = []
        for n in grid_sizes:
            shape = (1, channels, n, n, n)
            feat_fixed = torch.rand(shape, generator=generator).to(device)
            feat_moving = torch.rand(shape, generator=generator).to(device)
            for D in disp_ranges:
                step = _sparse_step(D, disp_step)
                side = 2 * (((D - 1) // 2) // step) + 1

                def dense_corr(D=D, fixed=feat_fixed, moving=feat_moving):
                    return correlation3d(fixed, moving, D)

                def dense_reg(cost, D=D):
                    return soft_displacement3d(mean_field3d(min_convolution3d(cost, D)), D, 10.0)[1]

                def sparse_corr(D=D, step=step, fixed=feat_fixed, moving=feat_moving):
                    return sparse_correlation3d(fixed, moving, D, grid_step=grid_step, disp_step=step)

                def sparse_reg(sparse, side=side):
                    cost = sparse.cost.view(1, -1, *sparse.grid_shape)
                    belief = mean_field3d(min_convolution3d(cost, side))
                    return soft_displacement_sparse(belief, sparse.offsets.to(cost.dtype), 10.0)[1]

                variants = {"dense": (dense_corr, dense_reg), "sparse": (sparse_corr, sparse_reg)}
                for name, (corr, reg) in variants.items():
                    if progress:
                        print(f"  3d {name:>6s}  {n}^3  D={D} ...", file=sys.stderr, flush=True)
                    with torch.no_grad():
                        cost = corr()
                        t_corr = time_call(corr, device, warmup, repeats)
                        t_reg = time_call(lambda cost=cost, reg=reg: reg(cost), device, warmup, repeats)
                        del cost
                        peak = (peak_memory_bytes(lambda corr=corr, reg=reg: reg(corr()), device)
                                if measure_memory else None)
                    closed = cost_3d(n, D, 4, grid_step, step)
                    K, P = ((closed["offsets"], closed["voxels"]) if name == "dense"
                            else (closed["sparse_offsets"], closed["control_points"]))
                    rows.append({"variant": name, "grid": n, "D": D, "disp_step": 1 if name == "dense" else step,
                                 "K": K, "P": P, "work": K * P, "correlation_ms": t_corr["median_ms"],
                                 "regularisation_ms": t_reg["median_ms"],
                                 "total_ms": t_corr["median_ms"] + t_reg["median_ms"], "peak_bytes": peak,
                                 "cost_bytes": K * P * 4})
        machine = machine_info(device)
    finally:
        torch.set_num_threads(saved_threads)
    return {
        "benchmark": "3d",
        "machine": machine,
        "settings": {"grid_sizes": list(grid_sizes), "disp_ranges": list(disp_ranges), "channels": channels,
                     "grid_step": grid_step, "disp_step": disp_step, "threads": threads, "warmup": warmup,
                     "repeats": repeats, "dtype": "float32", "batch": 1},
        "rows": rows,
    }


def fit_3d(result: dict) -> dict:
    """Fit ``total_ms ~ a * work`` (least squares through the origin) per variant.

    ``work`` is ``voxels * D^3`` (dense) or ``P * K`` (sparse): the number of costs. The fit
    is dominated by the largest measurements (closest to the extrapolation); ``spread`` gives
    the range of measured / fitted times over all rows.

    Returns:
        ``{variant: {"ns_per_cost", "spread": [min, max]}}``.
    """
    fits = {}
    for variant in sorted({row["variant"] for row in result["rows"]}):
        rows = [row for row in result["rows"] if row["variant"] == variant]
        a = sum(r["total_ms"] * r["work"] for r in rows) / sum(r["work"] ** 2 for r in rows)  # ms per cost
        ratios = [r["total_ms"] / (a * r["work"]) for r in rows]
        fits[variant] = {"ns_per_cost": a * 1e6, "spread": [min(ratios), max(ratios)]}
    return fits


def extrapolate_3d(
    result: dict,
    volume_shape: Sequence[int] = (256, 256, 256),
    strides: Sequence[int] = (2, 4),
    disp_ranges: Sequence[int] = (9, 11, 13, 15, 17),
    bytes_per_value: int = 4,
) -> list[dict]:
    """Memory (closed form, :func:`cost_3d`) and time (:func:`fit_3d`) of a whole CT volume.

    For each stride (feature grid = volume / stride) and D: the dense cost volume and the
    sparse one (the ``grid_step`` and ``disp_step`` of the measurement ``result``), their
    bytes and the predicted seconds of correlation + regularisation on the measuring machine
    (single pair, same threads). A rough extrapolation: cache effects are not modelled.

    Returns:
        rows with ``stride``, ``grid_shape``, ``D``, ``dense_bytes``, ``dense_seconds``,
        ``sparse_offsets``, ``control_points``, ``sparse_bytes``, ``sparse_seconds``.
    """
    fits = fit_3d(result)
    settings = result["settings"]
    rows = []
    for stride in strides:
        grid = tuple(int(n) // stride for n in volume_shape)
        for D in disp_ranges:
            step = _sparse_step(D, settings["disp_step"])
            closed = cost_3d(grid, D, bytes_per_value, settings["grid_step"], step)
            row = {"stride": stride, "grid_shape": list(grid), "D": D, "disp_step": step,
                   "dense_bytes": closed["dense_bytes"], "sparse_offsets": closed["sparse_offsets"],
                   "control_points": closed["control_points"], "sparse_bytes": closed["sparse_bytes"],
                   "dense_seconds": None, "sparse_seconds": None}
            if "dense" in fits:
                row["dense_seconds"] = fits["dense"]["ns_per_cost"] * 1e-9 * closed["voxels"] * closed["offsets"]
            if "sparse" in fits:
                row["sparse_seconds"] = (fits["sparse"]["ns_per_cost"] * 1e-9 * closed["control_points"]
                                         * closed["sparse_offsets"])
            rows.append(row)
    return rows


def _gib(value) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def format_3d_table(result: dict, volume_shape: Sequence[int] = (256, 256, 256), strides: Sequence[int] = (2, 4),
                    disp_ranges: Sequence[int] = (9, 11, 13, 15, 17)) -> str:
    """The 3D benchmark as a table, the fit and the extrapolation to a whole CT."""
    machine, settings = result["machine"], result["settings"]
    lines = [f"3D correlation + regularisation (min-convolution, mean field, soft arg-min), C={settings['channels']}, "
             f"batch 1, float32 on {machine['device']} ({machine.get('gpu') or machine['processor']}, "
             f"{machine['torch_threads']} threads, torch {machine['torch']})",
             f"sparse: control points every {settings['grid_step']} voxels, displacements every "
             f"{settings['disp_step']} voxels (1 where r < {settings['disp_step']})"]
    header = (f"{'variant':>7s} {'grid':>5s} {'D':>3s} {'K':>5s} {'P':>6s} {'corr ms':>8s} {'reg ms':>8s} "
              f"{'total ms':>9s} {'peak MiB':>9s} {'cost MiB':>9s}")
    lines += [header, "-" * len(header)]
    for row in result["rows"]:
        lines.append(f"{row['variant']:>7s} {str(row['grid']) + '^3':>5s} {row['D']:>3d} {row['K']:>5d} {row['P']:>6d} "
                     f"{_ms(row['correlation_ms']):>8s} {_ms(row['regularisation_ms']):>8s} "
                     f"{_ms(row['total_ms']):>9s} {_mib(row['peak_bytes']):>9s} {_mib(row['cost_bytes']):>9s}")
    fits = fit_3d(result)
    lines.append("")
    for variant, fit in fits.items():
        lines.append(f"fit {variant}: total ~ {fit['ns_per_cost']:.2f} ns x costs (measured / fitted: "
                     f"{fit['spread'][0]:.2f} .. {fit['spread'][1]:.2f})")
    size = "x".join(str(n) for n in volume_shape)
    lines += ["", f"extrapolated to a {size} CT (one pair; memory of the cost volume alone, float32)",
              f"{'stride':>6s} {'grid':>11s} {'D':>3s} {'dense GiB':>10s} {'dense s':>8s} {'K':>5s} "
              f"{'sparse GiB':>10s} {'sparse s':>8s}"]
    for row in extrapolate_3d(result, volume_shape, strides, disp_ranges):
        grid = "x".join(str(n) for n in row["grid_shape"])
        lines.append(f"{row['stride']:>6d} {grid:>11s} {row['D']:>3d} {_gib(row['dense_bytes']):>10s} "
                     f"{'-' if row['dense_seconds'] is None else format(row['dense_seconds'], '.1f'):>8s} "
                     f"{row['sparse_offsets']:>5d} {_gib(row['sparse_bytes']):>10s} "
                     f"{'-' if row['sparse_seconds'] is None else format(row['sparse_seconds'], '.1f'):>8s}")
    return "\n".join(lines)


def _3d_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grids", type=_positive_ints, default=[16, 24, 32],
                        help="feature grids n (n^3 voxels), comma separated (default 16,24,32)")
    parser.add_argument("--disp-ranges", type=_odd_ints, default=[3, 5, 7, 9],
                        help="displacement ranges D (odd), comma separated (default 3,5,7,9)")
    parser.add_argument("--channels", type=_positive_int, default=24, help="feature channels C (default 24)")
    parser.add_argument("--grid-step", type=_positive_int, default=2,
                        help="sparse: control points every N voxels (default 2)")
    parser.add_argument("--disp-step", type=_positive_int, default=2,
                        help="sparse: displacements every N voxels (default 2)")
    parser.add_argument("--device", type=device_name, default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--warmup", type=_non_negative_int, default=1, help="warm-up calls per measurement (default 1)")
    parser.add_argument("--repeats", type=_positive_int, default=3,
                        help="timed calls per measurement, median (default 3)")
    parser.add_argument("--no-memory", action="store_true", help="do not measure the peak memory")


def _3d_run(args: argparse.Namespace) -> dict:
    return run_3d_benchmark(grid_sizes=args.grids, disp_ranges=args.disp_ranges, channels=args.channels,
                            grid_step=args.grid_step, disp_step=args.disp_step, device=args.device,
                            threads=args.threads if args.threads is not None else 1, warmup=args.warmup,
                            repeats=args.repeats, measure_memory=not args.no_memory, progress=True)


register(Benchmark(
    name="3d",
    help="3D cost volumes: dense correlation3d + regularisation vs the sparse (pdd_net) variant; "
         "extrapolation to a 256^3 CT",
    add_arguments=_3d_arguments,
    run=_3d_run,
    format=format_3d_table,
))


if __name__ == "__main__":
    sys.exit(main())
