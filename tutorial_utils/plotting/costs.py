"""Cost volumes as pictures: cost maps of single pixels, the whole cost volume, min-convolution, speed.

Notebook 02 (the correlation layer): ``show_cost_maps``, ``show_cost_volume``,
``plot_correlation_benchmark``; notebook 03 (regularisation): ``show_min_convolution``.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np

from ._arrays import _as_numpy, _feature_centre, _single
from .overlays import show_overlay


def show_cost_maps(cost_volume, disp_range: int, pixels: Sequence[tuple[int, int]], image_fixed, image_moving,
                   stride: int = 4, names: Sequence[str] | None = None, size: float = 3.0,
                   zoom: float | None = 2.5):
    """The D x D costs of a few fixed pixels, next to where they look in the moving image.

    One row per pixel: the fixed image with the pixel (a cross), the moving image with the
    search window (a square of D x D feature pixels) and the cheapest displacement (a dot),
    and the D x D cost map (rows dy, columns dx, in feature pixels; the minimum circled).

    Args:
        cost_volume: [1, D*D, h, w]. disp_range: D.
        pixels: (y, x) positions on the feature grid [h, w].
        image_fixed, image_moving: [H, W] grey images (H = stride * h).
        stride: image pixels per feature pixel. names: a title per pixel.
        zoom: show the images around the pixel only, ``zoom`` times the search window wide
            (None: the whole images).
    Returns:
        the figure.
    """
    cost = _single(cost_volume)
    D, r = disp_range, (disp_range - 1) // 2
    fig, axes = plt.subplots(len(pixels), 3, figsize=(3 * size + 0.6, len(pixels) * size * 0.9), squeeze=False)
    for row, (y, x) in enumerate(pixels):
        costs = cost[:, y, x].reshape(D, D)  # [D, D]: rows dy = i - r, columns dx = j - r
        i, j = np.unravel_index(int(np.argmin(costs)), costs.shape)
        cy, cx = _feature_centre(y, stride), _feature_centre(x, stride)
        name = names[row] if names else f"pixel (y, x) = ({y}, {x})"
        show_overlay(axes[row, 0], image_fixed, title=f"fixed: {name}")
        axes[row, 0].plot(cx, cy, "+", color="cyan", ms=12, mew=2)
        show_overlay(axes[row, 1], image_moving, title="moving: search window, best match")
        half = (r + 0.5) * stride
        axes[row, 1].add_patch(plt.Rectangle((cx - half, cy - half), 2 * half, 2 * half, fill=False,
                                             ec="cyan", lw=1.2))
        axes[row, 1].plot(cx + (j - r) * stride, cy + (i - r) * stride, "o", color="orange", ms=5)
        if zoom is not None:
            for ax in axes[row, :2]:
                ax.set_xlim(cx - zoom * half, cx + zoom * half)
                ax.set_ylim(cy + zoom * half, cy - zoom * half)
        im = axes[row, 2].imshow(costs, cmap="viridis", extent=(-r - 0.5, r + 0.5, r + 0.5, -r - 0.5))
        axes[row, 2].plot(j - r, i - r, "o", mfc="none", mec="orange", ms=12, mew=2)
        ticks = range(-r, r + 1, 1 if D <= 9 else 2)  # integer offsets only
        axes[row, 2].set_xticks(ticks)
        axes[row, 2].set_yticks(ticks)
        axes[row, 2].tick_params(labelsize=7)
        axes[row, 2].set_xlabel("dx (feature pixels)", fontsize=8)
        axes[row, 2].set_ylabel("dy", fontsize=8)
        axes[row, 2].set_title(f"{D} x {D} costs, minimum at (dy, dx) = ({i - r}, {j - r})", fontsize=9)
        fig.colorbar(im, ax=axes[row, 2], fraction=0.046, pad=0.04).set_label("SSD cost", fontsize=8)
    fig.tight_layout()
    return fig


def show_cost_volume(cost_volume, disp_range: int, step: int = 1, size: float = 1.0, cmap: str = "viridis"):
    """Every ``step``-th channel of a cost volume [1, D*D, h, w] as an image, laid out on the
    displacement grid (row = dy, column = dx), one shared colour scale. Returns the figure."""
    cost = _single(cost_volume)
    D, r = disp_range, (disp_range - 1) // 2
    steps = list(range(0, D, step))
    if steps[-1] != D - 1 and (D - 1) % step:
        steps.append(D - 1)
    h, w = cost.shape[-2:]
    vmin, vmax = np.percentile(cost, [1, 95])
    fig, axes = plt.subplots(len(steps), len(steps), figsize=(len(steps) * size, len(steps) * size * h / w + 0.4),
                             squeeze=False)
    for a, i in enumerate(steps):
        for b, j in enumerate(steps):
            ax = axes[a, b]
            im = ax.imshow(cost[i * D + j], cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if a == len(steps) - 1:
                ax.set_xlabel(f"dx={j - r}", fontsize=7)
            if b == 0:
                ax.set_ylabel(f"dy={i - r}", fontsize=7)
            if i == r and j == r:
                for spine in ax.spines.values():
                    spine.set_color("orange")
                    spine.set_linewidth(2)
    fig.suptitle("cost volume: one image per displacement (dark = low cost = good match)", fontsize=9)
    fig.tight_layout()
    fig.subplots_adjust(right=0.9)
    bar = fig.colorbar(im, cax=fig.add_axes((0.92, 0.15, 0.015, 0.7)))  # one scale for every image
    bar.set_label("SSD cost (clipped at the 1st and 95th percentile)", fontsize=8)
    return fig


def plot_correlation_benchmark(result: dict, axes=None, statistic: str = "median"):
    """Time (forward+backward solid, forward dashed) and peak memory against D, one colour per
    implementation, one marker per feature-map size, from ``benchmark.run_correlation_benchmark``.
    ``statistic``: plot the ``"median"`` or the ``"min"`` (fastest) of the repeats. Returns the figure."""
    if statistic not in ("median", "min"):
        raise ValueError(f"statistic must be 'median' or 'min', got {statistic!r}")
    suffix = "_min_ms" if statistic == "min" else "_ms"
    if axes is None:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    else:
        fig = axes[0].figure
    rows = [row for row in result["rows"] if not row.get("skipped")]
    impls = list(dict.fromkeys(row["impl"] for row in rows))
    sizes = list(dict.fromkeys((row["H"], row["W"]) for row in rows))
    colours = plt.get_cmap("tab10")
    markers = "osD^v"
    for a, impl in enumerate(impls):
        for b, (height, width) in enumerate(sizes):
            sel = sorted((row for row in rows if row["impl"] == impl and (row["H"], row["W"]) == (height, width)),
                         key=lambda row: row["D"])
            if not sel:
                continue
            ds = [row["D"] for row in sel]
            style = dict(color=colours(a), marker=markers[b % len(markers)], ms=5)
            label = f"{impl}, {height}x{width}"
            axes[0].plot(ds, [row["forward_backward" + suffix] for row in sel], "-", label=label, **style)
            axes[0].plot(ds, [row["forward" + suffix] for row in sel], "--", alpha=0.6, **style)
            axes[1].plot(ds, [row["forward_backward_peak_bytes"] / 2**20 for row in sel], "-", label=label, **style)
    machine = result["machine"]
    where = machine.get("gpu") or f"{machine['processor']}, {machine['torch_threads']} threads"
    axes[0].set_title(f"time (solid: forward+backward, dashed: forward)\n{where}", fontsize=9)
    axes[0].set_ylabel(f"milliseconds ({'fastest repeat' if statistic == 'min' else 'median'})")
    axes[1].set_title("peak memory of forward+backward", fontsize=9)
    axes[1].set_ylabel("MiB")
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel("displacements per axis D")
        ax.set_xticks(sorted({row["D"] for row in rows}))
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def show_min_convolution(cost_grid, exact_grid, approx_grid, lam: float, row: int | None = None,
                         titles: Sequence[str] | None = None):
    """One pixel's D x D costs, their exact min-convolution and the 2019 approximation, as
    images, and one row of each as curves with the parabolas whose lower envelope is exact.

    Args:
        cost_grid, exact_grid, approx_grid: [D, D] (row = dy index, column = dx index).
        lam: the parabola curvature of the exact version (cost units per pixel^2).
        row: which dy row to draw as curves (default: the row of the smallest cost).
    Returns the figure.
    """
    grids = [_as_numpy(g).astype(float) for g in (cost_grid, exact_grid, approx_grid)]
    D = grids[0].shape[0]
    r = (D - 1) // 2
    if row is None:
        row = int(np.unravel_index(np.argmin(grids[0]), grids[0].shape)[0])
    titles = titles or ("data cost", f"exact min-convolution (lambda = {lam:.3g})", "approximation (min, avg, avg)")
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4), gridspec_kw={"width_ratios": [1, 1, 1, 1.6]})
    vmin, vmax = min(g.min() for g in grids), max(g.max() for g in grids)
    for ax, grid, title in zip(axes[:3], grids, titles):
        im = ax.imshow(grid, cmap="viridis", vmin=vmin, vmax=vmax, extent=(-r - 0.5, r + 0.5, r + 0.5, -r - 0.5))
        ax.axhline(row - r, color="white", lw=0.8, ls="--")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("dx")
        ax.set_ylabel("dy")
        ax.set_xticks(range(-r, r + 1, 1 if D <= 9 else 2))  # integer offsets only
        ax.set_yticks(range(-r, r + 1, 1 if D <= 9 else 2))
    fig.colorbar(im, ax=axes[2], fraction=0.046).set_label("cost", fontsize=8)
    ax = axes[3]
    offsets = np.arange(-r, r + 1)
    fine = np.linspace(-r, r, 200)
    for k, height in zip(offsets, grids[0][row]):
        ax.plot(fine, height + lam * (fine - k) ** 2, color="grey", lw=0.6, alpha=0.5)
    ax.plot(offsets, grids[0][row], "o", color="black", label="data cost")
    ax.plot(offsets, grids[1][row], "-", color="tab:blue", lw=2, label="exact: lower envelope of all rows' parabolas")
    ax.plot(offsets, grids[2][row], "--", color="tab:orange", lw=2, label="approximation")
    ax.set_ylim(vmin - 0.05 * (vmax - vmin), vmax + 0.1 * (vmax - vmin))
    ax.set_xlabel(f"dx (row dy = {row - r})")
    ax.set_ylabel("cost")
    ax.set_title("one row: the parabolas rooted in it (grey); the envelope may lie below them\n"
                 "where a parabola rooted in another row (another dy) is lower", fontsize=8)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return fig
