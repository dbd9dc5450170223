"""One registration of a chosen pair with chosen hyper-parameters, measured and drawn (notebook 03).

The computation behind the interactive explorer of :mod:`~tutorial_utils.widgets`, usable and
tested without widgets: :func:`explore_registration` registers one fixed/moving pair of a
dataset and returns an :class:`ExplorerResult` (warped image and labels, displacement,
per-organ Dice before/after, folding fraction, runtime); :func:`plot_explorer_result` draws
such a result as a static matplotlib figure, :func:`render_png`, :func:`dice_table_html` and
:func:`folding_html` turn it into what the panel shows.
"""

from __future__ import annotations

import html
import math
import time
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import numpy as np
import torch

from . import metrics, plotting, registration, transform
from .checks import check_int, check_number, check_odd

__all__ = [
    "DEFAULT_PARAMETERS",
    "ExplorerResult",
    "dice_table_html",
    "displacement_to_rgb",
    "explore_registration",
    "folding_html",
    "plot_explorer_result",
    "check_slice_id",
    "render_png",
    "validate_parameters",
]

DEFAULT_PARAMETERS: dict[str, Any] = {
    name: getattr(registration.DEFAULTS, name) for name in
    ("disp_range", "min_kernel", "avg_kernel", "meanfield_kernel", "meanfield_iterations", "alpha")
}
"""The hyper-parameters :func:`explore_registration` and the explorer start from: those of
:func:`~tutorial_utils.registration.register_images` (``registration.DEFAULTS``)."""

_KERNEL_NAMES = ("min_kernel", "avg_kernel", "meanfield_kernel")


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def validate_parameters(
    *,
    disp_range: int,
    min_kernel: int,
    avg_kernel: int,
    meanfield_kernel: int,
    meanfield_iterations: int,
    alpha: float,
) -> None:
    """Raise for hyper-parameters that make no sense, saying what was expected (the shared checks).

    ``disp_range`` must be an odd integer >= 3; the kernel sizes odd integers >= 1;
    ``meanfield_iterations`` an integer >= 0; ``alpha`` a finite number > 0 (numpy numbers
    are accepted). A value out of range raises ``ValueError``; a value of the wrong kind (a
    float or bool where an integer belongs, a string) raises ``TypeError``.
    """
    check_odd("disp_range", disp_range, minimum=3)
    for name, size in (("min_kernel", min_kernel), ("avg_kernel", avg_kernel), ("meanfield_kernel", meanfield_kernel)):
        check_odd(name, size)
    check_int("meanfield_iterations", meanfield_iterations, minimum=0)
    check_number("alpha", alpha, 0, strict_minimum=True)


@dataclass(frozen=True)
class ExplorerResult:
    """One registration of the explorer, everything on the CPU.

    Shapes follow the project's vocabulary with a batch of one: images [1, 1, H, W] float in
    [0, 1], label maps [1, H, W] int64, ``displacement`` [1, 2, H, W] (dy, dx) in pixels.
    Dice dictionaries map organ name -> Dice for every foreground organ present in the fixed
    or the moving slice (the primary score: NaN where an organ is in only one of the two slices;
    ``mean_dice_*`` average the others).
    ``folding_fraction`` is the fraction of pixels with a non-positive Jacobian determinant
    (0..1); ``runtime_s`` the wall-clock seconds of ``register_images`` alone.
    """

    fixed_id: int
    moving_id: int
    parameters: dict[str, Any]
    image_fixed: torch.Tensor
    image_moving: torch.Tensor
    image_warped: torch.Tensor
    labels_fixed: torch.Tensor
    labels_moving: torch.Tensor
    labels_warped: torch.Tensor
    displacement: torch.Tensor
    label_names: tuple[str, ...]
    dice_before: dict[str, float]
    dice_after: dict[str, float]
    mean_dice_before: float
    mean_dice_after: float
    folding_fraction: float
    runtime_s: float


def check_slice_id(name: str, value: Any, size: int) -> int:
    """``value`` as a slice index in 0..size-1 (the explorer's dropdowns and arguments)."""
    if not _is_int(value):
        raise ValueError(f"{name} must be an integer slice index, got {value!r}")
    if not 0 <= int(value) < size:
        raise ValueError(f"{name} must be in 0..{size - 1} (the dataset has {size} slices), got {value}")
    return int(value)


