"""3D cost volumes: dense correlation + regularisation against the sparse (pdd_net) variant.

Measures, at small feature grids n^3 and displacement ranges D (batch 1, C random features,
float32, no gradients): the time of the correlation and of the regularisation (min-convolution,
mean field, soft arg-min) and the peak memory of the whole forward pass, dense
(``correlation3d``, D^3 offsets at every voxel) and sparse (``sparse_correlation3d``: control
points every ``--grid-step`` voxels, displacements every ``--disp-step`` voxels). It then fits
time ~ number of costs per variant and extrapolates memory (closed form, :func:`cost_3d`) and
time to a whole 256^3 CT. Discussed in notebook 05 (``05_why_discrete.ipynb``, "the road to 3D"),
which runs a small version and plots the extrapolation.

    python -m benchmarks.three_d --json benchmark-results/3d.json
    python -m benchmarks.three_d --grids 8,12 --disp-ranges 3,5 --no-memory

Measurement rules: :mod:`benchmarks.timing`.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence

import torch

# tutorial_utils: every name this script uses, in one block
from tutorial_utils.checks import check_int, check_odd
from tutorial_utils.three_d.correlation import correlation3d
from tutorial_utils.three_d.regularisation import (
    mean_field3d,
    min_convolution3d,
    soft_displacement3d,
    soft_displacement_sparse,
)
from tutorial_utils.three_d.sparse import sparse_correlation3d
from tutorial_utils.training import device_name

from .timing import (
    Benchmark,
    format_mib,
    format_ms,
    machine_info,
    non_negative_int,
    odd_ints,
    peak_memory_bytes,
    positive_int,
    positive_ints,
    resolve_device,
    time_call,
)

__all__ = ["BENCHMARK", "build_parser", "cost_3d", "extrapolate_3d", "fit_3d", "format_3d_table", "main",
           "run_3d_benchmark"]


# --------------------------------------------------------------------------- closed form


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
            :func:`~tutorial_utils.three_d.sparse.sparse_correlation3d`).
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


# --------------------------------------------------------------------------- measuring


def _variants(feat_fixed: torch.Tensor, feat_moving: torch.Tensor, D: int, grid_step: int, step: int) -> dict:
    """``{"dense": (corr, reg), "sparse": (corr, reg)}``: ``corr()`` makes the cost volume,
    ``reg(cost)`` regularises it and returns the soft arg-min displacements."""
    side = 2 * (((D - 1) // 2) // step) + 1  # the sparse K-cube: side^3 offsets

    def dense_corr():
        return correlation3d(feat_fixed, feat_moving, D)

    def dense_reg(cost):
        return soft_displacement3d(mean_field3d(min_convolution3d(cost, D)), D, 10.0)[1]

    def sparse_corr():
        return sparse_correlation3d(feat_fixed, feat_moving, D, grid_step=grid_step, disp_step=step)

    def sparse_reg(sparse):
        cost = sparse.cost.view(1, -1, *sparse.grid_shape)
        belief = mean_field3d(min_convolution3d(cost, side))
        return soft_displacement_sparse(belief, sparse.offsets.to(cost.dtype), 10.0)[1]

    return {"dense": (dense_corr, dense_reg), "sparse": (sparse_corr, sparse_reg)}


def _measure_variant(corr, reg, device: torch.device, warmup: int, repeats: int, measure_memory: bool):
    """Median times of ``corr()`` and ``reg(cost)`` (separately), peak memory of ``reg(corr())``."""
    with torch.no_grad():
        cost = corr()
        t_corr = time_call(corr, device, warmup, repeats)
        t_reg = time_call(lambda cost=cost: reg(cost), device, warmup, repeats)
        del cost
        peak = peak_memory_bytes(lambda: reg(corr()), device) if measure_memory else None
    return t_corr, t_reg, peak


def _row(name: str, n: int, D: int, grid_step: int, step: int, t_corr: dict, t_reg: dict, peak) -> dict:
    """One result row; ``K`` offsets at ``P`` points from the closed form (:func:`cost_3d`)."""
    closed = cost_3d(n, D, 4, grid_step, step)
    K, P = ((closed["offsets"], closed["voxels"]) if name == "dense"
            else (closed["sparse_offsets"], closed["control_points"]))
    return {"variant": name, "grid": n, "D": D, "disp_step": 1 if name == "dense" else step,
            "K": K, "P": P, "work": K * P, "correlation_ms": t_corr["median_ms"],
            "regularisation_ms": t_reg["median_ms"],
            "total_ms": t_corr["median_ms"] + t_reg["median_ms"], "peak_bytes": peak,
            "cost_bytes": K * P * 4}


def _measure_rows(grid_sizes, disp_ranges, channels, grid_step, disp_step, device, warmup, repeats,
                  measure_memory, seed, progress) -> list[dict]:
    """All rows, per grid n (random features drawn in this order), D and variant."""
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for n in grid_sizes:
        shape = (1, channels, n, n, n)
        feat_fixed = torch.rand(shape, generator=generator).to(device)
        feat_moving = torch.rand(shape, generator=generator).to(device)
        for D in disp_ranges:
            step = _sparse_step(D, disp_step)
            for name, (corr, reg) in _variants(feat_fixed, feat_moving, D, grid_step, step).items():
                if progress:
                    print(f"  3d {name:>6s}  {n}^3  D={D} ...", file=sys.stderr, flush=True)
                measured = _measure_variant(corr, reg, device, warmup, repeats, measure_memory)
                rows.append(_row(name, n, D, grid_step, step, *measured))
    return rows


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

    * ``dense``: :func:`~tutorial_utils.three_d.correlation.correlation3d` [1, D^3, n, n, n], then
      :func:`~tutorial_utils.three_d.regularisation.min_convolution3d` (min 3, two averages of 3),
      :func:`~tutorial_utils.three_d.regularisation.mean_field3d` (two averages of 3) and the soft
      arg-min;
    * ``sparse``: :func:`~tutorial_utils.three_d.sparse.sparse_correlation3d` at control points
      every ``grid_step`` voxels, displacements every ``disp_step`` voxels (1 where
      r < disp_step), then the same regularisation on the K-cube and the control grid.

    Each step is timed on its own (median of ``repeats`` after ``warmup``); peak memory
    (:func:`~benchmarks.timing.peak_memory_bytes`) is that of the whole forward pass.
    ``threads`` fixes ``torch.set_num_threads`` during the run (None: leave it). See
    :func:`extrapolate_3d`.

    Returns:
        a JSON-serialisable dict: ``machine``, ``settings`` and ``rows``, one per (n, D,
        variant) with ``K``, ``P``, ``work`` (= K*P), ``correlation_ms``,
        ``regularisation_ms``, ``total_ms``, ``peak_bytes`` and ``cost_bytes`` (closed form).
    """
    device = resolve_device(device)
    saved_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        rows = _measure_rows(grid_sizes, disp_ranges, channels, grid_step, disp_step, device, warmup, repeats,
                             measure_memory, seed, progress)
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


