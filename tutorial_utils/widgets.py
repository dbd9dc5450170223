"""The interactive registration explorer of notebook 03: an ipywidgets panel.

:class:`RegistrationExplorer` shows dropdowns for the pair, sliders for the hyper-parameters,
and the figure, a Dice table and the folding fraction, recomputed (debounced) whenever a value
changes. What it computes and draws is :mod:`~tutorial_utils.explorer` (testable without
widgets).

The panel's parts carry stable CSS classes (``l2r-explorer``, ``l2r-fixed``, ``l2r-moving``,
``l2r-disp-range``, ``l2r-min-kernel``, ``l2r-avg-kernel``, ``l2r-meanfield-iterations``,
``l2r-meanfield-kernel``, ``l2r-alpha``, ``l2r-status``, ``l2r-figure``, ``l2r-dice``,
``l2r-folding``) so that the browser test (``tests/test_browser.py``) can find them.
"""

from __future__ import annotations

import asyncio
import html
from typing import Any

import torch

from .explorer import (
    DEFAULT_PARAMETERS,
    ExplorerResult,
    check_slice_id,
    dice_table_html,
    explore_registration,
    folding_html,
    render_png,
)

__all__ = ["RegistrationExplorer"]


_STYLE = {"description_width": "150px"}
_SLIDER_WIDTH = "380px"


def _with_class(widget, css_class: str):
    """``widget`` with a CSS class (what the browser test finds it by)."""
    widget.add_class(css_class)
    return widget


def _slice_options(dataset: Any) -> list[tuple[str, int]]:
    """Dropdown entries (label, slice index): the test slices first, then training, then the rest."""
    test_ids = [int(i) for i in dataset.test_ids]
    train_ids = [int(i) for i in dataset.train_ids]
    listed = set(test_ids) | set(train_ids)
    others = [i for i in range(int(dataset.images.shape[0])) if i not in listed]
    return ([(f"#{i} (test)", i) for i in test_ids] + [(f"#{i} (train)", i) for i in train_ids]
            + [(f"#{i}", i) for i in others])


def _dropdown(w, options: list[tuple[str, int]], value: int, name: str):
    """The dropdown that picks the ``name`` ("fixed" or "moving") slice."""
    return _with_class(w.Dropdown(options=options, value=value, description=name,
                                  style={"description_width": "60px"}), f"l2r-{name}")


def _int_slider(w, name: str, description: str, low: int, high: int, step: int, tip: str):
    """An integer slider for the hyper-parameter ``name``, reporting only on release."""
    slider = w.IntSlider(value=DEFAULT_PARAMETERS[name], min=low, max=high, step=step, description=description,
                         tooltip=tip, continuous_update=False, style=_STYLE, layout=w.Layout(width=_SLIDER_WIDTH))
    return _with_class(slider, "l2r-" + name.replace("_", "-"))




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

        options = _slice_options(dataset)
        order = [value for _, value in options]
        if len(order) < 2:
            raise ValueError(f"the explorer needs a dataset with at least 2 slices, got {len(order)}")
        size = int(dataset.images.shape[0])
        fixed_id = order[0] if fixed_id is None else check_slice_id("fixed_id", fixed_id, size)
        if moving_id is None:
            moving_id = next(i for i in order if i != fixed_id)
        moving_id = check_slice_id("moving_id", moving_id, size)

        self.fixed_dropdown = _dropdown(w, options, fixed_id, "fixed")
        self.moving_dropdown = _dropdown(w, options, moving_id, "moving")
        self._make_sliders(w)
        self._make_panel(w)
        for control in [self.fixed_dropdown, self.moving_dropdown] + self.sliders:
            control.observe(self._on_change, names="value")
        if compute:
            self.update()

    def _make_sliders(self, w) -> None:
        """One slider per hyper-parameter, starting at :data:`~tutorial_utils.explorer.DEFAULT_PARAMETERS`."""
        self.disp_range_slider = _int_slider(
            w, "disp_range", "displacements D", 3, 21, 2, "D discrete displacements per axis (odd)")
        self.min_kernel_slider = _int_slider(
            w, "min_kernel", "min-conv kernel", 1, 11, 2, "window of the min-convolution (odd)")
        self.avg_kernel_slider = _int_slider(
            w, "avg_kernel", "min-conv avg kernel", 1, 11, 2, "averaging after the min-convolution (odd)")
        self.meanfield_iterations_slider = _int_slider(
            w, "meanfield_iterations", "mean-field iterations", 0, 5, 1, "spatial smoothing passes")
        self.meanfield_kernel_slider = _int_slider(
            w, "meanfield_kernel", "mean-field kernel", 1, 11, 2, "mean-field window (odd)")
        self.alpha_slider = w.FloatLogSlider(
            value=DEFAULT_PARAMETERS["alpha"], base=10, min=-1, max=3, step=0.1,
            description="softmax alpha", readout_format=".3g", continuous_update=False,
            style=_STYLE, layout=w.Layout(width=_SLIDER_WIDTH),
        )
        self.alpha_slider.add_class("l2r-alpha")
        self.sliders = [
            self.disp_range_slider, self.min_kernel_slider, self.avg_kernel_slider,
            self.meanfield_iterations_slider, self.meanfield_kernel_slider, self.alpha_slider,
        ]

    def _make_panel(self, w) -> None:
        """The status line, the figure, the Dice table and the folding line, laid out with the controls."""
        self.status = _with_class(w.HTML(value=""), "l2r-status")
        self.figure = _with_class(w.Image(format="png", layout=w.Layout(width="100%", max_width="1100px")),
                                  "l2r-figure")
        self.dice_html = _with_class(w.HTML(value=""), "l2r-dice")
        self.folding_html = _with_class(w.HTML(value=""), "l2r-folding")
        controls = w.HBox([
            w.VBox([w.HBox([self.fixed_dropdown, self.moving_dropdown])] + self.sliders[:3]),
            w.VBox(self.sliders[3:] + [self.status]),
        ])
        self.folding_html.layout.margin = "0 0 0 40px"
        results = w.HBox([self.dice_html, self.folding_html], layout=w.Layout(align_items="flex-start"))
        self.panel = _with_class(w.VBox([controls, self.figure, results]), "l2r-explorer")

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