def explore_registration(
    dataset: Any,
    fixed_id: int,
    moving_id: int,
    *,
    disp_range: int = DEFAULT_PARAMETERS["disp_range"],
    min_kernel: int = DEFAULT_PARAMETERS["min_kernel"],
    avg_kernel: int = DEFAULT_PARAMETERS["avg_kernel"],
    meanfield_kernel: int = DEFAULT_PARAMETERS["meanfield_kernel"],
    meanfield_iterations: int = DEFAULT_PARAMETERS["meanfield_iterations"],
    alpha: float = DEFAULT_PARAMETERS["alpha"],
    features: Any = "mind",
    device: torch.device | str | None = None,
) -> ExplorerResult:
    """Register slice ``moving_id`` of ``dataset`` to slice ``fixed_id`` and measure the result.

    Args:
        dataset: an object with ``images`` [N, 1, H, W] float in [0, 1], ``labels`` [N, H, W]
            integer, ``label_names`` (index = label value) and ``num_labels``, as returned by
            ``tutorial_utils.data.load_dataset()``.
        fixed_id, moving_id: two different slice indices in 0..N-1.
        disp_range, min_kernel, avg_kernel, meanfield_kernel, meanfield_iterations, alpha,
            features: passed on to ``registration.register_images`` (see there); checked by
            :func:`validate_parameters` first.
        device: where to compute; default the device of ``dataset.images``.

    Returns:
        an :class:`ExplorerResult` (tensors on the CPU).
    """
    parameters = {"disp_range": disp_range, "min_kernel": min_kernel, "avg_kernel": avg_kernel,
                  "meanfield_kernel": meanfield_kernel, "meanfield_iterations": meanfield_iterations, "alpha": alpha}
    validate_parameters(**parameters)
    parameters = {name: float(value) if name == "alpha" else int(value) for name, value in parameters.items()}
    size = int(dataset.images.shape[0])
    fixed_id = check_slice_id("fixed_id", fixed_id, size)
    moving_id = check_slice_id("moving_id", moving_id, size)
    if fixed_id == moving_id:
        raise ValueError(f"fixed_id and moving_id must be two different slices, got {fixed_id} twice")
    num_labels = int(dataset.num_labels)
    label_names = tuple(str(name) for name in dataset.label_names)
    if len(label_names) != num_labels:
        raise ValueError(f"dataset.label_names has {len(label_names)} names but num_labels is {num_labels}")
    target = torch.device(device) if device is not None else torch.as_tensor(dataset.images).device
    image_fixed, labels_fixed = _slice(dataset, fixed_id, target)  # [1, 1, H, W], [1, H, W]
    image_moving, labels_moving = _slice(dataset, moving_id, target)

    with torch.no_grad():
        start = time.perf_counter()
        displacement = registration.register_images(image_fixed, image_moving, features=features,
                                                    **parameters)  # [1, 2, H, W] (dy, dx) in pixels
        if displacement.is_cuda:
            torch.cuda.synchronize(displacement.device)
        runtime_s = time.perf_counter() - start
        image_warped = transform.warp(image_moving, displacement)  # [1, 1, H, W]
        labels_warped = transform.warp_labels(labels_moving, displacement, num_labels).long()  # [1, H, W]
    return ExplorerResult(
        fixed_id=fixed_id, moving_id=moving_id, parameters={**parameters, "features": features},
        image_fixed=image_fixed.cpu(), image_moving=image_moving.cpu(), image_warped=image_warped.cpu(),
        labels_fixed=labels_fixed.cpu(), labels_moving=labels_moving.cpu(), labels_warped=labels_warped.cpu(),
        displacement=displacement.cpu(), label_names=label_names, runtime_s=runtime_s,
        folding_fraction=float(metrics.folding_fraction(displacement)[0]),
        **_dice_scores(labels_fixed, labels_moving, labels_warped, label_names),
    )