# --------------------------------------------------------------------------- reading the results


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


def _seconds(value) -> str:
    return "-" if value is None else format(value, ".1f")


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
                     f"{format_ms(row['correlation_ms']):>8s} {format_ms(row['regularisation_ms']):>8s} "
                     f"{format_ms(row['total_ms']):>9s} {format_mib(row['peak_bytes']):>9s} "
                     f"{format_mib(row['cost_bytes']):>9s}")
    lines.append("")
    for variant, fit in fit_3d(result).items():
        lines.append(f"fit {variant}: total ~ {fit['ns_per_cost']:.2f} ns x costs (measured / fitted: "
                     f"{fit['spread'][0]:.2f} .. {fit['spread'][1]:.2f})")
    size = "x".join(str(n) for n in volume_shape)
    lines += ["", f"extrapolated to a {size} CT (one pair; memory of the cost volume alone, float32)",
              f"{'stride':>6s} {'grid':>11s} {'D':>3s} {'dense GiB':>10s} {'dense s':>8s} {'K':>5s} "
              f"{'sparse GiB':>10s} {'sparse s':>8s}"]
    for row in extrapolate_3d(result, volume_shape, strides, disp_ranges):
        grid = "x".join(str(n) for n in row["grid_shape"])
        lines.append(f"{row['stride']:>6d} {grid:>11s} {row['D']:>3d} {_gib(row['dense_bytes']):>10s} "
                     f"{_seconds(row['dense_seconds']):>8s} {row['sparse_offsets']:>5d} "
                     f"{_gib(row['sparse_bytes']):>10s} {_seconds(row['sparse_seconds']):>8s}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--grids", type=positive_ints, default=[16, 24, 32],
                        help="feature grids n (n^3 voxels), comma separated (default 16,24,32)")
    parser.add_argument("--disp-ranges", type=odd_ints, default=[3, 5, 7, 9],
                        help="displacement ranges D (odd), comma separated (default 3,5,7,9)")
    parser.add_argument("--channels", type=positive_int, default=24, help="feature channels C (default 24)")
    parser.add_argument("--grid-step", type=positive_int, default=2,
                        help="sparse: control points every N voxels (default 2)")
    parser.add_argument("--disp-step", type=positive_int, default=2,
                        help="sparse: displacements every N voxels (default 2)")
    parser.add_argument("--device", type=device_name, default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--warmup", type=non_negative_int, default=1, help="warm-up calls per measurement (default 1)")
    parser.add_argument("--repeats", type=positive_int, default=3,
                        help="timed calls per measurement, median (default 3)")
    parser.add_argument("--no-memory", action="store_true", help="do not measure the peak memory")


def _run(args: argparse.Namespace) -> dict:
    return run_3d_benchmark(grid_sizes=args.grids, disp_ranges=args.disp_ranges, channels=args.channels,
                            grid_step=args.grid_step, disp_step=args.disp_step, device=args.device,
                            threads=args.threads if args.threads is not None else 1, warmup=args.warmup,
                            repeats=args.repeats, measure_memory=not args.no_memory, progress=True)


BENCHMARK = Benchmark(
    name="3d",
    module="three_d",
    help="3D cost volumes: dense correlation3d + regularisation vs the sparse (pdd_net) variant; "
         "extrapolation to a 256^3 CT",
    add_arguments=_add_arguments,
    run=_run,
    format=format_3d_table,
)

build_parser, main = BENCHMARK.build_parser, BENCHMARK.main  # the command line, see benchmarks.timing


if __name__ == "__main__":
    sys.exit(main())
