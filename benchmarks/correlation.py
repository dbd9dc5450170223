"""The correlation layer: the 2019 unfold layer against ``tutorial_utils.correlation.correlation``.

Measures, for feature maps of C channels and H x W pixels (batch 1, random features) and
displacement ranges D: forward and forward+backward wall time (median of repeats after a
warm-up) and peak memory of both layers, the forward pass's arithmetic rate (``3*C*D*D*H*W``
flops) and, optionally, that rate as a fraction of a large matmul's. The unfold layer is
skipped where its [C, D*D, H*W] tensor alone would exceed ``--max-unfold-gb``. Discussed in
notebook 02 (``02_correlation_layer.ipynb``), which runs a small version and plots it.

    python -m benchmarks.correlation --json benchmark-results/correlation.json
    python -m benchmarks.correlation --sizes 80x64 --disp-ranges 9,21 --threads 1

Measurement rules: :mod:`benchmarks.timing`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import torch

# tutorial_utils: every name this script uses, in one block
from tutorial_utils.correlation import correlation, correlation_unfold
from tutorial_utils.training import device_name

from .timing import (
    Benchmark,
    format_mib,
    format_ms,
    machine_info,
    matmul_flops,
    non_negative_int,
    odd_ints,
    peak_memory_bytes,
    positive_float,
    positive_int,
    resolve_device,
    time_call,
)

__all__ = [
    "BENCHMARK",
    "build_parser",
    "correlation_ratios",
    "format_correlation_table",
    "main",
    "run_correlation_benchmark",
]


# --------------------------------------------------------------------------- measuring


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


def _random_inputs(channels: int, height: int, width: int, disp_range: int, dtype: torch.dtype,
                   device: torch.device, generator: torch.Generator):
    """Random ``feat_fixed``, ``feat_moving`` [1, C, H, W] and an incoming gradient [1, D*D, H, W]."""
    shape = (1, channels, height, width)
    feat_fixed = torch.rand(shape, generator=generator, dtype=dtype).to(device)
    feat_moving = torch.rand(shape, generator=generator, dtype=dtype).to(device)
    grad_cost = torch.randn((1, disp_range**2, height, width), generator=generator, dtype=dtype).to(device)
    return feat_fixed, feat_moving, grad_cost


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
    device = resolve_device(device)
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
            inputs = _random_inputs(channels, height, width, disp_range, dtype, device, generator)
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

                row.update(_measure_layer(fn, *inputs, disp_range, device, warmup, repeats, max_seconds))
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


# --------------------------------------------------------------------------- reading the results


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
            f"{row['impl']:>14s} {size:>9s} {row['D']:>3d} {format_ms(row['forward_ms']):>8s} "
            f"{format_ms(row['forward_backward_ms']):>10s} {format_mib(row['forward_peak_bytes']):>8s} "
            f"{format_mib(row['forward_backward_peak_bytes']):>11s} {row['forward_gflops']:>11.2f} "
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


# --------------------------------------------------------------------------- command line


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``--sizes 80x64,160x128`` as [(80, 64), (160, 128)] (H x W); argparse's error otherwise."""
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


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=parse_sizes, default=[(80, 64), (160, 128)],
                        help="feature-map sizes H x W, comma separated (default 80x64,160x128)")
    parser.add_argument("--disp-ranges", type=odd_ints, default=[9, 21, 41],
                        help="displacement ranges D (odd), comma separated (default 9,21,41)")
    parser.add_argument("--channels", type=positive_int, default=24, help="feature channels C (default 24)")
    parser.add_argument("--metric", choices=["ssd", "dot"], default="ssd",
                        help="metric of the fast layer; the unfold layer only runs for ssd (default ssd)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--device", type=device_name, default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--warmup", type=non_negative_int, default=2, help="warm-up calls per measurement (default 2)")
    parser.add_argument("--repeats", type=positive_int, default=7,
                        help="timed calls per measurement, median reported (default 7)")
    parser.add_argument("--max-seconds", type=positive_float, default=20.0,
                        help="fewer repeats (at least 3) where one measurement would take longer (default 20)")
    parser.add_argument("--max-unfold-gb", type=positive_float, default=2.0,
                        help="skip the unfold layer where its [C, D*D, H*W] tensor exceeds this many GiB (default 2)")
    parser.add_argument("--no-peak", action="store_true", help="do not measure the matmul peak")


def _run(args: argparse.Namespace) -> dict:
    return run_correlation_benchmark(
        sizes=args.sizes, disp_ranges=args.disp_ranges, channels=args.channels, device=args.device,
        dtype=getattr(torch, args.dtype), metric=args.metric, warmup=args.warmup, repeats=args.repeats,
        max_seconds=args.max_seconds, max_unfold_gb=args.max_unfold_gb, measure_peak=not args.no_peak,
        progress=True,
    )


BENCHMARK = Benchmark(
    name="correlation",
    module="correlation",
    help="the 2019 unfold correlation layer vs tutorial_utils.correlation.correlation",
    add_arguments=_add_arguments,
    run=_run,
    format=format_correlation_table,
)

build_parser, main = BENCHMARK.build_parser, BENCHMARK.main  # the command line, see benchmarks.timing


if __name__ == "__main__":
    sys.exit(main())