def _slice(dataset: Any, index: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Image [1, 1, H, W] float32 and labels [1, H, W] int64 of one slice, on ``device``."""
    image = torch.as_tensor(dataset.images)[index:index + 1].to(device, torch.float32)
    labels = torch.as_tensor(dataset.labels)[index:index + 1].to(device, torch.int64)
    return image, labels


def _dice_scores(labels_fixed: torch.Tensor, labels_moving: torch.Tensor, labels_warped: torch.Tensor,
                 label_names: tuple[str, ...]) -> dict[str, Any]:
    """Dice per organ present in either slice, before and after, and their means.

    The primary score (:func:`~tutorial_utils.metrics.dice`, ``present_in="both"``): an organ
    that only one of the two slices shows is listed with NaN (not scored, a through-plane
    difference) and left out of the means (:func:`~tutorial_utils.metrics.mean_over_organs`).
    """
    num_labels = len(label_names)
    before = metrics.dice(labels_fixed, labels_moving, num_labels)  # [num_labels]
    after = metrics.registration_dice(labels_fixed, labels_moving, labels_warped, num_labels)  # [num_labels]
    present = torch.zeros(num_labels, dtype=torch.bool)
    present[torch.unique(labels_fixed).cpu()] = True
    present[torch.unique(labels_moving).cpu()] = True
    organs = [k for k in range(1, num_labels) if present[k]]
    return {"dice_before": {label_names[k]: float(before[k]) for k in organs},
            "dice_after": {label_names[k]: float(after[k]) for k in organs},
            "mean_dice_before": float(metrics.mean_over_organs(before)),
            "mean_dice_after": float(metrics.mean_over_organs(after))}


# --------------------------------------------------------------------------------------------
# Plotting
# --------------------------------------------------------------------------------------------


def _draw_contours(ax, labels: np.ndarray, colours: list, linestyle: str, linewidth: float) -> None:
    for k in np.unique(labels):
        if k == 0:
            continue
        mask = (labels == k).astype(np.float32)
        ax.contour(mask, levels=[0.5], colors=[colours[int(k)]], linewidths=linewidth, linestyles=linestyle)


def displacement_to_rgb(displacement: np.ndarray, scale: float | None = None) -> np.ndarray:
    """Colour-wheel picture of a displacement field.

    Args:
        displacement: [2, H, W] (dy, dx) in pixels.
        scale: the length (pixels) drawn fully saturated; default the largest length present.

    Returns:
        [H, W, 3] float RGB in [0, 1]: hue = direction, saturation = length / scale,
        white where nothing moves.
    """
    from matplotlib.colors import hsv_to_rgb

    dy, dx = displacement[0], displacement[1]
    length = np.hypot(dy, dx)
    if scale is None:
        scale = float(length.max())
    scale = max(float(scale), 1e-6)
    hue = (np.arctan2(dy, dx) + np.pi) / (2 * np.pi)
    hsv = np.stack([hue, np.clip(length / scale, 0, 1), np.ones_like(hue)], axis=-1)
    return hsv_to_rgb(hsv)


def plot_explorer_result(result: ExplorerResult, *, fig=None, quiver_step: int = 16):
    """Draw a result in four panels and return the matplotlib ``Figure``.

    Panels: the fixed image with the fixed (solid) and warped moving (dashed) organ contours;
    the moving image with its contours; the warped moving image with the fixed contours; the
    displacement field as a colour wheel (hue = direction, saturation = length) with arrows
    every ``quiver_step`` pixels pointing from each fixed pixel to where it samples the moving
    image. The title gives mean Dice before -> after and the folding fraction.

    Without ``fig`` the figure is made with pyplot (so the inline backend shows it: end the
    line with ``;`` or assign it to avoid a second copy); pass a ``matplotlib.figure.Figure``
    to draw into it instead (the explorer does, to render it to PNG).
    """
    if fig is None:
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=(14, 3.9))
    else:
        fig.clear()
    fixed = result.image_fixed[0, 0].numpy()
    moving = result.image_moving[0, 0].numpy()
    warped = result.image_warped[0, 0].numpy()
    labels_fixed = result.labels_fixed[0].numpy()
    labels_moving = result.labels_moving[0].numpy()
    labels_warped = result.labels_warped[0].numpy()
    disp = result.displacement[0].numpy()  # [2, H, W]
    colours = [tuple(c) for c in plotting.label_colours(len(result.label_names))]
    height, width = fixed.shape

    axes = fig.subplots(1, 4)
    image_kw = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0, "interpolation": "nearest"}
    axes[0].imshow(fixed, **image_kw)
    _draw_contours(axes[0], labels_fixed, colours, "solid", 1.0)
    _draw_contours(axes[0], labels_warped, colours, "dashed", 1.0)
    axes[0].set_title(f"fixed #{result.fixed_id}\nsolid: fixed, dashed: warped labels", fontsize=9)
    axes[1].imshow(moving, **image_kw)
    _draw_contours(axes[1], labels_moving, colours, "solid", 1.0)
    axes[1].set_title(f"moving #{result.moving_id}\n(before registration)", fontsize=9)
    axes[2].imshow(warped, **image_kw)
    _draw_contours(axes[2], labels_fixed, colours, "solid", 0.8)
    axes[2].set_title("warped moving\nwith fixed contours", fontsize=9)

    length = np.hypot(disp[0], disp[1])
    axes[3].imshow(displacement_to_rgb(disp), interpolation="nearest")
    ys, xs = np.mgrid[quiver_step // 2 : height : quiver_step, quiver_step // 2 : width : quiver_step]
    axes[3].quiver(
        xs, ys, disp[1][ys, xs], disp[0][ys, xs],
        angles="xy", scale_units="xy", scale=1, color="black", width=0.004,
    )
    axes[3].set_xlim(-0.5, width - 0.5)
    axes[3].set_ylim(height - 0.5, -0.5)
    axes[3].set_title(f"displacement (max {length.max():.1f} px)\nhue: direction, strength: length",
                      fontsize=9)
    wheel = axes[3].inset_axes([0.78, 0.02, 0.2, 0.2])
    grid = np.linspace(-1, 1, 41)
    gx, gy = np.meshgrid(grid, grid)
    rgba = np.concatenate([displacement_to_rgb(np.stack([gy, gx]), scale=1.0),
                           (np.hypot(gx, gy) <= 1)[..., None].astype(float)], axis=-1)
    wheel.imshow(rgba, interpolation="bilinear")
    wheel.set_axis_off()
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])

    p = result.parameters
    fig.suptitle(
        f"mean Dice {result.mean_dice_before:.3f} -> {result.mean_dice_after:.3f}   "
        f"folding {100 * result.folding_fraction:.2f} %   "
        f"(D={p['disp_range']}, min {p['min_kernel']}, avg {p['avg_kernel']}, "
        f"mean-field {p['meanfield_iterations']}x{p['meanfield_kernel']}, alpha={p['alpha']:.3g})",
        fontsize=10,
    )
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.02, top=0.80, wspace=0.04)
    return fig


def render_png(result: ExplorerResult, dpi: int = 72) -> bytes:
    """The figure of :func:`plot_explorer_result` as PNG bytes, without touching pyplot."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(14, 3.9))
    FigureCanvasAgg(fig)
    plot_explorer_result(result, fig=fig)
    buffer = BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def dice_table_html(result: ExplorerResult) -> str:
    """Per-organ Dice before/after as an HTML table (mean in the last row).

    An organ that only one of the two slices shows is listed with "–" (not scored, not in the
    mean) and a note under the table says so.
    """

    def cell(value: float) -> str:
        return "–" if not math.isfinite(value) else f"{value:.3f}"

    def change(before: float, after: float) -> str:
        if not (math.isfinite(before) and math.isfinite(after)):
            return "<td></td>"
        delta = after - before
        colour = "#1e7b34" if delta > 0.0005 else "#b3261e" if delta < -0.0005 else "#555555"
        return f'<td style="padding:1px 10px;color:{colour};text-align:right">{delta:+.3f}</td>'

    pad = "padding:1px 10px;"
    rows = []
    for name, before in result.dice_before.items():
        after = result.dice_after[name]
        rows.append(
            f'<tr><td style="{pad}">{html.escape(name)}</td>'
            f'<td style="{pad}text-align:right">{cell(before)}</td>'
            f'<td style="{pad}text-align:right">{cell(after)}</td>{change(before, after)}</tr>'
        )
    before, after = result.mean_dice_before, result.mean_dice_after
    rows.append(
        f'<tr style="font-weight:bold;border-top:1px solid #888"><td style="{pad}">mean</td>'
        f'<td class="l2r-mean-dice-before" style="{pad}text-align:right">{cell(before)}</td>'
        f'<td class="l2r-mean-dice-after" style="{pad}text-align:right">{cell(after)}</td>'
        f"{change(before, after)}</tr>"
    )
    if any(not math.isfinite(v) for v in result.dice_before.values()):
        rows.append(f'<tr><td colspan="4" style="{pad}font-size:11px;color:#555555">– : the organ is in one '
                    f'slice only (a through-plane difference): not scored</td></tr>')
    return (
        '<table style="border-collapse:collapse;font-size:13px">'
        f'<tr><th style="{pad}text-align:left">organ</th><th style="{pad}">Dice before</th>'
        f'<th style="{pad}">after</th><th style="{pad}">change</th></tr>' + "".join(rows) + "</table>"
    )


def folding_html(result: ExplorerResult) -> str:
    """Folding fraction and runtime as one line of HTML."""
    return (
        f'<div style="font-size:13px">folding (det J &le; 0): '
        f'<b class="l2r-folding-value">{100 * result.folding_fraction:.2f} %</b> of pixels'
        f"<br>registration took {result.runtime_s:.2f} s</div>"
    )
