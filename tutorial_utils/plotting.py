"""Figures used by more than one notebook: slices with organ overlays, legends, Dice plots."""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Patch

# one colour per organ, chosen to be told apart (index = label value; 0 = background)
_ORGAN_COLOURS = (
    (0.0, 0.0, 0.0),        # background
    (0.60, 0.31, 0.64),     # spleen: purple
    (0.99, 0.55, 0.0),      # left kidney: orange
    (0.20, 0.80, 0.20),     # gallbladder: green
    (0.0, 0.75, 0.85),      # esophagus: cyan
    (0.85, 0.15, 0.15),     # liver: red
    (0.95, 0.90, 0.25),     # stomach: yellow
    (0.13, 0.40, 0.95),     # pancreas: blue
    (0.95, 0.45, 0.75),     # duodenum: pink
)


def label_colours(num_labels: int) -> np.ndarray:
    """RGB colours [num_labels, 3] for label values 0..num_labels-1 (0 = background, black)."""
    if num_labels <= len(_ORGAN_COLOURS):
        return np.array(_ORGAN_COLOURS[:num_labels])
    extra = plt.get_cmap("tab20")(np.linspace(0, 1, num_labels - len(_ORGAN_COLOURS)))[:, :3]
    return np.vstack([np.array(_ORGAN_COLOURS), extra])


def _as_numpy(x) -> np.ndarray:
    if torch.is_tensor(x):
        x = x.detach().cpu()
    x = np.asarray(x)
    while x.ndim > 2 and x.shape[0] == 1:  # [1, 1, H, W] -> [H, W]
        x = x[0]
    return x


