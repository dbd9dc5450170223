"""The interactive registration explorer of notebook 03.

Two parts, kept apart so that the computation can be tested (and used) without widgets:

* :func:`explore_registration` registers one fixed/moving pair of a dataset with given
  hyper-parameters and returns an :class:`ExplorerResult` (warped image and labels,
  displacement, per-organ Dice before/after, folding fraction, runtime);
  :func:`plot_explorer_result` draws such a result as a static matplotlib figure.
* :class:`RegistrationExplorer` is an ipywidgets panel around them: dropdowns for the pair,
  sliders for the hyper-parameters, and the figure, a Dice table and the folding fraction,
  recomputed (debounced) whenever a value changes.

The panel's parts carry stable CSS classes (``l2r-explorer``, ``l2r-fixed``, ``l2r-moving``,
``l2r-disp-range``, ``l2r-min-kernel``, ``l2r-avg-kernel``, ``l2r-meanfield-iterations``,
``l2r-meanfield-kernel``, ``l2r-alpha``, ``l2r-status``, ``l2r-figure``, ``l2r-dice``,
``l2r-folding``) so that the browser test (``tests/test_browser.py``) can find them.
"""

from __future__ import annotations

import asyncio
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
    "RegistrationExplorer",
    "explore_registration",
    "plot_explorer_result",
    "validate_parameters",
]

