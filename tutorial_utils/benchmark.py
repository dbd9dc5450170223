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

from .correlation import correlation, correlation_unfold

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "correlation_ratios",
    "format_correlation_table",
    "machine_info",
    "main",
    "matmul_flops",
    "peak_memory_bytes",
    "register",
    "run_correlation_benchmark",
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
        sizes.append((h, w))
    return sizes


def _parse_ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


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
    parser.add_argument("--disp-ranges", type=_parse_ints, default=[9, 21, 41],
                        help="displacement ranges D, comma separated (default 9,21,41)")
    parser.add_argument("--channels", type=int, default=24, help="feature channels C (default 24)")
    parser.add_argument("--metric", choices=["ssd", "dot"], default="ssd",
                        help="metric of the fast layer; the unfold layer only runs for ssd (default ssd)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up calls per measurement (default 2)")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per measurement, median reported (default 7)")
    parser.add_argument("--max-seconds", type=float, default=20.0,
                        help="fewer repeats (at least 3) where one measurement would take longer (default 20)")
    parser.add_argument("--max-unfold-gb", type=float, default=2.0,
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
        child.add_argument("--threads", type=int, default=None,
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

    * ``2019 settings``: the same regularisation as the 2019 loop (min-pool 3, two average
      pools 5, one mean-field round, ``alpha`` 10, zero border, no pre-alignment), so the
      same work per pair: the like-for-like comparison (the headline ``speedup``);
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
    from .registration import DEFAULTS_2019
    from .train import DEFAULTS, REG_KEYS, train_features, train_features_2019

    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dataset = load_dataset(source=source, seed=seed, verbose=False)
    n = images_per_step or DEFAULTS["images_per_step"]
    like_2019 = dict(alpha=DEFAULTS_2019["alpha"], prealign="none", border="zeros",
                     **{key: DEFAULTS_2019[key] for key in REG_KEYS})
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
    parser.add_argument("--pairs", type=int, default=240, help="pairs per run of our loop (default 240)")
    parser.add_argument("--pairs-2019", type=int, default=24, help="pairs per run of the 2019 loop (default 24)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per loop, median reported (default 2)")
    parser.add_argument("--images-per-step", type=int, default=None,
                        help="our loop's slices per step (default: the training default)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
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


if __name__ == "__main__":
    sys.exit(main())