def show_overlay(ax, image, labels=None, num_labels: int = 9, alpha: float = 0.45,
                 title: str | None = None, contour: bool = False) -> None:
    """Draw a grey image [H, W] with its labels [H, W] as a colour overlay (or contours)."""
    ax.imshow(_as_numpy(image), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    if labels is not None:
        lab = _as_numpy(labels).astype(int)
        colours = label_colours(num_labels)
        if contour:
            for value in range(1, num_labels):
                if (lab == value).any():
                    ax.contour(lab == value, levels=[0.5], colors=[colours[value]], linewidths=1.2)
        else:
            rgba = np.zeros(lab.shape + (4,))
            rgba[..., :3] = colours[lab]
            rgba[..., 3] = np.where(lab > 0, alpha, 0.0)
            ax.imshow(rgba, interpolation="nearest")
    if title:
        ax.set_title(title, fontsize=9)
    ax.axis("off")


def organ_legend(fig_or_ax, label_names: Sequence[str], present: Sequence[int] | None = None, **kwargs):
    """A legend of organ colours; ``present`` limits it to some label values."""
    colours = label_colours(len(label_names))
    values = [v for v in range(1, len(label_names)) if present is None or v in present]
    handles = [Patch(color=colours[v], label=f"{v} {label_names[v]}") for v in values]
    kwargs.setdefault("loc", "lower center")
    kwargs.setdefault("ncol", min(len(handles), 4) or 1)
    kwargs.setdefault("fontsize", 8)
    kwargs.setdefault("frameon", False)
    return fig_or_ax.legend(handles=handles, **kwargs)


def show_slices(dataset, ids: Sequence[int], overlay: bool = True, ncols: int = 4,
                size: float = 2.6, titles: Sequence[str] | None = None):
    """A grid of slices, each with its organ overlay, and one legend. Returns the figure."""
    ids = list(ids)
    nrows = int(np.ceil(len(ids) / ncols))
    h, w = dataset.image_size
    fig, axes = plt.subplots(nrows, ncols, figsize=(ncols * size, nrows * (size * h / w + 0.3) + 0.6),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, (ax, i) in enumerate(zip(axes.flat, ids)):
        title = titles[k] if titles else f"slice {i}"
        show_overlay(ax, dataset.images[i, 0], dataset.labels[i] if overlay else None,
                     dataset.num_labels, title=title)
    if overlay:
        organ_legend(fig, dataset.label_names, bbox_to_anchor=(0.5, 0.0))
        fig.tight_layout(rect=(0, 0.06, 1, 1))
    else:
        fig.tight_layout()
    return fig


def organ_presence(dataset, ax=None):
    """A slices x organs chart: which organ each slice shows (test slices marked)."""
    n = len(dataset)
    present = np.zeros((dataset.num_labels - 1, n), dtype=bool)
    for i in range(n):
        values = torch.unique(dataset.labels[i]).tolist()
        for v in values:
            if v > 0:
                present[v - 1, i] = True
    if ax is None:
        _, ax = plt.subplots(figsize=(10, 2.8))
    colours = label_colours(dataset.num_labels)[1:]
    rgb = np.where(present[..., None], colours[:, None, :], 0.93)
    ax.imshow(rgb, aspect="auto", interpolation="nearest")
    ax.set_yticks(range(dataset.num_labels - 1))
    ax.set_yticklabels(dataset.label_names[1:], fontsize=8)
    ax.set_xticks(range(n))
    ax.set_xticklabels([str(i) for i in range(n)], fontsize=6)
    for tick, i in zip(ax.get_xticklabels(), range(n)):
        if i in dataset.test_ids:
            tick.set_color("crimson")
            tick.set_fontweight("bold")
    ax.set_xlabel("slice (test slices in red)")
    return present


def dice_boxplot(dice_by_method: dict[str, np.ndarray], label_names: Sequence[str], ax=None,
                 ylabel: str = "Dice"):
    """Box plots of Dice per organ, one box per method and organ.

    Args:
        dice_by_method: name -> array [num_pairs, num_labels] (column 0 = background, ignored;
            NaN where an organ is not scored, e.g. under the primary convention of
            :func:`~tutorial_utils.metrics.dice` in only one slice of the pair; such pairs are
            left out of that organ's box).
    """
    organs = list(range(1, len(label_names)))
    methods = list(dice_by_method)
    if ax is None:
        _, ax = plt.subplots(figsize=(max(6, 1.1 * len(organs) * max(1, len(methods)) / 1.5), 3.4))
    width = 0.8 / len(methods)
    cmap = plt.get_cmap("tab10")
    for m, name in enumerate(methods):
        values = np.asarray(dice_by_method[name], dtype=float)
        data = [values[:, o][np.isfinite(values[:, o])] for o in organs]
        positions = np.arange(len(organs)) + (m - (len(methods) - 1) / 2) * width
        box = ax.boxplot(data, positions=positions, widths=width * 0.9, patch_artist=True,
                         showfliers=False, medianprops=dict(color="black"))
        for patch in box["boxes"]:
            patch.set_facecolor(cmap(m))
            patch.set_alpha(0.75)
        ax.plot([], [], color=cmap(m), lw=6, alpha=0.75, label=name)
    ax.set_xticks(np.arange(len(organs)))
    ax.set_xticklabels([label_names[o] for o in organs], rotation=30, ha="right", fontsize=8)
    ax.set_ylim(0, 1)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=len(methods), loc="upper left")
    return ax


# --- correlation (notebook 02) ---


def _feature_centre(index: int, stride: int) -> float:
    """Image coordinate of the centre of feature pixel ``index`` (a feature pixel covers
    ``stride`` image pixels, as after average pooling or strided convolutions)."""
    return (index + 0.5) * stride - 0.5


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
    cost = _as_numpy(cost_volume[0] if torch.is_tensor(cost_volume) and cost_volume.dim() == 4 else cost_volume)
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
        axes[row, 2].set_xlabel("dx (feature pixels)", fontsize=8)
        axes[row, 2].set_ylabel("dy", fontsize=8)
        axes[row, 2].set_title(f"{D} x {D} costs, minimum at (dy, dx) = ({i - r}, {j - r})", fontsize=9)
        fig.colorbar(im, ax=axes[row, 2], fraction=0.046, pad=0.04)
    fig.tight_layout()
    return fig


def show_cost_volume(cost_volume, disp_range: int, step: int = 1, size: float = 1.0, cmap: str = "viridis"):
    """Every ``step``-th channel of a cost volume [1, D*D, h, w] as an image, laid out on the
    displacement grid (row = dy, column = dx), one shared colour scale. Returns the figure."""
    cost = _as_numpy(cost_volume[0] if torch.is_tensor(cost_volume) and cost_volume.dim() == 4 else cost_volume)
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
            ax.imshow(cost[i * D + j], cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
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
    return fig


def show_displacement_field(ax, displacement, image=None, step: int = 2, stride: int = 1,
                            title: str | None = None, color: str = "orange") -> None:
    """Arrows of a displacement field [1, 2, h, w] ((dy, dx) in pixels of its own grid) over
    ``image`` [H, W] (H = stride * h); every ``step``-th arrow, drawn to scale: an arrow from a
    fixed pixel points to where that pixel looks in the moving image."""
    disp = _as_numpy(displacement[0] if torch.is_tensor(displacement) and displacement.dim() == 4 else displacement)
    h, w = disp.shape[-2:]
    if image is not None:
        show_overlay(ax, image)
    ys, xs = np.mgrid[0:h:step, 0:w:step]
    dy, dx = disp[0, ::step, ::step] * stride, disp[1, ::step, ::step] * stride
    ax.quiver(_feature_centre(xs, stride), _feature_centre(ys, stride), dx, dy, angles="xy",
              scale_units="xy", scale=1, color=color, width=0.004, headwidth=3)
    if image is None:
        ax.set_xlim(-0.5, stride * w - 0.5)
        ax.set_ylim(stride * h - 0.5, -0.5)
        ax.set_aspect("equal")
    if title:
        ax.set_title(title, fontsize=9)
    ax.axis("off")


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


# --- regularisation (notebook 03) ---


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
    fig.colorbar(im, ax=axes[2], fraction=0.046)
    ax = axes[3]
    offsets = np.arange(-r, r + 1)
    fine = np.linspace(-r, r, 200)
    for k, height in zip(offsets, grids[0][row]):
        ax.plot(fine, height + lam * (fine - k) ** 2, color="grey", lw=0.6, alpha=0.5)
    ax.plot(offsets, grids[0][row], "o", color="black", label="data cost")
    ax.plot(offsets, grids[1][row], "-", color="tab:blue", lw=2, label="exact: lower envelope")
    ax.plot(offsets, grids[2][row], "--", color="tab:orange", lw=2, label="approximation")
    ax.set_ylim(vmin - 0.05 * (vmax - vmin), vmax + 0.1 * (vmax - vmin))
    ax.set_xlabel(f"dx (row dy = {row - r})")
    ax.set_ylabel("cost")
    ax.set_title("one row: parabolas rooted at every displacement (grey)", fontsize=9)
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    return fig


def show_deformation_grid(ax, displacement, image=None, spacing: int = 8, title: str | None = None,
                          color: str = "orange") -> None:
    """The deformed grid of a displacement [1, 2, H, W] or [2, H, W] (image pixels) over ``image``.

    Every ``spacing``-th row and column of the fixed image grid is drawn at the positions it
    samples in the moving image, ``(y + dy, x + dx)``: where the lines cross over, the map folds.
    """
    disp = _as_numpy(displacement[0] if torch.is_tensor(displacement) and displacement.dim() == 4 else displacement)
    H, W = disp.shape[-2:]
    if image is not None:
        show_overlay(ax, image)
    ys, xs = np.mgrid[0:H, 0:W]
    py, px = ys + disp[0], xs + disp[1]
    for y in range(0, H, spacing):
        ax.plot(px[y, :], py[y, :], color=color, lw=0.7)
    for x in range(0, W, spacing):
        ax.plot(px[:, x], py[:, x], color=color, lw=0.7)
    ax.set_xlim(-0.5, W - 0.5)
    ax.set_ylim(H - 0.5, -0.5)
    ax.set_aspect("equal")
    if title:
        ax.set_title(title, fontsize=9)
    ax.axis("off")


def show_jacobian(ax, jacobian, title: str | None = None, vmax: float = 2.0):
    """A Jacobian determinant map [H, W] (or [1, H, W]): blue shrinks, red grows, 1 is white,
    folded pixels (det <= 0) black. Returns the image artist (for a colour bar)."""
    from matplotlib.colors import ListedColormap

    jac = _as_numpy(jacobian).astype(float)
    im = ax.imshow(jac, cmap="RdBu_r", vmin=2 - vmax, vmax=vmax, interpolation="nearest")
    folded = np.ma.masked_where(jac > 0, np.ones_like(jac))
    ax.imshow(folded, cmap=ListedColormap(["black"]), vmin=0, vmax=1, interpolation="nearest")
    if title:
        ax.set_title(title, fontsize=9)
    ax.axis("off")
    return im