DEFAULT_PARAMETERS: dict[str, Any] = {
    "disp_range": 9,
    **{name: registration.DEFAULTS[name] for name in
       ("min_kernel", "avg_kernel", "meanfield_kernel", "meanfield_iterations", "alpha")},
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
    or the moving slice (NaN where an organ is in neither of the two compared maps).
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


def _dataset_size(dataset: Any) -> int:
    return int(dataset.images.shape[0])


def _check_id(name: str, value: Any, size: int) -> int:
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
    validate_parameters(
        disp_range=disp_range,
        min_kernel=min_kernel,
        avg_kernel=avg_kernel,
        meanfield_kernel=meanfield_kernel,
        meanfield_iterations=meanfield_iterations,
        alpha=alpha,
    )
    size = _dataset_size(dataset)
    fixed_id = _check_id("fixed_id", fixed_id, size)
    moving_id = _check_id("moving_id", moving_id, size)
    if fixed_id == moving_id:
        raise ValueError(f"fixed_id and moving_id must be two different slices, got {fixed_id} twice")
    num_labels = int(dataset.num_labels)
    label_names = tuple(str(name) for name in dataset.label_names)
    if len(label_names) != num_labels:
        raise ValueError(
            f"dataset.label_names has {len(label_names)} names but num_labels is {num_labels}"
        )

    images = torch.as_tensor(dataset.images)
    labels = torch.as_tensor(dataset.labels)
    target = torch.device(device) if device is not None else images.device
    image_fixed = images[fixed_id : fixed_id + 1].to(target, torch.float32)  # [1, 1, H, W]
    image_moving = images[moving_id : moving_id + 1].to(target, torch.float32)  # [1, 1, H, W]
    labels_fixed = labels[fixed_id : fixed_id + 1].to(target, torch.int64)  # [1, H, W]
    labels_moving = labels[moving_id : moving_id + 1].to(target, torch.int64)  # [1, H, W]
    parameters = {
        "disp_range": int(disp_range),
        "min_kernel": int(min_kernel),
        "avg_kernel": int(avg_kernel),
        "meanfield_kernel": int(meanfield_kernel),
        "meanfield_iterations": int(meanfield_iterations),
        "alpha": float(alpha),
        "features": features,
    }

    with torch.no_grad():
        start = time.perf_counter()
        displacement = registration.register_images(
            image_fixed,
            image_moving,
            features=features,
            disp_range=parameters["disp_range"],
            min_kernel=parameters["min_kernel"],
            avg_kernel=parameters["avg_kernel"],
            meanfield_kernel=parameters["meanfield_kernel"],
            meanfield_iterations=parameters["meanfield_iterations"],
            alpha=parameters["alpha"],
        )  # [1, 2, H, W] (dy, dx) in pixels
        if displacement.is_cuda:
            torch.cuda.synchronize(displacement.device)
        runtime_s = time.perf_counter() - start
        image_warped = transform.warp(image_moving, displacement)  # [1, 1, H, W]
        labels_warped = transform.warp_labels(labels_moving, displacement, num_labels)  # [1, H, W]
        dice_before = metrics.dice(labels_fixed, labels_moving, num_labels)  # [num_labels]
        dice_after = metrics.dice(labels_fixed, labels_warped.long(), num_labels)  # [num_labels]
        folding = float(metrics.folding_fraction(displacement)[0])

    present = torch.zeros(num_labels, dtype=torch.bool)
    present[torch.unique(labels_fixed).cpu()] = True
    present[torch.unique(labels_moving).cpu()] = True
    organs = [k for k in range(1, num_labels) if present[k]]
    return ExplorerResult(
        fixed_id=fixed_id,
        moving_id=moving_id,
        parameters=parameters,
        image_fixed=image_fixed.cpu(),
        image_moving=image_moving.cpu(),
        image_warped=image_warped.cpu(),
        labels_fixed=labels_fixed.cpu(),
        labels_moving=labels_moving.cpu(),
        labels_warped=labels_warped.long().cpu(),
        displacement=displacement.cpu(),
        label_names=label_names,
        dice_before={label_names[k]: float(dice_before[k]) for k in organs},
        dice_after={label_names[k]: float(dice_after[k]) for k in organs},
        mean_dice_before=metrics.mean_dice(labels_fixed, labels_moving, num_labels),
        mean_dice_after=metrics.mean_dice(labels_fixed, labels_warped.long(), num_labels),
        folding_fraction=folding,
        runtime_s=runtime_s,
    )


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
    """Per-organ Dice before/after as an HTML table (mean in the last row)."""

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


# --------------------------------------------------------------------------------------------
# The widget panel
# --------------------------------------------------------------------------------------------


class RegistrationExplorer:
    """An ipywidgets panel to explore the registration's hyper-parameters on one pair.

    Display it as the last expression of a cell (or with ``display(explorer)``). Every change
    of a dropdown or slider (sliders report only on release) schedules a recomputation after
    ``debounce_s`` seconds without a further change, on the kernel's event loop, so a burst
    of changes costs one registration. Where no event loop runs (plain Python, tests) or with
    ``debounce_s=0`` it recomputes at once. The latest result is ``explorer.result``, the
    number of results shown ``explorer.updates``, the last error message ``explorer.error``.

    Args:
        dataset: as for :func:`explore_registration`; needs ``train_ids`` and ``test_ids``
            (the dropdowns list the test slices first).
        fixed_id, moving_id: the starting pair; default the first two test slices.
        features: passed on to ``register_images``.
        device: where to compute (default the dataset's device).
        debounce_s: seconds of quiet before recomputing.
        compute: compute and show the starting pair right away (default True).
    """

    def __init__(
        self,
        dataset: Any,
        fixed_id: int | None = None,
        moving_id: int | None = None,
        *,
        features: str = "mind",
        device: torch.device | str | None = None,
        debounce_s: float = 0.3,
        compute: bool = True,
    ) -> None:
        import ipywidgets as w

        if debounce_s < 0:
            raise ValueError(f"debounce_s must be >= 0 seconds, got {debounce_s}")
        self.dataset = dataset
        self.features = features
        self.device = device
        self.debounce_s = float(debounce_s)
        self.result: ExplorerResult | None = None
        self.error: str | None = None
        self.updates = 0
        self._scheduled: asyncio.TimerHandle | None = None

        size = _dataset_size(dataset)
        test_ids = [int(i) for i in dataset.test_ids]
        train_ids = [int(i) for i in dataset.train_ids]
        listed = set(test_ids) | set(train_ids)
        others = [i for i in range(size) if i not in listed]
        options = (
            [(f"#{i} (test)", i) for i in test_ids]
            + [(f"#{i} (train)", i) for i in train_ids]
            + [(f"#{i}", i) for i in others]
        )
        order = [value for _, value in options]
        if len(order) < 2:
            raise ValueError(f"the explorer needs a dataset with at least 2 slices, got {len(order)}")
        fixed_id = order[0] if fixed_id is None else _check_id("fixed_id", fixed_id, size)
        if moving_id is None:
            moving_id = next(i for i in order if i != fixed_id)
        moving_id = _check_id("moving_id", moving_id, size)

        style = {"description_width": "150px"}
        slider_layout = w.Layout(width="380px")

        def int_slider(name: str, description: str, low: int, high: int, step: int, tip: str):
            slider = w.IntSlider(
                value=DEFAULT_PARAMETERS[name], min=low, max=high, step=step,
                description=description, tooltip=tip, continuous_update=False,
                style=style, layout=slider_layout,
            )
            slider.add_class("l2r-" + name.replace("_", "-"))
            return slider

        self.fixed_dropdown = w.Dropdown(options=options, value=fixed_id, description="fixed",
                                         style={"description_width": "60px"})
        self.fixed_dropdown.add_class("l2r-fixed")
        self.moving_dropdown = w.Dropdown(options=options, value=moving_id, description="moving",
                                          style={"description_width": "60px"})
        self.moving_dropdown.add_class("l2r-moving")
        self.disp_range_slider = int_slider(
            "disp_range", "displacements D", 3, 21, 2, "D discrete displacements per axis (odd)")
        self.min_kernel_slider = int_slider(
            "min_kernel", "min-conv kernel", 1, 11, 2, "window of the min-convolution (odd)")
        self.avg_kernel_slider = int_slider(
            "avg_kernel", "min-conv avg kernel", 1, 11, 2, "averaging after the min-convolution (odd)")
        self.meanfield_iterations_slider = int_slider(
            "meanfield_iterations", "mean-field iterations", 0, 5, 1, "spatial smoothing passes")
        self.meanfield_kernel_slider = int_slider(
            "meanfield_kernel", "mean-field kernel", 1, 11, 2, "mean-field window (odd)")
        self.alpha_slider = w.FloatLogSlider(
            value=DEFAULT_PARAMETERS["alpha"], base=10, min=-1, max=3, step=0.1,
            description="softmax alpha", readout_format=".3g", continuous_update=False,
            style=style, layout=slider_layout,
        )
        self.alpha_slider.add_class("l2r-alpha")

        self.status = w.HTML(value="")
        self.status.add_class("l2r-status")
        self.figure = w.Image(format="png", layout=w.Layout(width="100%", max_width="1100px"))
        self.figure.add_class("l2r-figure")
        self.dice_html = w.HTML(value="")
        self.dice_html.add_class("l2r-dice")
        self.folding_html = w.HTML(value="")
        self.folding_html.add_class("l2r-folding")

        self.sliders = [
            self.disp_range_slider, self.min_kernel_slider, self.avg_kernel_slider,
            self.meanfield_iterations_slider, self.meanfield_kernel_slider, self.alpha_slider,
        ]
        controls = w.HBox([
            w.VBox([w.HBox([self.fixed_dropdown, self.moving_dropdown])] + self.sliders[:3]),
            w.VBox(self.sliders[3:] + [self.status]),
        ])
        self.folding_html.layout.margin = "0 0 0 40px"
        results = w.HBox([self.dice_html, self.folding_html], layout=w.Layout(align_items="flex-start"))
        self.panel = w.VBox([controls, self.figure, results])
        self.panel.add_class("l2r-explorer")

        for control in [self.fixed_dropdown, self.moving_dropdown] + self.sliders:
            control.observe(self._on_change, names="value")
        if compute:
            self.update()

    # -- display ---------------------------------------------------------------------------

    def _repr_mimebundle_(self, **kwargs):
        return self.panel._repr_mimebundle_(**kwargs)

    # -- parameters and recomputation ------------------------------------------------------

    def parameters(self) -> dict[str, Any]:
        """The values the widgets show now, as keyword arguments of :func:`explore_registration`."""
        return {
            "disp_range": int(self.disp_range_slider.value),
            "min_kernel": int(self.min_kernel_slider.value),
            "avg_kernel": int(self.avg_kernel_slider.value),
            "meanfield_kernel": int(self.meanfield_kernel_slider.value),
            "meanfield_iterations": int(self.meanfield_iterations_slider.value),
            "alpha": float(self.alpha_slider.value),
        }

    def _on_change(self, change) -> None:
        # Debounce on the kernel's own event loop (the thread that handles widget messages):
        # widget updates sent from other threads are unreliable with ipykernel >= 7.
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # plain Python, no event loop: compute right away
            loop = None
        if self.debounce_s <= 0 or loop is None:
            self.update()
            return
        if self._scheduled is not None:
            self._scheduled.cancel()  # a newer change supersedes it
        self.status.value = '<span style="color:#555">waiting…</span>'
        self._scheduled = loop.call_later(self.debounce_s, self._run_scheduled)

    def _run_scheduled(self) -> None:
        self._scheduled = None
        self.update()

    @property
    def pending(self) -> bool:
        """True while a recomputation is scheduled but has not run yet."""
        return self._scheduled is not None

    def update(self) -> ExplorerResult | None:
        """Recompute for the current widget values and show the result (blocking)."""
        fixed_id, moving_id = self.fixed_dropdown.value, self.moving_dropdown.value
        params = self.parameters()
        if fixed_id == moving_id:
            self.error = "pick two different slices for fixed and moving"
            self.status.value = f'<span style="color:#b3261e">{self.error}</span>'
            return None
        self.status.value = '<span style="color:#555">computing…</span>'
        try:
            result = explore_registration(
                self.dataset, fixed_id, moving_id, features=self.features,
                device=self.device, **params,
            )
            png = render_png(result)
        except Exception as exc:  # shown in the panel: a widget callback has no traceback
            self.error = f"{type(exc).__name__}: {exc}"
            self.status.value = f'<span style="color:#b3261e">{html.escape(self.error)}</span>'
            return None
        self.error = None
        self.result = result
        self.updates += 1
        self.figure.value = png
        self.dice_html.value = dice_table_html(result)
        self.folding_html.value = folding_html(result)
        self.status.value = (
            f'<span style="color:#1e7b34">ready</span> '
            f'<span class="l2r-update-count">(update {self.updates}, '
            f"{result.runtime_s:.2f} s)</span>"
        )
        return result
